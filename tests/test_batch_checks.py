"""Every step refuses a batch of zero samples; a predicted step without a forward pass still checks its batch."""

import numpy as np
import pytest
from _namespaces import NAMESPACES, namespace
from _toy import LeastSquares, PlainSGD, regression_batches
from hypothesis import given, settings
from hypothesis import strategies as st

import hybrid_core._backend as backend
from hybrid_core import BatchError, HybridConfig, HybridTrainer, Phase, Prediction
from hybrid_core._batchcheck import describe, difference, merge, zero_samples

CYCLE = HybridConfig(warmup_steps=5, min_full_steps=5, max_predict_steps=10, horizon_arms=(0, 10), check_interval=0,
                     correct_steps=3, use_bandit=False)
FIRST_PREDICT = 10  # 5 WARMUP + 5 FULL steps; no predicted step of CYCLE runs a forward check


class Confident:
    """Dynamics double: always confident, a wide band, so PREDICT always starts."""

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


class SummedLoss(LeastSquares):
    """A sum-reduced loss: finite (0) on a batch of no samples, so nothing else would notice it."""

    def loss(self, batch):
        r = self._resid(batch)
        return 0.5 * self.xp.sum(r * r)

    def loss_and_grad(self, batch):
        x, _ = batch
        r = self._resid(batch)
        return 0.5 * self.xp.sum(r * r), [x.T @ r, self.xp.reshape(self.xp.sum(r), (1,))]


class Masked(LeastSquares):
    """Takes (x, y, mask); the mask's second axis varies from batch to batch (dynamic padding) and is ignored."""

    def _resid(self, batch):
        return super()._resid(batch[:2])

    def loss_and_grad(self, batch):
        return super().loss_and_grad(batch[:2])


def _trainer(xp=np, model_cls=LeastSquares, config=CYCLE):
    model = model_cls(xp, seed=1)
    return HybridTrainer(model, PlainSGD(model, 0.05), config, Confident()), model


def _host(model):
    return [backend.to_numpy(p).copy() for p in model.parameters()]


def _snapshot(trainer, model):
    run = trainer.cycle.run
    return (_host(model), trainer.steps_done, trainer.phase_state, None if run is None else list(run.applied),
            trainer.state.step, trainer.host_syncs)


def _assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1:] == after[1:]


@pytest.mark.parametrize("model_cls", [LeastSquares, SummedLoss])
@pytest.mark.parametrize("at", ["real", "predict"])
@pytest.mark.parametrize("name", NAMESPACES)
def test_an_empty_batch_is_a_batch_error_with_a_data_hint(name, at, model_cls):
    """Whatever the backend, whatever the loss makes of it (NaN for a mean, 0 for a sum), in a real or a
    predicted step: `BatchError` naming the empty arrays, a hint about the data, nothing changed."""
    with namespace(name) as xp:
        trainer, model = _trainer(xp, model_cls)
        batches = regression_batches(xp, seed=2)
        for _ in range(1 if at == "real" else FIRST_PREDICT + 2):
            trainer.step(next(batches))
        assert trainer.phase is (Phase.WARMUP if at == "real" else Phase.PREDICT)
        x, y = next(batches)
        before = _snapshot(trainer, model)
        with pytest.raises(BatchError, match=r"the batch has zero samples \(batch\[0\] has shape \(0, 3\), "
                                             r"batch\[1\] has shape \(0,\)\)") as info:
            trainer.step((x[:0, ...], y[:0]))
        assert "empty batch" in info.value.recovery and "learning rate" not in str(info.value)
        _assert_unchanged(before, _snapshot(trainer, model))
        trainer.step((x, y))  # and it carries on


def _bad(kind, x, y):
    if kind == "wrong_width":
        return np.concatenate([x, x[:, :2]], axis=1), y
    if kind == "extra_axis":
        return x[:, :, None], y
    if kind == "not_a_pair":
        return x
    if kind == "three_items":
        return x, y, y
    if kind == "other_library":
        import torch

        return torch.from_numpy(x), torch.from_numpy(y)
    raise AssertionError(kind)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy @ torch in the toy, on the refused batch
