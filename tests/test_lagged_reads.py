"""Reads in batches: invariants that hold whatever the read cadence and whenever a read happens."""

import numpy as np
import pytest
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import DivergenceError, HybridConfig, HybridTrainer
from hybrid_core.dynamics import RSSMDynamics, TrendDynamics

NEVER = HybridConfig(warmup_steps=5, min_full_steps=5, horizon_arms=(0,), idle_after=0)
CYCLES = HybridConfig(warmup_steps=5, min_full_steps=5, max_full_steps=40, max_predict_steps=8, probe_steps=2,
                      check_interval=3, correct_steps=3, confidence_threshold=0.0, horizon_arms=(0, 5, 8))


def _batches(n, bad=None):
    source = regression_batches(np, seed=1)
    out = [next(source) for _ in range(n)]
    if bad is not None:
        x, y = out[bad]
        out[bad] = (x, y * np.nan)
    return out


@settings(max_examples=40, deadline=None)
@given(read_every=st.integers(1, 10), bad=st.integers(0, 30), extra=st.integers(0, 12),
       policy=st.sampled_from(["raise", "skip"]))
def test_a_nonfinite_step_is_handled_as_if_read_at_once(read_every, bad, extra, policy):
    """Wherever the bad batch falls relative to the reads, the weights end as plain training's
    without that batch (raise: stopped before it; skip: it is left out, the later ones applied)."""
    batches = _batches(bad + 1 + extra, bad)
    model = LeastSquares(np, seed=3)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), NEVER.replace(read_every=read_every, on_nonfinite=policy),
                            TrendDynamics())
    ref = LeastSquares(np, seed=3)
    ref_opt = PlainSGD(ref, 0.05)
    kept = batches[:bad] if policy == "raise" else batches[:bad] + batches[bad + 1:]
    for b in kept:
        ref_opt.step(ref.loss_and_grad(b)[1])
    raised = False
    try:
        for b in batches:
            trainer.step(b)
        trainer.flush()
    except DivergenceError as exc:
        raised = True
        assert f"step {bad} " in exc.message
    assert raised == (policy == "raise")
    assert trainer.steps_done == (bad if policy == "raise" else len(batches))
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    if policy == "skip":
        records = trainer.metrics.records
        assert [r.skipped for r in records] == [i == bad for i in range(len(batches))]


@settings(max_examples=10, deadline=None)
@given(read_every=st.integers(2, 9), flush_at=st.sets(st.integers(0, 119), max_size=30))
def test_extra_reads_change_nothing(read_every, flush_at):
    """Measured steps follow the step index, so flushing at arbitrary points (as saves do) leaves the
    run, PREDICT cycles included, exactly as it was."""
    batches = _batches(120)

    def run(flushes):
        model = LeastSquares(np, seed=0)
        # The RSSM reads every feature, gradient statistics included: any change in what was
        # measured when would change its forecasts.
        trainer = HybridTrainer(model, PlainSGD(model, 0.05), CYCLES.replace(read_every=read_every),
                                RSSMDynamics(seed=0))
        for i, b in enumerate(batches):
            trainer.step(b)
            if i in flushes:
                trainer.flush()
        trainer.flush()
        records = [(r.step, r.phase, r.loss, r.predicted_loss, r.backward) for r in trainer.metrics.records]
        return records, [p.copy() for p in model.parameters()], trainer.metrics.summary()["events"]

    plain, params, events = run(set())
    flushed, params_f, events_f = run(flush_at)
    assert flushed == plain
    assert {k: v for k, v in events.items()} == {k: v for k, v in events_f.items()}
    for a, b in zip(params, params_f):
        np.testing.assert_array_equal(a, b)
    assert any(r[1] == "predict" for r in plain)  # the runs do predict


def test_a_model_without_set_parameters_is_read_before_every_update():
    class Fixed(LeastSquares):
        set_parameters = None  # not a method: the trainer cannot come back from NaN weights

    model = Fixed(np)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), NEVER, TrendDynamics())
    for b in _batches(16):
        result = trainer.step(b)
        assert result.loss is not None
    assert trainer.host_syncs == 16


def test_statistics_are_measured_on_the_read_steps_only():
    model = LeastSquares(np)
    config = NEVER.replace(read_every=4, min_full_steps=100, max_full_steps=200)  # no decision within 40 steps
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), config, TrendDynamics())
    for b in _batches(40):
        trainer.step(b)
    trainer.flush()
    assert len(trainer.state.grad_norms) == 10  # steps 3, 7, …, 39
    assert len(trainer.state.losses) == 40


@pytest.mark.parametrize("read_every", [1, 8])
def test_checkpoint_resume_is_bit_exact_whatever_the_read_cadence(tmp_path, read_every):
    """The RSSM reads every feature (update statistics included), so what each part saves must be
    complete for the resumed run to match."""
    batches = _batches(90)
    config = CYCLES.replace(read_every=read_every)

    def fresh(seed=0):
        model = LeastSquares(np, seed=seed)
        return HybridTrainer(model, PlainSGD(model, 0.05), config, RSSMDynamics(seed=0)), model

    straight, m1 = fresh()
    for b in batches:
        straight.step(b)
    straight.flush()
    first, _ = fresh()
    for b in batches[:45]:
        first.step(b)
    first.save(tmp_path / "t.ckpt")
    model2 = LeastSquares(np, seed=9)
    second = HybridTrainer.load(tmp_path / "t.ckpt", model2, PlainSGD(model2, 0.05),
                                RSSMDynamics(seed=0))
    for b in batches[45:]:
        second.step(b)
    second.flush()
    # Wall seconds differ; everything else is identical.
    assert [r[:5] + r[6:] for r in second.metrics.records] == [r[:5] + r[6:] for r in straight.metrics.records]
    assert {p for r in straight.metrics.records for p in [r.phase]} == {"warmup", "full", "predict", "correct"}
    for a, b in zip(m1.parameters(), model2.parameters()):
        np.testing.assert_array_equal(a, b)
