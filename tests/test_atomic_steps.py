"""A failing step leaves the trainer where the error says: CORRECT's line search is atomic and is taken back
with a failed first CORRECT step; skipping non-finite batches gives up when it cannot help."""

import math

import numpy as np
import pytest
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_core import BatchError, DivergenceError, HybridConfig, HybridTrainer, Phase, Prediction

CYCLE = HybridConfig(warmup_steps=5, min_full_steps=5, max_predict_steps=10, horizon_arms=(0, 10), check_interval=0,
                     correct_steps=3, use_bandit=False)
BATCHES = regression_batches(np, seed=5)
DATA = [next(BATCHES) for _ in range(70)]
FIRST_CORRECT = 20  # 5 WARMUP + 5 FULL steps, 10 predicted steps: step 20 is the first CORRECT step of CYCLE


class Confident:
    """Dynamics double: always confident, a wide band, so PREDICT always starts and passes its checks."""

    def observe(self, features, outcome):
        pass

    def predict(self, features, horizon):
        return Prediction((1.0,) * horizon, (0.0,) * horizon, (1e9,) * horizon, (1.0,) * horizon, 1.0)

    def confidence(self):
        return 1.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Flaky(LeastSquares):
    """`loss_and_grad` returns NaN while ``bad_grad`` is set; `loss` raises on chosen calls (counted from 1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_grad = False
        self.raise_on_loss_call = set()
        self.loss_calls = 0

    def loss(self, batch):
        self.loss_calls += 1
        if self.loss_calls in self.raise_on_loss_call:
            raise RuntimeError("a forward pass that fails once")
        return super().loss(batch)

    def loss_and_grad(self, batch):
        loss, grads = super().loss_and_grad(batch)
        if self.bad_grad:
            return loss * np.nan, [g * np.nan for g in grads]
        return loss, grads


def _trainer(config=CYCLE, model_cls=Flaky, **changes):
    model = model_cls(np, seed=1)
    return HybridTrainer(model, PlainSGD(model, 0.05), config.replace(**changes), Confident()), model


def _comparable(value):
    """Part states as plain, exactly comparable values (arrays by dtype, shape and bytes; floats by repr)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, float):
        return repr(value)
    return value


def _state(trainer):
    """Every part's state; the metrics without wall seconds and event counts, the ledger without its read count
    (those two count work done, and a failed step did work)."""
    parts = {name: _comparable(part.state_dict()) for name, part in trainer.parts().items()}
    metrics = parts.pop("metrics")
    parts["records"] = [r[:5] + r[6:] for r in metrics["records"]]  # index 5: wall seconds
    parts.pop("ledger")
    return parts


def _params(model):
    return [p.copy() for p in model.parameters()]


def _assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


WORK_COUNTS = {"line_searches", "line_search_forwards", "line_search_rollback_pct", "nonfinite_in_predict",
               "late_nonfinite_rollbacks"}


def _assert_only_work_counts_differ(trainer, clean):
    """The events of a retried run and a clean one differ only in counts of the failed step's work: its search
    and, when it was found late, the rollback."""
    a, b = trainer.metrics.summary()["events"], clean.metrics.summary()["events"]
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= WORK_COUNTS


def _clean_run(read_every, batches):
    trainer, model = _trainer(read_every=read_every)
    for b in batches:
        trainer.step(b)
    trainer.flush()
    return trainer, model


