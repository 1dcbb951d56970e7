"""Random state in checkpoints: the process-global generators (Python, NumPy, torch) are saved and restored."""

import copy
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_core import CheckpointError, CheckpointPolicy, HybridConfig, HybridTrainer
from hybrid_core._persist import read_checkpoint, restore_parts, write_checkpoint
from hybrid_core._rng import GlobalRandomState
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

HERE = Path(__file__).parent
CHILD = str(HERE / "_resume_child.py")
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
HAS_JAX = all(importlib.util.find_spec(m) for m in ("jax", "optax"))


def _child(*args):
    run = subprocess.run([sys.executable, CHILD, *args], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("backend", [
    "numpy-dropout",  # input dropout from NumPy's global generator and Python's random; the RSSM's own generator
    pytest.param("torch-dropout", marks=[pytest.mark.slow, needs_torch]),  # nn.Dropout: torch's CPU generator
    pytest.param("jax-dropout", marks=[pytest.mark.slow, pytest.mark.skipif(not HAS_JAX, reason="no jax/optax")]),
])
def test_resume_with_dropout_in_a_new_process_is_bit_exact(backend, tmp_path):
    """Saved midway in one process, loaded into a differently seeded model in another: bit for bit."""
    path = str(tmp_path / "run.ckpt")
    straight = _child("straight", backend, path, "100", "100")
    first = _child("first", backend, path, "100", "100")
    second = _child("second", backend, path, "100", "100")
    assert straight["records"][:100] == first["records"]
    assert second["records"] == straight["records"]
    assert second["params"] == straight["params"]
    assert {"warmup", "full", "predict", "correct"} <= {r[1] for r in straight["records"]}


# -- the part on its own -------------------------------------------------------------------------------


def _draws():
    """The next values of every process-global generator (consumes them)."""
    values = [random.random(), random.gauss(0.0, 1.0), *np.random.standard_normal(3).tolist()]
    if HAS_TORCH:
        import torch

        values += torch.rand(3, dtype=torch.float64).tolist()
    return values


def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    if HAS_TORCH:
        import torch

        torch.manual_seed(seed)


def _round_trip(part, state, tmp_path):
    """``state`` written to a checkpoint file and loaded into ``part`` the way a trainer does."""
    holder = type("Holder", (), {"state_dict": lambda self: state})()
    path = tmp_path / "rng.ckpt"
    write_checkpoint(path, {}, {"rng": holder})
    restore_parts({"rng": part}, read_checkpoint(path)["parts"], np, None)


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), before=st.integers(0, 5), between=st.integers(0, 5),
       reseed=st.integers(0, 2**32 - 1))
def test_loading_puts_every_generator_back_where_it_was_saved(seed, before, between, reseed, tmp_path):
    part = GlobalRandomState()
    _seed(seed)
    for _ in range(before):
        _draws()
    state = part.state_dict()
    expected = _draws()
    _seed(reseed)
    for _ in range(between):
        _draws()
    _round_trip(part, state, tmp_path)
    assert _draws() == expected


def test_saving_only_reads_the_generators():
    _seed(3)
    GlobalRandomState().state_dict()
    with_save = _draws()
    _seed(3)
    assert _draws() == with_save


def _leaf_paths(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaf_paths(v, (*path, i))
    yield path


REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(0, 2**32 - 1), max_size=4),
    st.builds(lambda n, dtype: np.zeros(n, dtype=dtype), st.integers(0, 700),
              st.sampled_from([np.uint8, np.uint32, np.int64, np.float64])))
"""Values a hostile or damaged file could hold in place of any node."""


