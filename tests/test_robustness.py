"""Long runs stay bounded; random configs and bad inputs only ever raise HybridError."""

import resource

import numpy as np
import pytest
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_core import ConfigError, DivergenceError, HybridConfig, HybridError, HybridTrainer


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@pytest.mark.slow
def test_100k_steps_keep_memory_bounded():
    model = LeastSquares(np, dim=4)
    cfg = HybridConfig(warmup_steps=50, min_full_steps=20, max_predict_steps=30, horizon_arms=(0, 10, 30),
                       check_interval=5, correct_steps=5, confidence_threshold=0.0)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), cfg)
    batches = regression_batches(np, n=8, dim=4, noise=0.3)
    for _ in range(20_000):
        trainer.step(next(batches))
    warm = _rss_mb()
    for _ in range(80_000):
        trainer.step(next(batches))
    grown = _rss_mb() - warm
    assert trainer.state.step == 100_000
    assert grown < 10.0, f"resident memory grew {grown:.1f} MB after warm-up"
    assert len(trainer.metrics.records) == cfg.metrics_max_records
    assert len(trainer.state.losses) == cfg.history_size
    assert len(trainer.residuals) <= 512 and len(trainer.metrics.decisions) <= cfg.metrics_max_records


config_values = st.fixed_dictionaries({}, optional={
    "warmup_steps": st.integers(-2, 20),
    "min_full_steps": st.integers(-1, 15),
    "max_full_steps": st.integers(0, 60),
    "max_predict_steps": st.integers(0, 20),
    "probe_steps": st.integers(0, 6),
    "check_interval": st.integers(-1, 5),
    "correct_steps": st.integers(0, 6),
    "confidence_threshold": st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
    "direction": st.sampled_from(["extrapolate", "linefit", "bogus"]),
    "on_nonfinite": st.sampled_from(["raise", "skip", "ignore"]),
    "horizon_arms": st.sampled_from([(0, 3, 10), (0, 5), (3, 5), ()]),
    "correction_fractions": st.sampled_from([(0.0, 0.5, 1.0), (0.25,), (2.0,)]),
    "read_every": st.sampled_from([0, 1, 3, 8]),
})

bad_batch = st.sampled_from(["nan_y", "inf_x", "wrong_width", "empty", "not_a_pair", "list_y", "ok", "ok", "ok"])


def _batch(kind, rng):
    x, y = rng.normal(size=(6, 3)), rng.normal(size=6)
    if kind == "nan_y":
        y[0] = np.nan
    elif kind == "inf_x":
        x[1, 1] = np.inf
    elif kind == "wrong_width":
        x = rng.normal(size=(6, 5))
    elif kind == "empty":
        x, y = x[:0], y[:0]
    elif kind == "not_a_pair":
        return x
    elif kind == "list_y":
        y = y.tolist()
    return x, y


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_values, st.lists(bad_batch, min_size=1, max_size=60), st.integers(0, 10))
def test_random_configs_and_bad_inputs_only_raise_hybrid_errors(values, kinds, seed):
    try:
        config = HybridConfig(**values)
    except ConfigError:
        return
    model = LeastSquares(np, dim=3, seed=seed)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), config)
    rng = np.random.default_rng(seed)
    for kind in kinds:
        before = [p.copy() for p in model.parameters()]
        try:
            trainer.step(_batch(kind, rng))
            if config.read_every > 1:
                trainer.flush()  # a late read of a non-finite value rolls back and raises here
        except DivergenceError as exc:
            # Found at once or by a later read: the trainer is back where it was before the bad step.
            assert "back at the state before step" in exc.message
        except HybridError:
            for a, b in zip(before, model.parameters()):  # a refused batch changes nothing
                np.testing.assert_array_equal(a, b)
        assert all(np.all(np.isfinite(p)) for p in model.parameters())