@pytest.mark.parametrize("kind", ["wrong_width", "extra_axis", "not_a_pair", "three_items", "other_library"])
def test_a_malformed_batch_at_an_unchecked_predicted_step_is_refused(kind):
    """Today such a batch was taken without a look. Now its structure is compared with the batches the model
    took; it differs, so the model gets one forward pass on it and its refusal is raised, nothing changed;
    the run then goes on exactly as one that never saw that batch."""
    if kind == "other_library":
        pytest.importorskip("torch")
    good = [next(b) for b in [regression_batches(np, seed=2)] for _ in range(40)]
    clean, clean_model = _trainer()
    for b in good:
        clean.step(b)
    clean.flush()

    trainer, model = _trainer()
    for b in good[:FIRST_PREDICT + 3]:
        trainer.step(b)
    assert trainer.phase is Phase.PREDICT and not trainer.cycle.check_due(trainer.phase_state.steps_in_phase)
    before = _snapshot(trainer, model)
    with pytest.raises(BatchError, match=rf"step {FIRST_PREDICT + 3} \(predict, a step that runs no forward pass of "
                                    r"its own\): batch.* where accepted batches had .*, and the model refuses"):
        trainer.step(_bad(kind, *good[FIRST_PREDICT + 3]))
    _assert_unchanged(before, _snapshot(trainer, model))
    for b in good[FIRST_PREDICT + 3:]:
        trainer.step(b)
    trainer.flush()
    for a, b in zip(clean_model.parameters(), model.parameters()):
        np.testing.assert_array_equal(a, b)
    assert [r[:5] for r in trainer.metrics.records] == [r[:5] for r in clean.metrics.records]


def test_a_batch_the_model_accepts_costs_one_forward_pass_once_per_new_shape():
    """No false refusals: a predicted step's batch that differs from the real steps' but that the model takes
    (a new padded length, another dtype) costs one forward pass (no host read), and the same variation costs
    nothing afterwards. Values are never read at an unchecked predicted step: NaN in a batch there is not
    seen (the batch does not move the weights)."""
    rng = np.random.default_rng(0)
    source = regression_batches(np, seed=2)

    def batch(width, dtype=np.float64, nan=False):
        x, y = next(source)
        return x.astype(dtype), y * np.nan if nan else y, rng.normal(size=(x.shape[0], width))

    trainer, model = _trainer(model_cls=Masked)
    for _ in range(FIRST_PREDICT):
        trainer.step(batch(4))
    syncs = trainer.host_syncs
    trainer.step(batch(7))  # a new padded length: one forward pass, then the axis is free
    trainer.step(batch(9))
    trainer.step(batch(9, np.float32))  # another dtype the model takes: one more
    trainer.step(batch(5, np.float32))
    trainer.step(batch(6, nan=True))
    assert trainer.phase is Phase.PREDICT and trainer.phase_state.steps_in_phase == 5
    assert trainer.metrics.summary()["events"]["batch_check_forwards"] == 2
    assert trainer.host_syncs == syncs  # no reads at unchecked predicted steps
    assert all(np.isfinite(p).all() for p in model.parameters())


def test_a_trainer_without_a_reference_takes_the_first_predicted_batch_as_it(tmp_path):
    """After a resume inside PREDICT there is no accepted batch yet: the first one becomes the reference, with
    no forward pass (which would move the random state or batch-norm statistics of a resumed run)."""
    batches = [next(b) for b in [regression_batches(np, seed=2)] for _ in range(20)]
    trainer, _ = _trainer()
    for b in batches[:FIRST_PREDICT + 2]:
        trainer.step(b)
    trainer.save(tmp_path / "t.ckpt")
    model = LeastSquares(np, seed=1)
    calls = []
    real_loss = model.loss
    model.loss = lambda b: calls.append(1) or real_loss(b)
    resumed = HybridTrainer.load(tmp_path / "t.ckpt", model, PlainSGD(model, 0.05), Confident())
    assert resumed.batch_check.reference is None and resumed.phase is Phase.PREDICT
    resumed.step(batches[FIRST_PREDICT + 2])
    assert calls == [] and resumed.batch_check.reference == describe(batches[0])
    with pytest.raises(BatchError, match="refuses"):
        resumed.step(batches[FIRST_PREDICT + 3][0])


# -- the structure check as a property -------------------------------------------------------------------------


_dtypes = st.sampled_from([np.float64, np.float32, np.int64])
_arrays = st.builds(lambda shape, dtype: np.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple), _dtypes)
_leaves = st.one_of(_arrays, st.integers(), st.floats(allow_nan=False), st.text(max_size=3), st.none())
_batches = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
    st.dictionaries(st.sampled_from(["x", "y", "mask"]), inner, max_size=3)), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(a=_batches, b=_batches)
def test_a_batch_conforms_exactly_when_its_structure_is_the_same_and_merging_takes_both(a, b):
    ref = describe(a)
    assert difference(a, ref) is None
    assert (difference(b, ref) is None) == (describe(b) == ref)
    merged = merge(ref, describe(b))
    assert difference(a, merged) is None and difference(b, merged) is None
    assert merge(merged, describe(b)) == merged  # widening is idempotent


@settings(max_examples=200, deadline=None)
@given(batch=_batches)
def test_zero_samples_means_every_array_with_an_axis_is_empty_along_it(batch):
    arrays = []

    def walk(v):
        if isinstance(v, np.ndarray):
            arrays.append(v)
        elif isinstance(v, dict):
            for w in v.values():
                walk(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                walk(w)

    walk(batch)
    with_axis = [v for v in arrays if v.ndim]
    assert (zero_samples(batch) is not None) == (bool(with_axis) and all(v.shape[0] == 0 for v in with_axis))
