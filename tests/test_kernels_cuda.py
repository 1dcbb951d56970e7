"""The CUDA C kernels (kernels/cuda/*.cu): PTX compilation, CuPy runs on a GPU, and a CPU emulation of the sources.

Without a GPU the CuPy tests skip. The emulation still runs the exact .cu text:
g++ compiles it with a small prelude in which a thread block is real threads and
__syncthreads() is a std::barrier, so the indexing, the block tables and the
barriers are checked against the reference on this CPU.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hybrid_core.kernels import REGISTRY, reference
from hybrid_core.kernels._tables import block_table

SOURCES = sorted((Path(__file__).parents[1] / "kernels" / "cuda").glob("*.cu"))
CUPY = {op: next(k for k in impls if k.name == "cupy") for op, impls in REGISTRY.items()}


def test_every_op_has_a_cuda_source():
    assert {p.stem for p in SOURCES} == set(REGISTRY)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_to_ptx(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to check the CUDA sources)")
    ptx = tmp_path / f"{source.stem}.ptx"
    done = subprocess.run([nvcc, "--ptx", "-std=c++14", "-o", str(ptx), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    assert ".entry" in text and all(f"{name}" in text for name in _entries(source))


def _entries(source):
    return [line.split("void ")[1].split("(")[0] for line in source.read_text().splitlines()
            if line.startswith('extern "C" __global__ void ')]


# -- CuPy on a GPU -------------------------------------------------------------------------------------------


def _gpu_skip_reason():
    try:
        import cupy
    except ImportError as exc:
        return f"cupy does not import ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA GPU ({str(exc).splitlines()[0]})"
    return None if count else "no CUDA GPU"


@pytest.mark.parametrize("op", list(CUPY))
def test_cupy_kernel_matches_reference(op):
    reason = _gpu_skip_reason() or CUPY[op].rejection("cupy", "cuda", "float32", forced=True)
    if reason:
        pytest.skip(f"cupy kernels need a GPU: {reason}")
    import cupy

    run = CUPY[op].load()
    if op == "gru_ensemble_rollout":
        host = _gru_args(2, 5, 6, 37)
        np.testing.assert_allclose(cupy.asnumpy(run(*map(cupy.asarray, host))),
                                   reference.gru_ensemble_rollout(*host), rtol=1e-4, atol=1e-5)
        return
    a, b = _lists(0), _lists(1)
    if op == "fused_axpy":
        for g, w in zip(run([cupy.asarray(x) for x in a], [cupy.asarray(x) for x in b], 0.5),
                        reference.fused_axpy(a, b, 0.5)):
            np.testing.assert_allclose(cupy.asnumpy(g), w, rtol=1e-6, atol=1e-6)
        return
    loss = np.asarray(1.0, np.float32)
    _assert_stats(cupy.asnumpy(run(cupy.asarray(loss), [cupy.asarray(x) for x in a], [cupy.asarray(x) for x in b])),
                  reference.fused_stats(loss, a, b))


# -- the same sources on the CPU, one std::thread per CUDA thread ------------------------------------------

PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::exp; using std::fabs; using std::nan; using std::tanh;
struct Index { unsigned x, y, z; };
thread_local Index threadIdx, blockIdx;
Index blockDim, gridDim;
std::barrier<>* block_barrier;
void __syncthreads() { block_barrier->arrive_and_wait(); }
alignas(16) unsigned char shared_bytes[1 << 16];
#define __global__
#define __device__
#define __align__(n)
template <typename F> void launch(unsigned grid, unsigned block, F body) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {  // blocks one after another: `static` stands for __shared__
        std::barrier<> barrier(block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] { blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; body(); });
        for (auto& thread : threads) thread.join();
    }
}
"""
LAUNCHERS = {
    "fused_axpy": r"""
extern "C" void run_axpy(unsigned g, unsigned b, const long long* m, long long n, float s) {
    launch(g, b, [=] { fused_axpy_f32(m, n, s); }); }""",
    "fused_stats": r"""
extern "C" void run_partials(unsigned g, unsigned b, const long long* m, long long n, int u, double* p) {
    launch(g, b, [=] { stats_partials_f32(m, n, u, p); }); }
extern "C" void run_finish(unsigned g, unsigned b, const double* p, long long n, const float* l, float* o) {
    launch(g, b, [=] { stats_finish_f32(p, n, l, o); }); }""",
    "gru_ensemble_rollout": r"""
extern "C" void run_gru(unsigned g, unsigned b, const float* wx, const float* wh, const float* bx, const float* bh,
                        const float* h0, const float* x, float* o, long long t, long long d, long long h) {
    launch(g, b, [=] { gru_rollout_f32(wx, wh, bx, bh, h0, x, o, t, d, h); }); }""",
}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """op -> ctypes library of that op's .cu source built for the CPU emulation."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not on PATH (the CPU emulation of the CUDA sources needs a C++20 compiler)")
    libraries = {}
    for source in SOURCES:
        # __shared__ arrays become block-wide statics; the extern (dynamic) one is the prelude's buffer.
        body = source.read_text().replace("extern __shared__", "extern").replace("__shared__", "static")
        path = tmp_path_factory.mktemp("cuda") / f"{source.stem}.cpp"
        path.write_text(PRELUDE + body + LAUNCHERS[source.stem])
        done = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o",
                               str(path.with_suffix(".so")), str(path)], capture_output=True, text=True)
        if done.returncode and "barrier" in done.stderr:
            pytest.skip(f"{compiler} lacks C++20 <barrier>: {done.stderr.splitlines()[0]}")
        assert done.returncode == 0, done.stderr
        libraries[source.stem] = ctypes.CDLL(str(path.with_suffix(".so")))
    return libraries


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data)


def _lists(seed, plant=False):
    rng = np.random.default_rng(seed)
    shapes = [(1,), (7,), (4096,), (4097,), (0,), (3, 5), (9000,)]
    out = [np.asarray(rng.standard_normal(s) * 3, dtype=np.float32) for s in shapes]
    if plant:
        out[1][3], out[3][4096], out[6][17] = np.nan, np.inf, -np.inf
    return out


def _gru_args(e, t, d, h):
    rng = np.random.default_rng(5)
    return [np.asarray(rng.standard_normal(s) * 0.5, dtype=np.float32)
            for s in [(e, d, 3 * h), (e, h, 3 * h), (e, 3 * h), (e, 3 * h), (e, h), (e, t, d)]]


def _assert_stats(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.nan_to_num(abs(want[1]) + abs(want[2]), posinf=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6)
    assert got[5] == want[5]


def test_emulated_axpy_matches_reference(emulated):
    params, direction = _lists(0), _lists(1)
    out = [np.empty_like(p) for p in params]
    table, blocks = block_table([p.size for p in params], [a.ctypes.data for c in (params, direction, out) for a in c],
                                4096)
    emulated["fused_axpy"].run_axpy(blocks, 64, _ptr(table), ctypes.c_longlong(len(params)), ctypes.c_float(-0.75))
    for got, want in zip(out, reference.fused_axpy(params, direction, -0.75)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_updates", [True, False], ids=["updates", "no-updates"])
def test_emulated_stats_matches_reference(emulated, with_updates):
    grads, updates = _lists(2, plant=True), _lists(3)
    table, blocks = block_table([g.size for g in grads], [a.ctypes.data for c in (grads, updates) for a in c], 4096)
    partials = np.zeros((blocks, 6), np.float64)
    loss, out = np.asarray([1.5], np.float32), np.empty(6, np.float32)
    lib = emulated["fused_stats"]
    lib.run_partials(blocks, 256, _ptr(table), ctypes.c_longlong(len(grads)), int(with_updates), _ptr(partials))
    lib.run_finish(1, 256, _ptr(partials), ctypes.c_longlong(blocks), _ptr(loss), _ptr(out))
    _assert_stats(out, reference.fused_stats(loss[0], grads, updates if with_updates else None))


@pytest.mark.parametrize(("e", "t", "d", "h"), [(1, 1, 1, 1), (3, 4, 5, 7), (2, 3, 6, 40)])
def test_emulated_gru_matches_reference(emulated, e, t, d, h):
    args = _gru_args(e, t, d, h)
    out = np.empty((e, t, h), np.float32)
    threads = 32  # fewer threads than units for h=40: each thread owns several units
    emulated["gru_ensemble_rollout"].run_gru(e, threads, *map(_ptr, args), _ptr(out), ctypes.c_longlong(t),
                                             ctypes.c_longlong(d), ctypes.c_longlong(h))
    np.testing.assert_allclose(out, reference.gru_ensemble_rollout(*args), rtol=1e-5, atol=1e-6)