@pytest.mark.parametrize("read_every", [1, 8])
def test_a_failed_first_correct_step_takes_its_line_search_back_and_the_retry_matches_a_clean_run(read_every):
    """Found at once (read_every=1) or by the replay after a later read (8): the weights are bit for bit where
    PREDICT left them, the cycle as before the search, and retrying the batch ends exactly like a run that
    never failed. Only counts of work done differ: one more line search (and its forward passes), more reads."""
    clean, clean_model = _clean_run(read_every, DATA)
    assert clean.metrics.records[FIRST_CORRECT].phase == "correct"
    assert clean.metrics.records[FIRST_CORRECT - 1].phase == "predict"

    trainer, model = _trainer(read_every=read_every)
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    assert trainer.phase is Phase.CORRECT and trainer.cycle.search_due
    before, run_before = _params(model), dict(vars(trainer.cycle.run))
    model.bad_grad = True
    with pytest.raises(DivergenceError) as info:
        trainer.step(DATA[FIRST_CORRECT])  # line search (finite: it uses `loss`), then a NaN real step
        trainer.flush()  # read_every=8: the read finds it
    model.bad_grad = False
    message = info.value.message
    assert f"step {FIRST_CORRECT} (correct)" in message
    assert f"back at the state before step {FIRST_CORRECT} (CORRECT's line search undone)" in message
    _assert_same(before, model.parameters())
    run_after = vars(trainer.cycle.run)
    assert run_after.keys() == run_before.keys()
    assert all(run_after[k] is run_before[k] or run_after[k] == run_before[k] for k in ("forwards", "best_fraction",
                                                                                         "paired_gain", "applied"))
    assert trainer.phase_state == (Phase.CORRECT, 0, 0, False) and trainer.cycle.search_due
    assert trainer.steps_done == FIRST_CORRECT
    for b in DATA[FIRST_CORRECT:]:  # the retry: the same batch, then the rest
        trainer.step(b)
    trainer.flush()
    _assert_same(clean_model.parameters(), model.parameters())
    assert _state(trainer) == _state(clean)
    _assert_only_work_counts_differ(trainer, clean)
    extra = {k: trainer.metrics.summary()["events"][k] - v for k, v in clean.metrics.summary()["events"].items()}
    assert extra["line_searches"] == 1 and extra["line_search_forwards"] == 3
    assert trainer.host_syncs > clean.host_syncs


@pytest.mark.parametrize("read_every", [1, 8])
def test_a_bad_batch_at_the_first_correct_step_does_not_steer_the_line_search(read_every):
    """A NaN batch makes every fraction's loss NaN (the search would go back to the PREDICT entry point); the
    step fails, the search is taken back, and a good batch then searches from where PREDICT ended, exactly as
    a run that never saw the bad batch."""
    clean, clean_model = _clean_run(read_every, DATA)
    trainer, model = _trainer(read_every=read_every)
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    before = _params(model)
    x, y = DATA[FIRST_CORRECT]
    with pytest.raises(DivergenceError, match="line search undone"):
        trainer.step((x, y * np.nan))
        trainer.flush()
    _assert_same(before, model.parameters())
    for b in DATA[FIRST_CORRECT:]:
        trainer.step(b)
    trainer.flush()
    _assert_same(clean_model.parameters(), model.parameters())
    assert _state(trainer) == _state(clean)
    _assert_only_work_counts_differ(trainer, clean)
    assert trainer.metrics.summary()["events"]["nonfinite_in_predict"] == 1  # the failed search saw only NaN


@pytest.mark.parametrize("read_every", [1, 8])
def test_a_search_can_be_taken_back_until_its_step_is_read_and_is_never_repeated(read_every):
    trainer, model = _trainer(read_every=read_every)
    for b in DATA[:FIRST_CORRECT + 1]:
        trainer.step(b)
    assert not trainer.cycle.search_due and trainer.cycle.run.best_fraction is not None
    trainer.flush()  # read_every=8: step 20 is read only now
    before = _params(model)
    assert trainer.cycle.undo_search(model) is None  # read finite: the copy is gone, nothing moves
    _assert_same(before, model.parameters())
    assert not trainer.cycle.search_due


@pytest.mark.parametrize("failing_call", [2, 3])
def test_the_line_search_is_atomic_when_a_forward_pass_raises(failing_call):
    """The search moves the weights between its forward passes; a pass that raises leaves them where the
    search found them (bit for bit) and the search still due, and the retry ends like a clean run."""
    clean, clean_model = _clean_run(1, DATA)
    trainer, model = _trainer(read_every=1)
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    before, forwards = _params(model), trainer.cycle.run.forwards
    model.raise_on_loss_call = {model.loss_calls + failing_call}  # the 2nd or 3rd fraction of the search
    with pytest.raises(BatchError, match="fails once"):
        trainer.step(DATA[FIRST_CORRECT])
    _assert_same(before, model.parameters())
    assert trainer.cycle.search_due and trainer.cycle.run.forwards == forwards
    assert trainer.steps_done == FIRST_CORRECT and trainer.phase_state.steps_in_phase == 0
    for b in DATA[FIRST_CORRECT:]:
        trainer.step(b)
    trainer.flush()
    _assert_same(clean_model.parameters(), model.parameters())
    assert _state(trainer) == _state(clean)