def _mutate(state, path, how, replacement=None):
    """``state`` with the node at ``path`` deleted, replaced, retyped, deepened, enlarged, truncated or NaN."""
    state = copy.deepcopy(state)
    if not path:
        return {"deleted": state} if how == "deepen" else replacement if how == "replace" else {}
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    key, node = path[-1], parent[path[-1]]
    if how == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif how == "replace":
        parent[key] = replacement
    elif how == "retype":
        parent[key] = "text" if not isinstance(node, str) else 7
    elif how == "deepen":
        parent[key] = [[node]]
    elif how == "enlarge":
        parent[key] = np.concatenate([node, node]) if isinstance(node, np.ndarray) else (
            node * 10**30 if isinstance(node, int) else [node] * 3)
    elif how == "truncate":
        if isinstance(node, dict):
            parent[key] = dict(list(node.items())[: len(node) // 2])
        else:
            parent[key] = node[: len(node) // 2] if hasattr(node, "__len__") else -1
    elif how == "nan":
        parent[key] = np.full_like(node, np.nan, dtype=float) if isinstance(node, np.ndarray) else float("nan")
    return state


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), how=st.sampled_from(["delete", "replace", "retype", "deepen", "enlarge", "truncate", "nan"]),
       replacement=REPLACEMENTS)
def test_a_malformed_random_state_is_refused_and_changes_no_generator(data, how, replacement, tmp_path):
    """Any node of a saved state deleted or damaged: `CheckpointError` and no generator moved, or a valid load."""
    part = GlobalRandomState()
    _seed(11)
    good = part.state_dict()
    path = data.draw(st.sampled_from(list(_leaf_paths(good))))
    bad = _mutate(good, path, how, replacement)
    _seed(12)
    before = part.state_dict()
    try:
        _round_trip(part, bad, tmp_path)
    except CheckpointError as err:
        assert "rng" in err.message
        assert _same(part.state_dict(), before), f"{how} at {path}: a refused state changed a generator"
    # Or it loaded: then it was a valid state (say, another float for the cached Gaussian).


def _set(path, value):
    def damage(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value(node[path[-1]]) if callable(value) else value
        return state

    return damage


@pytest.mark.parametrize("damage", [
    _set(("python", "gauss_next"), float("nan")),
    _set(("numpy", "gauss"), float("inf")),
    _set(("numpy", "gauss"), KeyError),
    _set(("numpy", "has_gauss"), 2),
    _set(("numpy", "has_gauss"), KeyError),
    _set(("numpy", "state", "pos"), -1),
    _set(("numpy", "state", "pos"), 625),
    _set(("numpy", "state", "key"), lambda key: np.concatenate([key, key])),
    _set(("numpy", "extra"), 1),
], ids=["python NaN gauss", "numpy Inf gauss", "numpy no gauss", "has_gauss 2", "no has_gauss", "pos -1",
        "pos 625", "key of 1248", "extra key"])
def test_states_python_or_numpy_would_take_are_refused_when_damaged(damage):
    """Python and NumPy accept these (a NaN Gaussian, a longer MT19937 key, pos −1, …); the part does not."""
    part = GlobalRandomState()
    _seed(13)
    before = part.state_dict()
    with pytest.raises(CheckpointError, match=r"random state (python|numpy)"):
        part.load_state_dict(damage(part.state_dict()))
    assert _same(part.state_dict(), before)


def test_a_refused_state_names_the_generator_and_field():
    part = GlobalRandomState()
    state = part.state_dict()
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"][:10]
    with pytest.raises(CheckpointError, match="random state numpy"):
        part.load_state_dict(state)
    state = part.state_dict()
    state["numpy"]["bit_generator"] = "PCG64"
    with pytest.raises(CheckpointError, match="PCG64") as err:
        part.load_state_dict(state)
    assert "set_bit_generator" in err.value.recovery


# -- torch: CPU, CUDA, absent --------------------------------------------------------------------------


@needs_torch
def test_without_cuda_in_use_no_cuda_state_is_saved():
    import torch

    state = GlobalRandomState().state_dict()
    assert state["torch"]["cuda"] == [] or torch.cuda.is_initialized()
    assert np.array_equal(state["torch"]["cpu"], torch.get_rng_state().numpy())


@needs_torch
def test_cuda_available_but_not_initialized_is_neither_read_nor_started(monkeypatch):
    import torch

    def fail():
        raise AssertionError("reading a CUDA generator would initialize CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", fail)
    assert GlobalRandomState().state_dict()["torch"]["cuda"] == []


class _FakeCuda:
    """torch.cuda for one device whose generator state is 16 bytes, recording what is set."""

    def __init__(self, count=1):
        import torch

        self.count = count
        self.states = [torch.arange(16, dtype=torch.uint8) + i for i in range(count)]
        self.set_calls = []

    def install(self, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_calls.append)


@needs_torch
def test_cuda_generator_states_are_saved_and_restored_when_cuda_is_in_use(monkeypatch, tmp_path):
    cuda = _FakeCuda(count=2)
    cuda.install(monkeypatch)
    part = GlobalRandomState()
    state = part.state_dict()
    assert [s.tolist() for s in state["torch"]["cuda"]] == [s.tolist() for s in cuda.states]
    cuda.states = [s + 100 for s in cuda.states]  # the devices' generators move on
    _round_trip(part, state, tmp_path)
    assert len(cuda.set_calls) == 1
    assert [s.tolist() for s in cuda.set_calls[0]] == [s.tolist() for s in state["torch"]["cuda"]]


@needs_torch
def test_a_cuda_state_of_another_size_is_refused_before_anything_changes(monkeypatch):
    cuda = _FakeCuda()
    cuda.install(monkeypatch)
    part = GlobalRandomState()
    state = part.state_dict()
    state["torch"]["cuda"][0] = np.zeros(8, dtype=np.uint8)
    before = part.state_dict()
    with pytest.raises(CheckpointError, match="cuda"):
        part.load_state_dict(state)
    assert cuda.set_calls == [] and _same(part.state_dict(), before)


@needs_torch
def test_cuda_states_for_another_device_count_warn_and_the_rest_is_restored(monkeypatch):
    import torch

    cuda = _FakeCuda()
    cuda.install(monkeypatch)
    part = GlobalRandomState()
    _seed(5)
    state = part.state_dict()
    expected = _draws()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a machine without CUDA
    _seed(6)
    with pytest.warns(RuntimeWarning, match="1 CUDA devices, this process has 0"):
        part.load_state_dict(state)
    assert cuda.set_calls == [] and _draws() == expected


@needs_torch
def test_torch_state_in_a_process_without_torch_warns_and_the_rest_is_restored(monkeypatch):
    part = GlobalRandomState()
    _seed(8)
    state = part.state_dict()
    expected = _draws()[:5]  # Python's and NumPy's
    _seed(9)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.warns(RuntimeWarning, match="torch does not import"):
        part.load_state_dict(state)
    assert [random.random(), random.gauss(0.0, 1.0), *np.random.standard_normal(3).tolist()] == expected


@needs_torch
def test_a_state_without_torch_leaves_torchs_generator_alone():
    import torch

    part = GlobalRandomState()
    state = part.state_dict()
    state["torch"] = None  # saved before torch was imported
    torch.manual_seed(4)
    before = torch.get_rng_state()
    part.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), before)


