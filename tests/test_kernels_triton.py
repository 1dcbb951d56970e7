"""Every Triton kernel matches the reference under Triton's CPU interpreter (float32), on hypothesis inputs.

@triton.jit reads TRITON_INTERPRET when a module is imported, so this file sets it
at import (collection) time, before anything in the process imports triton. If
something imported triton earlier (torch.compile does), the in-process tests skip
and `test_triton_kernels_in_a_fresh_process` runs this file again in a new
interpreter with the variable set.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from _namespaces import available
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hybrid_core import BackendError
from hybrid_core.kernels import REGISTRY, fused_stats, reference, select

pytestmark = pytest.mark.skipif(not available("torch"), reason="torch does not import")

TRITON = {op: next(k for k in impls if k.name == "triton") for op, impls in REGISTRY.items()}
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = (np.nan, np.inf, -np.inf)


def interpreter_problem():
    """Why the Triton kernels cannot run on CPU in this process (from their declarations), or None."""
    return TRITON["fused_stats"].rejection("torch", "cpu", "float32", forced=True)


def kernel(op):
    """The Triton implementation of ``op``, or a skip with the reason its declaration gives."""
    reason = TRITON[op].rejection("torch", "cpu", "float32", forced=True)
    if reason:
        pytest.skip(f"triton on torch/cpu: {reason} (test_triton_kernels_in_a_fresh_process covers it)")
    return TRITON[op].load()


shapes = st.lists(st.one_of(st.just(()), st.tuples(st.integers(0, 2500)),
                            st.tuples(st.integers(1, 30), st.integers(1, 30))), max_size=10)
holes = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL)), max_size=4)
MANY = [(i * 13 % 97 + 1,) if i % 3 else (i % 4 + 1, i % 6 + 1) for i in range(40)] + [(1024,), (1025,), (2049,)]


def tensors(shape_list, seed, plant=()):
    """float32 torch tensors of ``shape_list``; ``plant`` puts non-finite values at (k, value) spots."""
    import torch

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(rng.standard_normal(s) * 3, dtype=np.float32) for s in shape_list]
    filled = [a for a in arrays if a.size]
    for k, value in plant:
        if filled:
            target = filled[k % len(filled)].reshape(-1)
            target[k % target.size] = value
    return [torch.from_numpy(a) for a in arrays]


def assert_stats_close(got, want):
    got, want = got.double().numpy(), want.double().numpy()
    scale = np.nan_to_num(abs(want[1]) + abs(want[2]), posinf=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6)
    assert got[5] == want[5], "non-finite count"


@HYPOTHESIS
@given(shape_list=shapes, seed=st.integers(0, 2**32 - 1), scale=st.floats(-4, 4, width=32))
@example(shape_list=[(1,)], seed=0, scale=0.5)
@example(shape_list=MANY, seed=1, scale=-1.25)
def test_triton_axpy_matches_reference(shape_list, seed, scale):
    run = kernel("fused_axpy")
    params, direction = tensors(shape_list, seed), tensors(shape_list, seed + 1)
    got, want = run(params, direction, scale), reference.fused_axpy(params, direction, scale)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=1e-6)


@HYPOTHESIS
@given(shape_list=shapes, seed=st.integers(0, 2**32 - 1), plant=holes, with_updates=st.booleans())
@example(shape_list=[(1,)], seed=0, plant=[], with_updates=True)
@example(shape_list=[(1,)], seed=0, plant=[(0, np.nan)], with_updates=False)
@example(shape_list=MANY, seed=2, plant=[(3, np.inf), (7, -np.inf), (40, np.nan)], with_updates=True)
@example(shape_list=[(5,), (3,)], seed=3, plant=[(0, np.inf), (1, np.inf)], with_updates=False)
def test_triton_stats_matches_reference(shape_list, seed, plant, with_updates):
    import torch

    run = kernel("fused_stats")
    grads = tensors(shape_list, seed, plant)
    updates = tensors(shape_list, seed + 1) if with_updates else None
    loss = torch.tensor(0.75)
    got = run(loss, grads, updates)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert_stats_close(got, reference.fused_stats(loss, grads, updates))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(e=st.integers(1, 3), t=st.integers(0, 4), d=st.integers(1, 9), h=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
@example(e=1, t=1, d=1, h=1, seed=0)
@example(e=2, t=3, d=65, h=70, seed=1)  # several tiles along D and H
def test_triton_gru_matches_reference(e, t, d, h, seed):
    import torch

    run = kernel("gru_ensemble_rollout")
    rng = np.random.default_rng(seed)
    args = [torch.from_numpy(np.asarray(rng.standard_normal(s) * 0.5, dtype=np.float32))
            for s in [(e, d, 3 * h), (e, h, 3 * h), (e, 3 * h), (e, 3 * h), (e, h), (e, t, d)]]
    got = run(*args)
    torch.testing.assert_close(got, reference.gru_ensemble_rollout(*args), rtol=1e-4, atol=1e-5)


def test_triton_kernels_in_a_fresh_process():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'hybrid-predict-trainer[kernels]')")
    if interpreter_problem() is None:
        pytest.skip("the Triton tests above ran in this process")
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=Path(__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "ran in this process" in skipped[0], done.stdout[-3000:]


COMPILE_FOR_GPU = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybrid_core.kernels import _triton_kernels as k

for name, elem in (("fp32", tl.float32), ("fp16", tl.float16), ("bf16", tl.bfloat16)):
    p = "*" + name
    kernels = [
        (k._axpy_kernel, {"meta": "*i64", "n_tensors": "i32", "scale": "fp32"}, {"ELEM": elem, "BLOCK": k.BLOCK}),
        (k._stats_partials_kernel, {"meta": "*i64", "n_tensors": "i32", "partials": "*fp32"},
         {"ELEM": elem, "HAS_UPDATES": True, "BLOCK": k.BLOCK, "WIDTH": 8, "FMAX": k._FLOAT32_MAX}),
        (k._stats_finish_kernel, {"partials": "*fp32", "n_rows": "i32", "loss": p, "out": p},
         {"WIDTH": 8, "RBLOCK": 256}),
        (k._gru_kernel, {**{a: p for a in ("w_x", "w_h", "b_x", "b_h", "h0", "x", "out")}, "T": "i32", "D": "i32",
                         "H": "i32"}, {"BLOCK_H": 64, "BLOCK_K": 64}),
    ]
    for fn, signature, constants in kernels:
        signature.update({c: "constexpr" for c in constants})
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 80, 32))
        assert compiled.asm["cubin"], fn.__name__
        print("compiled", fn.__name__, name)
"""


def test_triton_kernels_compile_for_a_gpu_without_one(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'hybrid-predict-trainer[kernels]')")
    # A fresh process without the interpreter: triton lowers the kernels to PTX and a cubin (its bundled
    # ptxas) for sm_80, which needs no GPU, so every declared CUDA dtype is at least compiled here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled") == 12, done.stdout


def test_forced_triton_runs_under_the_interpreter(monkeypatch):
    import torch

    kernel("fused_stats")
    monkeypatch.setenv("HYBRID_KERNELS", "triton")
    assert select("fused_stats", torch, torch.device("cpu"), torch.float32).name == "triton"
    grads = tensors([(3,), (1030,)], 5, [(0, np.inf)])
    loss = torch.tensor(2.0)
    assert_stats_close(fused_stats(loss, grads, None), reference.fused_stats(loss, grads, None))
    # The interpreter is float32 only, and auto never picks an interpreter.
    with pytest.raises(BackendError, match="dtype float16"):
        select("fused_stats", torch, "cpu", torch.float16)
    monkeypatch.setenv("HYBRID_KERNELS", "auto")
    assert select("fused_stats", torch, "cpu", torch.float32).name == "foreach"