def test_without_set_parameters_the_search_is_undone_by_one_more_update_and_the_message_says_so():
    class NoSet(Flaky):
        set_parameters = None  # not a method: every real step is read before its update

    trainer, model = _trainer(model_cls=NoSet)
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    before = _params(model)
    model.bad_grad = True
    with pytest.raises(DivergenceError, match="exact up to rounding: the model has no set_parameters"):
        trainer.step(DATA[FIRST_CORRECT])
    model.bad_grad = False
    for a, b in zip(before, model.parameters()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert trainer.cycle.search_due


@pytest.mark.parametrize("read_every", [1, 8])
def test_a_skipped_first_correct_step_keeps_its_completed_search(read_every):
    """Skipping only leaves out the update: the search ran on the batch and is not repeated."""
    trainer, model = _trainer(read_every=read_every, on_nonfinite="skip")
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    model.bad_grad = True
    trainer.step(DATA[FIRST_CORRECT])
    trainer.flush()  # read_every=8: read (and replayed) while the step is still bad
    model.bad_grad = False
    before = _params(model)
    assert trainer.cycle.undo_search(model) is None and not trainer.cycle.search_due  # nothing left to take back
    _assert_same(before, model.parameters())
    for b in DATA[FIRST_CORRECT + 1:FIRST_CORRECT + 8]:
        trainer.step(b)
    trainer.flush()
    events = trainer.metrics.summary()["events"]
    assert events["skipped_nonfinite"] == 1 and events["line_searches"] == 1
    assert trainer.metrics.records[FIRST_CORRECT].skipped
    assert all(np.isfinite(p).all() for p in model.parameters())


def test_a_first_correct_step_not_skipped_because_of_the_search_says_so():
    """Skipping needs finite weights. Should the search alone have left them non-finite (forced here: the check
    answers 'not finite', then 'finite' once the search is undone), the step is not skipped, the search is taken
    back, and the message says why it raised although on_nonfinite='skip'."""
    trainer, model = _trainer(read_every=1, on_nonfinite="skip")
    for b in DATA[:FIRST_CORRECT]:
        trainer.step(b)
    before = _params(model)
    trainer.real_steps._weights_finite = iter([False, True]).__next__
    model.bad_grad = True
    with pytest.raises(DivergenceError, match=r"\(CORRECT's line search undone\); it was not skipped because the "
                                              "line search had left the weights non-finite"):
        trainer.step(DATA[FIRST_CORRECT])
    _assert_same(before, model.parameters())
    assert trainer.cycle.search_due


# -- on_nonfinite="skip" gives up ---------------------------------------------------------------------------


NEVER = HybridConfig(warmup_steps=5, min_full_steps=5, horizon_arms=(0,), idle_after=0)


def _nan(batch):
    x, y = batch
    return x, y * np.nan


@pytest.mark.parametrize("read_every", [1, 4])
def test_skip_gives_up_after_max_consecutive_skips(read_every):
    """3 NaN batches in a row are skipped, a good one resets the count, 3 more are skipped, the 4th in a row
    raises with the trainer as it was before it."""
    trainer, model = _trainer(NEVER, LeastSquares, read_every=read_every, on_nonfinite="skip",
                              max_consecutive_skips=3)
    good = iter(DATA)
    for _ in range(6):
        trainer.step(next(good))
    for _ in range(3):
        trainer.step(_nan(next(good)))
    trainer.step(next(good))
    for _ in range(3):
        trainer.step(_nan(next(good)))
    trainer.flush()
    assert trainer.metrics.summary()["events"]["skipped_nonfinite"] == 6
    assert trainer.real_steps.skips == 3
    before, done = _params(model), trainer.steps_done
    with pytest.raises(DivergenceError, match=r"after 3 batches in a row were skipped .*max_consecutive_skips=3\): "
                                              rf"giving up; the trainer is back at the state before step {done}"):
        trainer.step(_nan(next(good)))
        for _ in range(read_every - 1):
            trainer.step(next(good))
    _assert_same(before, model.parameters())
    assert trainer.steps_done == done
    trainer.step(next(good))  # a finite step resets the count
    trainer.flush()
    assert trainer.real_steps.skips == 0


def test_the_skip_count_is_saved_and_restored(tmp_path):
    trainer, _ = _trainer(NEVER, LeastSquares, on_nonfinite="skip", max_consecutive_skips=3)
    for b in DATA[:6]:
        trainer.step(b)
    for b in DATA[6:8]:
        trainer.step(_nan(b))
    trainer.save(tmp_path / "t.ckpt")
    model = LeastSquares(np, seed=1)
    resumed = HybridTrainer.load(tmp_path / "t.ckpt", model, PlainSGD(model, 0.05), Confident())
    assert resumed.real_steps.skips == 2
    resumed.step(_nan(DATA[8]))  # the third in a row: skipped
    with pytest.raises(DivergenceError, match="giving up"):
        resumed.step(_nan(DATA[9]))


class BreaksAt(PlainSGD):
    """SGD whose updates are NaN from its ``at``-th step on (a corrupted optimizer state, say)."""

    def __init__(self, model, lr, at):
        super().__init__(model, lr)
        self.at = at

    def step(self, grads):
        if self.steps >= self.at:
            grads = [g * np.nan for g in grads]
        return super().step(grads)


@pytest.mark.parametrize("read_every", [1, 8])
def test_skip_gives_up_at_once_when_the_weights_are_not_finite(read_every):
    """The update of step 10 makes the weights NaN with a finite loss; step 11 is the first non-finite read:
    skipping cannot help, so it raises there (today's code skipped every later batch forever)."""
    model = LeastSquares(np, seed=1)
    trainer = HybridTrainer(model, BreaksAt(model, 0.05, at=10),
                            NEVER.replace(read_every=read_every, on_nonfinite="skip"), Confident())
    with pytest.raises(DivergenceError, match="weights themselves are not finite") as info:
        for b in DATA[:40]:
            trainer.step(b)
        trainer.flush()
    assert "step 11 (full)" in info.value.message
    assert "back at the state before step 11" in info.value.message
    assert trainer.metrics.summary()["events"].get("skipped_nonfinite", 0) == 0
    assert not all(np.isfinite(p).all() for p in model.parameters())


def test_raise_says_when_the_weights_themselves_are_not_finite():
    trainer, model = _trainer(NEVER, LeastSquares, read_every=1)
    for b in DATA[:6]:
        trainer.step(b)
    model.params[0] = model.params[0] * np.inf  # from outside: a bad load, a broken optimizer
    with pytest.raises(DivergenceError, match="weights themselves are not finite"), np.errstate(invalid="ignore"):
        trainer.step(DATA[6])
    model.params[0] = np.ones_like(model.params[0])
    with pytest.raises(DivergenceError) as info:
        trainer.step(_nan(DATA[6]))
    assert "weights themselves" not in info.value.message  # finite again: not claimed


# -- the invariant: wherever a non-finite value is forced, the error tells the truth -----------------------------


CYCLES = HybridConfig(warmup_steps=5, min_full_steps=5, max_full_steps=30, max_predict_steps=8, probe_steps=2,
                      check_interval=3, correct_steps=3, use_bandit=False, horizon_arms=(0, 8))


class Forced(LeastSquares):
    """NaN on one chosen batch (``bad``): in everything (``where="batch"``) or in ``loss_and_grad`` only."""

    def __init__(self, *args, bad=None, where="batch", **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.where = bad, where

    def loss(self, batch):
        value = super().loss(batch)
        return value * np.nan if batch is self.bad and self.where == "batch" else value

    def loss_and_grad(self, batch):
        loss, grads = super().loss_and_grad(batch)
        if batch is self.bad:
            return loss * np.nan, [g * np.nan for g in grads]
        return loss, grads


def _first_correct_steps():
    model = LeastSquares(np, seed=2)
    trainer = HybridTrainer(model, PlainSGD(model, 0.05), CYCLES, Confident())
    phases = [trainer.step(b).phase for b in DATA[:60]]
    return [i for i in range(1, 60) if phases[i] is Phase.CORRECT and phases[i - 1] is Phase.PREDICT]


FIRST_CORRECTS = _first_correct_steps()  # the steps that line-search: drawn more often than the others


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(read_every=st.sampled_from([1, 3, 8]), bad=st.one_of(st.integers(0, 59), st.sampled_from(FIRST_CORRECTS)),
       where=st.sampled_from(["batch", "grad"]),
       policy=st.sampled_from(["raise", "skip"]), breaks_at=st.one_of(st.none(), st.integers(0, 59)))
def test_after_any_forced_nonfinite_the_weights_are_finite_or_the_error_says_so(read_every, bad, where, policy,
                                                                                   breaks_at):
    """With a NaN batch at any step (and, optionally, an optimizer that starts writing NaN at any step): a run
    that does not raise ends with finite weights (unless its last update was the first NaN one); a
    `DivergenceError` at step n says the weights are not finite exactly when they are not, and otherwise
    leaves them bit for bit where a clean run of the first n batches (with the same optimizer) has them — the
    first CORRECT step's line search included."""
    config = CYCLES.replace(read_every=read_every, on_nonfinite=policy)

    def make(bad_batch):
        model = Forced(np, seed=2, bad=bad_batch, where=where)
        optimizer = PlainSGD(model, 0.05) if breaks_at is None else BreaksAt(model, 0.05, breaks_at)
        return HybridTrainer(model, optimizer, config, Confident()), model

    trainer, model = make(DATA[bad])
    try:
        for b in DATA[:60]:
            trainer.step(b)
        trainer.flush()
    except DivergenceError as exc:
        n = trainer.steps_done
        assert f"step {n} (" in exc.message and f"back at the state before step {n}" in exc.message
        finite = all(np.isfinite(p).all() for p in model.parameters())
        assert ("weights themselves are not finite" in exc.message) == (not finite)
        if finite and policy == "raise":
            clean, clean_model = make(None)
            for b in DATA[:n]:
                clean.step(b)
            _assert_same(clean_model.parameters(), model.parameters())
        return
    assert trainer.steps_done == 60
    # An update that makes the weights non-finite (with a finite loss) is found by the next real step's read;
    # only the run's very last update is read by nothing.
    finite = all(np.isfinite(p).all() for p in model.parameters())
    assert finite or trainer.optimizer.steps == breaks_at + 1
    if breaks_at is None and policy == "raise":
        # The bad batch reached only forward-only passes (a predicted step, a check that rolled back).
        assert trainer.metrics.records[bad].phase == "predict"


@pytest.mark.parametrize("read_every, verified", [(1, False), (8, True), (8, False)])
def test_skip_stops_at_once_on_torch_when_adam_state_turns_the_weights_nan(read_every, verified):
    """The issue's case: NaN in Adam's ``exp_avg_sq`` gives a finite loss and NaN weights; every later batch was
    skipped forever. Now the first non-finite read raises, saying the weights themselves are not finite.
    With lagged reads the rollback puts the verified optimizer state back, so a corruption after the verified
    point is simply undone; one inside it (``verified``) raises DivergenceError, since the adapter refuses to put its
    NaN copy back."""
    torch = pytest.importorskip("torch")
    from hybrid_core.adapters import torch as ta

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    model = ta.TorchModel(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = HybridTrainer(model, ta.TorchOptimizer(model, adam), NEVER.replace(read_every=read_every,
                                                                                  on_nonfinite="skip"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=g, dtype=torch.float64),
                torch.randn(16, 3, generator=g, dtype=torch.float64)) for _ in range(40)]
    for b in batches[:8]:
        trainer.step(b)
    trainer.flush()
    with torch.no_grad():
        adam.state[net[0].weight]["exp_avg_sq"][0, 0] = math.nan
    if verified:
        trainer.ledger.verify(model, trainer.optimizer)
    if read_every == 8 and not verified:
        for b in batches[8:]:
            trainer.step(b)
        trainer.flush()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert trainer.metrics.summary()["events"]["late_nonfinite_rollbacks"] >= 1
        return
    if verified:  # the verified copy of Adam's state holds the NaN: TorchOptimizer refuses to load it back
        with pytest.raises(DivergenceError, match="last verified point cannot be put back"):
            for b in batches[8:]:
                trainer.step(b)
            trainer.flush()
        return
    with pytest.raises(DivergenceError, match="weights themselves are not finite"):
        for b in batches[8:]:
            trainer.step(b)
        trainer.flush()
    assert trainer.steps_done == 9  # step 8's update made them NaN; step 9 is the first to read it
    assert trainer.metrics.summary()["events"].get("skipped_nonfinite", 0) == 0
