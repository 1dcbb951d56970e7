"""Kernels: reference semantics, run-time selection, lazy imports, CPU fast paths, torch custom ops, bench-kernels.

The interpreted kernels have their own files: tests/test_kernels_triton.py (Triton
under TRITON_INTERPRET=1), tests/test_kernels_pallas.py (Pallas, interpret=True)
and tests/test_kernels_cuda.py (CUDA sources through nvcc and CuPy).
"""

import json
import math
import subprocess
import sys

import array_api_compat
import numpy as np
import pytest
from _namespaces import NAMESPACES, available, namespace
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError, ConfigError, ModelError
from hybrid_core._backend import namespace_for, to_numpy
from hybrid_core.apps.cli import main
from hybrid_core.apps.kernels_bench import parse_size
from hybrid_core.kernels import (
    CHOICES,
    OPS,
    REGISTRY,
    STATS_FIELDS,
    Kernel,
    fused_axpy,
    fused_stats,
    gru_ensemble_rollout,
    reference,
    select,
)
from hybrid_core.kernels._registry import dtype_name

SHAPE_CASES = {
    "odd-sizes": [(7,), (3, 5), (1031,)],
    "one-element": [(1,)],
    "scalar-and-empty": [(), (0,), (2, 3)],
    "many-mixed": [(i * 37 % 211 + 1,) if i % 2 else (i % 5 + 1, i % 7 + 2) for i in range(24)],
    "nonfinite": [(5,), (1100,), (4, 4)],
}
GRU_CASES = {"1x1x1x1": (1, 1, 1, 1), "odd": (3, 4, 5, 7), "no-steps": (2, 0, 3, 4), "wide": (2, 3, 4, 70)}