# -- in the trainer ------------------------------------------------------------------------------------


def _trainer(seed=0):
    model = MLP([6, 5, 3], dtype=np.float64, seed=seed)
    trainer = HybridTrainer(model, Adam(model, lr=0.01), HybridConfig(warmup_steps=5, min_full_steps=5))
    rng = np.random.default_rng(0)
    for _ in range(12):
        trainer.step((rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)))
    return trainer, model


def test_load_restore_and_a_resuming_fit_set_the_process_generators(tmp_path):
    trainer, _ = _trainer()
    _seed(21)
    trainer.save(tmp_path / "a.ckpt")
    expected = _draws()
    _seed(22)
    model2 = MLP([6, 5, 3], dtype=np.float64, seed=1)
    HybridTrainer.load(tmp_path / "a.ckpt", model2, Adam(model2, lr=0.01))
    assert _draws() == expected
    _seed(23)
    trainer.restore(tmp_path / "a.ckpt")
    assert _draws() == expected
    policy_dir = tmp_path / "auto"
    policy_dir.mkdir()
    (policy_dir / f"step-000000012-{trainer.run_id}.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes())
    _seed(24)
    model3 = MLP([6, 5, 3], dtype=np.float64, seed=2)  # a new process would build a fresh trainer
    fresh = HybridTrainer(model3, Adam(model3, lr=0.01), trainer.config)
    fresh.fit(lambda i: None, 0, progress=False, checkpoint=CheckpointPolicy(policy_dir, run_id=trainer.run_id))
    assert fresh.metrics.summary()["events"]["resumed"] == 1
    assert _draws() == expected


def test_a_checkpoint_without_the_rng_part_loads_and_leaves_the_generators(tmp_path):
    trainer, model = _trainer()
    parts = {k: v for k, v in trainer.parts().items() if k != "rng"}
    write_checkpoint(tmp_path / "old.ckpt", trainer.config.to_dict(), parts,
                     {"dynamics_type": type(trainer.dynamics).__name__})
    _seed(31)
    before = GlobalRandomState().state_dict()
    model2 = MLP([6, 5, 3], dtype=np.float64, seed=1)
    HybridTrainer.load(tmp_path / "old.ckpt", model2, Adam(model2, lr=0.01))
    assert _same(GlobalRandomState().state_dict(), before)
    assert all(np.array_equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_refused_rng_part_leaves_the_model_and_the_generators_unchanged(tmp_path):
    trainer, _ = _trainer()
    bad = GlobalRandomState().state_dict()
    bad["python"]["internal"] = bad["python"]["internal"][:100]
    parts = {**trainer.parts(), "rng": type("Bad", (), {"state_dict": lambda self: bad})()}
    write_checkpoint(tmp_path / "bad.ckpt", trainer.config.to_dict(), parts,
                     {"dynamics_type": type(trainer.dynamics).__name__})
    other, model = _trainer(seed=1)
    other.step((np.ones((8, 6)), np.zeros(8, dtype=np.int64)))
    other.flush()
    params = [p.copy() for p in model.parameters()]
    moments = [m.copy() for m in other.optimizer.state_dict()["exp_avg"]]
    steps = (other.state.step, other.optimizer.state_dict()["step"])
    _seed(41)
    before = GlobalRandomState().state_dict()
    with pytest.raises(CheckpointError, match=r"'rng'.*random state python"):
        other.restore(tmp_path / "bad.ckpt")
    assert all(np.array_equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(np.array_equal(a, b) for a, b in zip(moments, other.optimizer.state_dict()["exp_avg"]))
    assert (other.state.step, other.optimizer.state_dict()["step"]) == steps == (13, 13)
    assert _same(GlobalRandomState().state_dict(), before)
