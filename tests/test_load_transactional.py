"""A load happens whole or not at all: any malformed checkpoint gives `CheckpointError` and changes nothing.

The property test mutates a valid checkpoint structurally (delete, retype, deepen, enlarge, NaN-fill, at
any place of any part) and loads it into a trainer whose every part differs from the file's: the load
either succeeds (and the trainer then steps on, raising nothing but `HybridError`s) or raises
`CheckpointError` and leaves every parameter, optimizer buffer and part state bit for bit as it was.
"""

import copy
import hashlib
import pathlib
import tempfile
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybrid_core import CheckpointError, CheckpointPolicy, ConfigError, HybridConfig, HybridError, HybridTrainer
from hybrid_core._codec import decode, encode, read_file, write_atomic
from hybrid_core._persist import _host
from hybrid_core.callbacks import EarlyStopping, ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

CONFIG = HybridConfig(warmup_steps=6, min_full_steps=4, max_predict_steps=8, horizon_arms=(0, 4, 8), check_interval=2,
                      correct_steps=3, confidence_threshold=0.0, horizon_ladder=False, direction="linefit",
                      linefit_spacing=2, readout_spacing=2, readout_check_every=4, read_every=4, lr_search_steps=10_000,
                      history_size=32, metrics_max_records=50)


def batch(seed, i):
    rng = np.random.default_rng([seed, i])
    x = rng.normal(size=(16, 6))
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)


def trained(seed, until_predict=True, steps=60):
    """A trainer after ``steps`` steps (then on to a PREDICT phase under way, so a cycle is in flight)."""
    model = MLP([6, 8, 3], dtype=np.float64, seed=seed)
    trainer = HybridTrainer(model, Adam(model, lr=0.02), CONFIG)
    i = 0
    while i < steps or (until_predict and not (trainer.phase.value == "predict"
                                               and trainer.phase_state.steps_in_phase)):
        trainer.step(batch(seed, i))
        i += 1
        assert i < 400, "no PREDICT phase started"
    trainer.flush()
    return trainer


def with_callbacks(trainer, value, epoch):
    """A data position and attached stateful callbacks (EarlyStopping with best weights, ValidationLogger rows)."""
    trainer.data_position.load_state_dict({"epoch": epoch, "batch": 3 + epoch, "generators": None})
    stopper = EarlyStopping(lambda: value, every=1, patience=5)
    stopper.on_fit_start(trainer)
    logger = ValidationLogger(lambda: value, every=1)
    trainer.callback_states.attach([stopper, logger])
    stopper.load_state_dict({"best": value, "best_step": 10 + epoch, "evaluations": 3, "bad_evaluations": epoch,
                             "stopped_step": None, "best_params": [p * value for p in trainer.model.parameters()]})
    logger.load_state_dict({"rows": [{"step": 5, "value": value, "weights": "raw", "seconds": value}]})


def fingerprint(trainer):
    """Bytes of every part's state (parameters and optimizer buffers included): equal iff bit-identical."""
    parts = {name: part.state_dict() for name, part in trainer.parts().items()}
    return hashlib.sha256(encode(parts, _host)).hexdigest()


def params_bytes(trainer):
    return [(p.dtype.str, p.shape, p.tobytes()) for p in trainer.model.parameters()]