def tensors(shapes, seed, nonfinite=False):
    """float32 arrays of ``shapes``; with ``nonfinite``, NaN, +inf and -inf planted in the larger ones."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    if nonfinite:
        for a, value in zip([a for a in arrays if a.size > 1], (np.nan, np.inf, -np.inf)):
            a.reshape(-1)[rng.integers(a.size)] = value
    return arrays


def gru_inputs(e, t, d, h, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(e, d, 3 * h), (e, h, 3 * h), (e, 3 * h), (e, 3 * h), (e, h), (e, t, d)]
    return [np.asarray(rng.standard_normal(s) * 0.5, dtype=np.float32) for s in shapes]


def to_backend(name, arrays):
    """Convert NumPy arrays (or a list of them) to the namespace called ``name``."""
    xp = namespace_for(name)
    convert = lambda a: xp.asarray(np.array(a))  # noqa: E731
    return [convert(a) for a in arrays] if isinstance(arrays, list) else convert(arrays)


def assert_stats_close(got, want):
    got, want = np.asarray(to_numpy(got), np.float64), np.asarray(to_numpy(want), np.float64)
    assert got.shape == (len(STATS_FIELDS),)
    # |Σg·u| <= (Σg² + Σu²)/2 bounds the cancellation in the dot product.
    scale = np.nan_to_num(abs(want[1]) + abs(want[2]), posinf=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6)
    assert got[5] == want[5], "non-finite count"


def assert_arrays_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert tuple(g.shape) == tuple(w.shape) and dtype_name(g.dtype) == dtype_name(w.dtype)
        np.testing.assert_allclose(to_numpy(g), to_numpy(w), rtol=1e-5, atol=1e-6)


def run_case(impl, backend, case):
    """Run ``impl`` on ``backend`` and the reference on NumPy for ``case``: (got, want)."""
    if impl.op == "gru_ensemble_rollout":
        args = gru_inputs(*GRU_CASES[case])
        return impl.load()(*to_backend(backend, args)), reference.gru_ensemble_rollout(*args)
    shapes, nonfinite = SHAPE_CASES[case], case == "nonfinite"
    a, b = tensors(shapes, 1, nonfinite), tensors(shapes, 2)
    if impl.op == "fused_axpy":
        return impl.load()(to_backend(backend, a), to_backend(backend, b), -0.375), reference.fused_axpy(a, b, -0.375)
    loss = np.asarray(2.5, np.float32)
    got = impl.load()(to_backend(backend, loss), to_backend(backend, a), to_backend(backend, b))
    return got, reference.fused_stats(loss, a, b)


def check_case(impl, backend, case):
    got, want = run_case(impl, backend, case)
    if impl.op == "fused_axpy":
        assert_arrays_close(got, want)
    elif impl.op == "fused_stats":
        assert_stats_close(got, want)
    else:
        assert tuple(got.shape) == tuple(want.shape)
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-4, atol=1e-5)


def implementation_params(keep):
    """pytest params (impl, backend, case) for every registered implementation ``keep`` accepts.

    Built from the declarations: a combination they rule out on CPU is skipped with
    the declared reason.
    """
    params = []
    for op, impls in REGISTRY.items():
        cases = GRU_CASES if op == "gru_ensemble_rollout" else SHAPE_CASES
        for impl in filter(keep, impls):
            for backend in impl.backends or ("numpy", "array_api_strict", "torch", "jax"):
                reason = impl.rejection(backend, "cpu", "float32", forced=True)
                if reason is None and backend != "numpy" and not available(backend):
                    reason = f"{backend} does not import"
                marks = [pytest.mark.skip(reason=f"{impl.name} on {backend}/cpu: {reason}")] if reason else []
                # Eager JAX compiles every op for every new shape: the 24-tensor case alone takes many seconds.
                slow = impl.name == "reference" and backend == "jax"
                params += [pytest.param(impl, backend, case, id=f"{op}-{impl.name}-{backend}-{case}", marks=marks)
                           for case in cases if not (slow and case == "many-mixed")]
    return params


def native_on_cpu(impl):
    return not ({"cpu"} & set(impl.interpret_devices)) and impl.name != "cupy"


# -- every native CPU implementation (reference, foreach, jit) against the reference ---------------------


@pytest.mark.parametrize(("impl", "backend", "case"), implementation_params(native_on_cpu))
def test_implementation_matches_reference(impl, backend, case):
    check_case(impl, backend, case)


@pytest.mark.skipif(not available("torch"), reason="torch does not import")
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=0, max_size=12), seed=st.integers(0, 2**32 - 1),
       nonfinite=st.booleans(), with_updates=st.booleans())
@example(sizes=[1], seed=0, nonfinite=False, with_updates=True)
def test_foreach_stats_matches_reference_on_random_lists(sizes, seed, nonfinite, with_updates):
    import torch

    from hybrid_core.kernels import _torch

    grads = [torch.from_numpy(a) for a in tensors([(n,) for n in sizes], seed, nonfinite)]
    updates = [torch.from_numpy(a) for a in tensors([(n,) for n in sizes], seed + 1)] if with_updates else None
    loss = torch.tensor(0.25)
    assert_stats_close(_torch.foreach_stats(loss, grads, updates), reference.fused_stats(loss, grads, updates))


# -- reference semantics against independent ground truth -------------------------------------------------


@pytest.mark.parametrize("name", NAMESPACES)
def test_reference_agrees_across_namespaces(name):
    shapes = SHAPE_CASES["nonfinite"]
    g, u, p = tensors(shapes, 3, nonfinite=True), tensors(shapes, 4), tensors(shapes, 5)
    want_stats = reference.fused_stats(np.asarray(1.0, np.float32), g, u)
    want_axpy = reference.fused_axpy(p, u, 0.5)
    want_gru = reference.gru_ensemble_rollout(*gru_inputs(*GRU_CASES["odd"]))
    with namespace(name) as xp:
        conv = lambda arrays: [xp.asarray(np.array(a)) for a in arrays]  # noqa: E731
        stats = reference.fused_stats(xp.asarray(np.float32(1.0)), conv(g), conv(u))
        assert array_api_compat.array_namespace(stats) is xp
        assert_stats_close(stats, want_stats)
        assert_arrays_close([to_numpy(a) for a in reference.fused_axpy(conv(p), conv(u), 0.5)], want_axpy)
        gru = reference.gru_ensemble_rollout(*conv(gru_inputs(*GRU_CASES["odd"])))
        np.testing.assert_allclose(to_numpy(gru), want_gru, rtol=1e-5, atol=1e-6)


def test_reference_stats_closed_form():
    g = [np.array([3.0, -4.0], np.float32), np.array([[np.nan, 1.0]], np.float32), np.array([np.inf], np.float32)]
    u = [np.array([1.0, 2.0], np.float32), np.array([[0.0, 2.0]], np.float32), np.array([1.0], np.float32)]
    finite = reference.fused_stats(np.float32(7.0), g[:1], u[:1])
    np.testing.assert_array_equal(finite, [7.0, 25.0, 5.0, -5.0, 4.0, 0.0])
    bad = reference.fused_stats(np.float32(7.0), g, None)
    assert bad.dtype == np.float32 and math.isnan(bad[1]) and math.isnan(bad[4])
    assert list(bad[[0, 2, 3, 5]]) == [7.0, 0.0, 0.0, 2.0]
    assert list(reference.fused_stats(np.float32(1.0), g[::2], None)[[1, 4, 5]]) == [np.inf, np.inf, 1.0]


@pytest.mark.skipif(not available("torch"), reason="torch does not import")
def test_reference_gru_is_pytorch_gru():
    import torch

    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 7, batch_first=True)
    x, h0 = torch.randn(3, 4, 5), torch.randn(3, 7)
    with torch.no_grad():
        want, _ = gru(x, h0[None])
        stack = lambda w: w.T.expand(3, *w.T.shape)  # noqa: E731
        got = reference.gru_ensemble_rollout(stack(gru.weight_ih_l0), stack(gru.weight_hh_l0),
                                             gru.bias_ih_l0.expand(3, 21), gru.bias_hh_l0.expand(3, 21), h0, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_axpy_keeps_each_parameter_dtype():
    params = [np.ones(3, np.float32), np.ones(2, np.float64)]
    out = fused_axpy(params, [np.ones(3, np.float64), np.ones(2, np.float32)], 2.0)
    assert [o.dtype for o in out] == [np.float32, np.float64]
    assert all((o == 3.0).all() for o in out)
    assert (params[0] == 1.0).all(), "fused_axpy is functional"


# -- selection ---------------------------------------------------------------------------------------------


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv("HYBRID_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("op", OPS)
def test_numpy_selects_reference(auto, op):
    assert select(op, np, "cpu", np.float32).name == "reference"


@pytest.mark.skipif(not available("torch"), reason="torch does not import")
def test_torch_on_cpu_selects_foreach(auto):
    import torch

    cpu = torch.device("cpu")
    assert select("fused_axpy", torch, cpu, torch.float32).name == "foreach"
    assert select("fused_stats", torch, cpu, torch.float64).name == "foreach"
    # No foreach GRU: the batched-matmul reference is the CPU path; Triton is never auto-picked on CPU.
    assert select("gru_ensemble_rollout", torch, cpu, torch.float32).name == "reference"


@pytest.mark.skipif(not available("jax"), reason="jax does not import")
def test_jax_on_cpu_selects_jit(auto):
    import jax.numpy as jnp

    for op in OPS:
        assert select(op, jnp, jnp.zeros(1).device, jnp.float32).name == "jit"


def test_forced_triton_on_cpu_lists_every_rejection(auto, monkeypatch):
    monkeypatch.setenv("HYBRID_KERNELS", "triton")
    with pytest.raises(BackendError) as err:
        select("fused_stats", "torch", "cpu", "float32")
    text = str(err.value)
    for impl in REGISTRY["fused_stats"]:
        assert f"- {impl.name}: " in text
    assert "TRITON_INTERPRET=1" in text and "HYBRID_KERNELS=triton forces triton" in text
    assert "recovery:" in text


def test_forced_name_without_implementation_says_so(auto):
    with pytest.raises(BackendError, match="has no 'foreach' implementation"):
        select("gru_ensemble_rollout", "torch", "cpu", choice="foreach")


def test_forced_reference_wins_over_fast_path(auto, monkeypatch):
    monkeypatch.setenv("HYBRID_KERNELS", "Reference ")
    assert select("fused_axpy", "torch", "cpu", "float32").name == "reference"


@pytest.mark.parametrize("bad", ["fast", "cuda", "triton,pallas"])
def test_unknown_choice_is_a_config_error(auto, monkeypatch, bad):
    monkeypatch.setenv("HYBRID_KERNELS", bad)
    with pytest.raises(ConfigError, match="allowed: auto, reference"):
        select("fused_axpy", np, "cpu")
    with pytest.raises(ConfigError):
        fused_stats(np.float32(1.0), [np.ones(2, np.float32)], None)


def test_unknown_op_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown kernel op"):
        select("fused_adam", np, "cpu")


def test_declarations_are_consistent():
    assert set(REGISTRY) == set(OPS)
    for op, impls in REGISTRY.items():
        assert impls[-1].name == "reference", "the reference is the last resort"
        assert len({k.name for k in impls}) == len(impls)
        for impl in impls:
            assert issubclass(impl, Kernel) and impl.op == op and impl.name in CHOICES
            assert impl.__doc__ and callable(impl.load)
            assert set(impl.interpret_dtypes) <= set(impl.dtypes) or not impl.dtypes


def test_dtype_outside_declaration_is_rejected_with_reason():
    triton_stats = next(k for k in REGISTRY["fused_stats"] if k.name == "triton")
    assert "dtype float64" in triton_stats.rejection("torch", "cuda", "float64")
    assert "interpreter" in triton_stats.rejection("torch", "cpu", "float32")


# -- public dispatch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMESPACES)
def test_public_functions_dispatch_and_match_reference(auto, name):
    shapes = SHAPE_CASES["odd-sizes"]
    g, u = tensors(shapes, 6), tensors(shapes, 7)
    with namespace(name) as xp:
        conv = lambda arrays: [xp.asarray(np.array(a)) for a in arrays]  # noqa: E731
        loss = xp.asarray(np.float32(3.0))
        assert_stats_close(fused_stats(loss, conv(g), None), reference.fused_stats(loss, conv(g), None))
        assert_arrays_close(fused_axpy(conv(g), conv(u), 0.25), reference.fused_axpy(conv(g), conv(u), 0.25))
        args = conv(gru_inputs(*GRU_CASES["odd"]))
        np.testing.assert_allclose(to_numpy(gru_ensemble_rollout(*args)),
                                   to_numpy(reference.gru_ensemble_rollout(*args)), rtol=1e-4, atol=1e-5)


def test_public_functions_check_shapes():
    a = [np.ones(3, np.float32)]
    with pytest.raises(ModelError, match="one array per tensor"):
        fused_axpy(a, [], 1.0)
    with pytest.raises(ModelError, match=r"#0: \(4,\) != \(3,\)"):
        fused_stats(np.float32(0.0), a, [np.ones(4, np.float32)])
    args = gru_inputs(2, 3, 4, 5)
    args[1] = args[1][:, :, :-1]
    with pytest.raises(ModelError, match="w_h"):
        gru_ensemble_rollout(*args)
    assert fused_axpy([], [], 1.0) == []


def test_import_is_lazy():
    code = ("import sys, hybrid_core.kernels; "
            "print(sorted(m for m in ('torch', 'jax', 'triton', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- torch custom ops and torch.compile ---------------------------------------------------------------------


def _compile_check(backend):
    import torch

    from hybrid_core.kernels import _torch  # noqa: F401  (registers torch.ops.hybrid_core.*)

    def step(loss, grads, updates, params, gru_args):
        stats = torch.ops.hybrid_core.fused_stats(loss * 2, grads, updates)
        moved = torch.ops.hybrid_core.fused_axpy(params, grads, 0.5)
        return stats, moved, torch.ops.hybrid_core.gru_ensemble_rollout(*gru_args)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    grads = [torch.from_numpy(a) for a in tensors([(5,), (3, 4)], 8)]
    params = [torch.from_numpy(a) for a in tensors([(5,), (3, 4)], 9)]
    gru_args = [torch.from_numpy(a) for a in gru_inputs(2, 3, 4, 5)]
    loss = torch.tensor(1.5)
    stats, moved, states = compiled(loss, grads, grads, params, gru_args)
    assert_stats_close(stats, reference.fused_stats(loss * 2, grads, grads))
    assert_arrays_close(moved, reference.fused_axpy(params, grads, 0.5))
    torch.testing.assert_close(states, reference.gru_ensemble_rollout(*gru_args))


@pytest.mark.skipif(not available("torch"), reason="torch does not import")
def test_custom_ops_trace_under_torch_compile():
    # aot_eager runs dynamo + AOTAutograd (the fake kernels) without a C++ build: seconds, not minutes.
    _compile_check("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not available("torch"), reason="torch does not import")
def test_custom_ops_under_inductor():
    _compile_check("inductor")


# -- bench-kernels -----------------------------------------------------------------------------------------


def test_parse_size():
    assert [parse_size(s) for s in ("50000", "100k", "1.5m", "1e3")] == [50000, 100000, 1500000, 1000]
    for bad in ("0", "-5", "big", "1g"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_bench_kernels_command(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["bench-kernels", "--sizes", "2k", "--repeat", "1", "--backends", "numpy", "torch",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vs loop" in printed and "fused_stats" in printed
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["backend"], r["implementation"]) for r in rows} >= {
        ("fused_axpy", "numpy/cpu", "reference"), ("fused_stats", "numpy/cpu", "reference")}
    assert all(r["median_ms"] > 0 for r in rows)
    with pytest.raises(SystemExit) as bad:  # a usage error: argparse's exit code 2, before any work
        main(["bench-kernels", "--sizes", "lots"])
    assert bad.value.code == 2
