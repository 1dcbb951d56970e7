"""End to end: the reference MLP on the bundled digits through HybridTrainer, on every backend."""

import contextlib

import numpy as np
import pytest
from _namespaces import NAMESPACES, namespace

from hybrid_core import HybridConfig, HybridTrainer, Phase
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core.apps.data import split_digits
from hybrid_core.apps.demo import _batches
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

SHORT = HybridConfig(lr_recommend=False, warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10,
                     correct_steps=10)


def _strict_flags(name):
    if name != "array_api_strict":
        return contextlib.nullcontext()
    import array_api_strict

    # The strictest setting: no extensions, no boolean masks, no data-dependent shapes.
    return array_api_strict.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False,
                                                enabled_extensions=())


@pytest.mark.parametrize("name", NAMESPACES)
def test_300_steps_visit_every_phase_and_skip_backward_passes(name, dynamics=None):
    with namespace(name) as xp, _strict_flags(name):
        split = split_digits(seed=0)
        x = from_numpy(xp, split.x_train, dtype=xp.float64)
        y = from_numpy(xp, split.y_train)
        val = (from_numpy(xp, split.x_val, dtype=xp.float64), from_numpy(xp, split.y_val))
        model = MLP([64, 32, 10], xp=xp, dtype=xp.float64, seed=0)
        trainer = HybridTrainer(model, Adam(model, lr=3e-3), SHORT, dynamics)
        start_val = float(to_numpy(model.loss(val)))
        summary = trainer.fit(_batches(xp, x, y, split.y_train.shape[0], 64, 0), 300, progress=False)
        end_val = float(to_numpy(model.loss(val)))
    counts = summary["steps_per_phase"]
    assert all(counts[p.value] > 0 for p in Phase), counts
    assert summary["steps"] == 300 and summary["backward_passes"] < 300
    assert summary["backward_passes"] == 300 - counts["predict"]
    losses = [r.loss for r in trainer.metrics.records if r.loss is not None]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert end_val < 0.5 * start_val
    assert all(np.all(np.isfinite(to_numpy(p))) for p in model.parameters())


def test_the_default_dynamics_model_is_the_trend_model():
    from hybrid_core.dynamics import TrendDynamics

    model = MLP([64, 8, 10], seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=1e-3), HybridConfig(seed=7))
    assert type(trainer.dynamics) is TrendDynamics


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_300_steps_with_the_baseline_dynamics_visit_every_phase(name):
    from hybrid_core import TrendDynamics

    test_300_steps_visit_every_phase_and_skip_backward_passes(name, TrendDynamics())


def test_numpy_and_strict_runs_agree():
    runs = []
    for name in ("numpy", "array_api_strict"):
        pytest.importorskip(name)
        with namespace(name) as xp:
            runs.append(_run(xp))
    assert [p for p, _ in runs[0]] == [p for p, _ in runs[1]]
    a = np.array([v for _, v in runs[0] if v is not None])
    b = np.array([v for _, v in runs[1] if v is not None])
    np.testing.assert_allclose(a, b, rtol=1e-9)


def _run(xp):
    split = split_digits(seed=1)
    x = from_numpy(xp, split.x_train, dtype=xp.float64)
    y = from_numpy(xp, split.y_train)
    model = MLP([64, 16, 10], xp=xp, dtype=xp.float64, seed=1)
    trainer = HybridTrainer(model, Adam(model, lr=3e-3), SHORT)
    trainer.fit(_batches(xp, x, y, split.y_train.shape[0], 32, 1), 200, progress=False)
    return [(r.phase, r.loss) for r in trainer.metrics.records]