class World:
    """The source file (a run with a cycle in flight) and the target trainer with a home file of its own."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="hpt-load-")  # removed when the test session ends
        self.dir = pathlib.Path(self._tmp.name)
        source = trained(seed=1, steps=30)
        with_callbacks(source, 0.5, epoch=2)
        source.save(self.dir / "source.ckpt")
        self.source = read_file(self.dir / "source.ckpt")
        self.payload = encode(self.source, _host)
        self.target = trained(seed=2, until_predict=False, steps=37)
        with_callbacks(self.target, 0.7, epoch=1)
        self.target.cadence.unconfident = 1  # one unconfident decision: a state the source's cadence has not
        self.home = self.dir / "home.ckpt"
        self.target.save(self.home)

    def fresh_source(self):
        return decode(self.payload)  # a deep copy of the source document

    def reset(self):
        self.target.restore(self.home)
        return fingerprint(self.target), params_bytes(self.target)


_WORLD = None


def world():
    global _WORLD
    if _WORLD is None:
        _WORLD = World()
    return _WORLD


def write(path, doc):
    write_atomic(path, encode(doc, _host, max_depth=10_000))


def test_the_source_and_target_differ_in_every_part():
    w = world()
    w.reset()
    mine = {name: encode(part.state_dict(), _host) for name, part in w.target.parts().items()}
    theirs = {name: encode(state, _host) for name, state in w.source["parts"].items()}
    same = sorted(name for name in mine if mine[name] == theirs[name] and name not in ("directions", "real_steps",
                                                                                          "freeze", "rng"))
    assert same == [], same  # (no state, no eager path, no freezing on NumPy, one process: equal by nature)
    assert w.source["parts"]["cycle"]["run"] is not None and w.source["parts"]["phase"]["phase"] == "predict"
    assert w.source["parts"]["lr"]["x0"] is not None and w.source["parts"]["directions"]["snapshots"]
    assert w.source["parts"]["residuals"]["items"] and w.source["parts"]["readout"]["snapshots"]


# -- the property ----------------------------------------------------------------------------------------------

_RETYPES = [None, "x", 1.5, -1, True, [], {}, [1, 2], {"a": 1}, np.zeros(3), 2**70]


def _children(node):
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


def _mutated(value, how, draw):
    """``value`` changed by ``how`` (None: delete it)."""
    if how == "delete":
        return None
    if how == "retype":
        return copy.deepcopy(draw(st.sampled_from([r for r in _RETYPES if type(r) is not type(value)])))
    if how == "deepen":
        for _ in range(draw(st.sampled_from([3, 70, 300]))):
            value = [value]
        return value
    if how == "nan":
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating) and value.size:
            out = value.copy()
            fill = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            if draw(st.booleans()):
                out[...] = fill
            else:
                out.flat[draw(st.integers(0, out.size - 1))] = fill
            return out
        return draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    # enlarge
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(st.sampled_from([10**12, 2**63 - 1, value * 1000 + 7, -value - 1]))
    if isinstance(value, float):
        return draw(st.sampled_from([1e308, -1e308, value * 1e6]))
    if isinstance(value, np.ndarray):
        axis = draw(st.integers(0, max(value.ndim - 1, 0)))
        return np.concatenate([value, value], axis=axis) if value.ndim else np.stack([value, value])
    if isinstance(value, list):
        return value * draw(st.sampled_from([2, 50])) + ([copy.deepcopy(value[0])] if value else [1.0])
    if isinstance(value, dict):
        return {**value, "unexpected": 1}
    return value * 3 if isinstance(value, str) else value


@st.composite
def mutations(draw):
    """A path into the source document (mostly inside one part) and what to do there."""
    doc_keys = ["trainer_format", "library_version", "config", "dynamics_type", "run", "parts"]
    path = ["parts", draw(st.sampled_from(sorted(world().source["parts"])))] if draw(st.integers(0, 9)) else [
        draw(st.sampled_from(doc_keys))]
    node = world().source
    for key in path:
        node = node[key]
    for _ in range(draw(st.integers(0, 5))):
        keys = _children(node)
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        path.append(key)
        node = node[key]
    how = draw(st.sampled_from(["delete", "retype", "deepen", "enlarge", "nan"]))
    return path, how


_PROPERTY = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=100, **_PROPERTY)
@given(mutation=mutations(), data=st.data(), via_load=st.booleans())
def test_a_mutated_checkpoint_loads_whole_or_changes_nothing(mutation, data, via_load):
    check_mutation(mutation, data, via_load)


@pytest.mark.slow
@settings(max_examples=1500, **_PROPERTY)
@given(mutation=mutations(), data=st.data(), via_load=st.booleans())
def test_many_mutated_checkpoints_load_whole_or_change_nothing(mutation, data, via_load):
    check_mutation(mutation, data, via_load)


def check_mutation(mutation, data, via_load):
    """Load the source document changed by ``mutation`` (restore, or load around the target's model and optimizer)."""
    w = world()
    path, how = mutation
    doc = w.fresh_source()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    new = _mutated(parent[path[-1]], how, data.draw)
    if new is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    file = w.dir / "mutated.ckpt"
    write(file, doc)
    before, params = w.reset()
    try:
        if via_load:  # a new trainer around the target's model and optimizer, from the file's config
            runner = HybridTrainer.load(file, w.target.model, w.target.optimizer)
        else:
            runner = w.target
            w.target.restore(file)
    except (CheckpointError, ConfigError) as err:  # ConfigError: a changed config or starting rate
        event(f"{how}: refused")
        assert err.message and err.recovery
        assert params_bytes(w.target) == params, (path, how)
        assert fingerprint(w.target) == before, (path, how)
        return
    event(f"{how}: loaded")
    # A load that succeeds leaves a trainer that runs (or refuses with a HybridError). A value that is legal but
    # absurd (a rate multiplier of 1e300) may overflow: NumPy's warnings about it are no failure here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(4):
            try:
                runner.step(batch(3, i))
                runner.flush()
            except HybridError:
                break


# -- the cases -------------------------------------------------------------------------------------------


def _with(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("path, value", [
    (["parts", "bandit", "pulls"], "x"),
    (["parts", "metrics", "steps"], "x"),
    (["parts", "metrics", "events"], {"checks": "many"}),
    (["parts", "residuals", "total"], -1),
    (["parts", "corrector", "w"], [1.0, 2.0]),
    (["parts", "phase", "steps_in_phase"], True),
    (["parts", "cycle", "run", "applied"], ["x"]),
    (["parts", "state", "step"], "x"),
    (["parts", "readout", "turn"], "x"),
    (["parts", "lr", "history"], [[1, 2]]),
])
def test_a_malformed_later_part_changes_no_part(path, value, monkeypatch):
    w = world()
    file = w.dir / "bad-part.ckpt"
    write(file, _with(w.fresh_source(), path, value))
    before, params = w.reset()
    applied = []
    for name, part in w.target.parts().items():  # nothing may be applied: every state is checked first
        monkeypatch.setattr(type(part), "load_state_dict", lambda self, state, name=name: applied.append(name))
    monkeypatch.setattr(w.target.model, "set_parameters", lambda values: applied.append("set_parameters"))
    with pytest.raises(CheckpointError, match=f"part '{path[1]}'"):
        w.target.restore(file)
    monkeypatch.undo()
    assert applied == []
    assert params_bytes(w.target) == params
    assert fingerprint(w.target) == before


def test_a_deeply_nested_document_is_a_checkpoint_error_and_resume_falls_back(tmp_path):
    w = world()
    deep = 1.0
    for _ in range(400):
        deep = [deep]
    bad = tmp_path / "deep.ckpt"
    write(bad, _with(w.fresh_source(), ["parts", "metrics", "records"], deep))
    before, params = w.reset()
    with pytest.raises(CheckpointError, match="nests deeper than 64 levels"):
        w.target.restore(bad)
    assert fingerprint(w.target) == before and params_bytes(w.target) == params
    folder = tmp_path / "ckpts"
    folder.mkdir()
    run = w.source["run"]["id"]
    write(folder / f"step-000000010-{run}.ckpt", w.fresh_source())
    write(folder / f"step-000000020-{run}.ckpt", _with(w.fresh_source(), ["parts", "metrics", "records"], deep))
    resumed = trained(seed=4, until_predict=False, steps=3)
    resumed.fit(lambda i: batch(5, i), 0, progress=False,
                checkpoint=CheckpointPolicy(folder, every=1000, run_id=run))
    assert resumed.steps_done == w.source["parts"]["state"]["step"]
    assert [p.tobytes() for p in resumed.model.parameters()] == [p.tobytes() for p in
                                                                 w.source["parts"]["model"]["params"]]


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_parameters_are_refused(fill):
    w = world()
    doc = w.fresh_source()
    doc["parts"]["model"]["params"][1][0] = fill
    file = w.dir / "nan-params.ckpt"
    write(file, doc)
    before, params = w.reset()
    with pytest.raises(CheckpointError, match=r"part 'model'.*params\[1\] holds NaN or Inf"):
        w.target.restore(file)
    assert params_bytes(w.target) == params and fingerprint(w.target) == before


def test_non_finite_optimizer_buffers_are_refused():
    w = world()
    doc = w.fresh_source()
    doc["parts"]["optimizer"]["exp_avg_sq"][0][0, 0] = np.nan
    file = w.dir / "nan-moment.ckpt"
    write(file, doc)
    before, params = w.reset()
    with pytest.raises(CheckpointError, match=r"part 'optimizer'.*'exp_avg_sq'\[0\] holds NaN or Inf"):
        w.target.restore(file)
    assert params_bytes(w.target) == params and fingerprint(w.target) == before


def test_a_huge_saved_capacity_allocates_nothing():
    w = world()
    doc = w.fresh_source()
    doc["parts"]["state"]["losses"]["capacity"] = 10**12
    doc["parts"]["metrics"]["max_records"] = 10**12
    doc["parts"]["residuals"]["capacity"] = 10**12
    file = w.dir / "huge.ckpt"
    write(file, doc)
    w.reset()
    tracemalloc.start()
    try:
        w.target.restore(file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    assert w.target.state.losses.capacity == CONFIG.history_size
    assert w.target.state.losses.last().tolist() == doc["parts"]["state"]["losses"]["values"][-CONFIG.history_size:]
    assert len(w.target.metrics.records) <= CONFIG.metrics_max_records


def test_a_valid_checkpoint_still_resumes_bit_exactly():
    w = world()
    file = w.dir / "valid.ckpt"
    write(file, w.fresh_source())
    w.reset()
    w.target.restore(file)
    again = trained(seed=1, steps=30)  # the run the source file was saved from, continued without a break
    for i in range(30):
        w.target.step(batch(7, i))
        again.step(batch(7, i))
    w.target.flush()
    again.flush()
    assert params_bytes(w.target) == params_bytes(again)
    assert encode(w.target.optimizer.state_dict(), _host) == encode(again.optimizer.state_dict(), _host)


# -- the safety net: parts whose load_state_dict refuses what no check caught ---------------------------------------


class InPlace:
    """A part whose state is a live array its load overwrites in place (as torch parameters are)."""

    def __init__(self):
        self.value = np.arange(4.0)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value[...] = state["value"]


class HalfLoads:
    """A part without ``check_state_dict`` that changes itself, then fails with a non-HybridError."""

    def __init__(self, error):
        self.a, self.b, self.error = 1, [2.0], error

    def state_dict(self):
        return {"a": self.a, "b": self.b}

    def load_state_dict(self, state):
        self.a, self.b = state["a"], list(state["b"])
        if state.get("fail"):
            raise self.error


@pytest.mark.parametrize("error", [ZeroDivisionError("boom"), MemoryError(), KeyError("k"), OverflowError()])
def test_every_part_is_put_back_from_real_copies_when_a_load_fails_late(error):
    from hybrid_core._persist import restore_parts

    first, failing, after = InPlace(), HalfLoads(error), HalfLoads(None)
    parts = {"first": first, "failing": failing, "after": after}
    saved = {"first": {"value": np.full(4, 7.0)}, "failing": {"a": 5, "b": [9.0], "fail": True},
             "after": {"a": 6, "b": []}}
    with pytest.raises(CheckpointError, match=f"part 'failing' is not a valid state \\({type(error).__name__}"):
        restore_parts(parts, saved, np, "cpu")
    assert first.value.tolist() == [0.0, 1.0, 2.0, 3.0]  # the copy taken before was not the live array
    assert (failing.a, failing.b) == (1, [2.0])  # the failing part itself is put back too
    assert (after.a, after.b) == (1, [2.0])  # never touched
