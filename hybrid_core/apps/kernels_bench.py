"""`hybrid-train bench-kernels`: time every implementation that can run here against the unfused loop.

The baseline of each row is the op's `reference` on the same backend and device:
it *is* the unfused loop (one array operation per tensor, or per time step). Each
implementation is called once to compile/warm up, then timed ``repeat`` times;
rows report the median. Interpreted kernels (Triton under ``TRITON_INTERPRET=1``,
Pallas with ``interpret=True`` on CPU) are included when they can run, marked as
such: their times measure the interpreter, not the kernel.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from hybrid_core import ConfigError
from hybrid_core.kernels import REGISTRY
from hybrid_core.kernels._registry import device_kind

__all__ = [
    "AXPY_LAYOUTS",
    "AXPY_METHODS",
    "BACKENDS",
    "BenchRow",
    "LayoutRow",
    "format_layouts",
    "format_table",
    "parse_size",
    "run_axpy_layouts",
    "run_bench",
    "write_json",
]

BACKENDS = ("numpy", "torch", "jax", "cupy")
"""Array libraries the benchmark knows how to feed and synchronise."""

_ENSEMBLE, _STEPS, _LAYERS = 4, 16, 8


class BenchRow(NamedTuple):
    """One timed (op, size, backend, implementation)."""

    op: str
    params: int
    backend: str
    implementation: str
    interpreted: bool
    median_ms: float
    speedup: float
    """Reference (unfused loop) median over this implementation's median."""


class LayoutRow(NamedTuple):
    """One timed (layout, method) of the in-place axpy layout report, with every repeat's sample."""

    tensors: int
    elements: int
    """Elements per tensor."""
    method: str
    median_ms: float
    median_ratio: float
    """Median over repeats of this method's time / the limit's time in the same repeat."""
    samples_ms: tuple[float, ...]
    ratios: tuple[float, ...]


AXPY_LAYOUTS = (100, 1000, 10000)
"""Default tensor counts of the layout report (10M parameters as 100×100k, 1000×10k, 10000×1k)."""

AXPY_METHODS = (
    "limit: add_ on one flat buffer",
    "fused_axpy_ on FlatTensors",
    "fused_axpy_ on separate tensors",
    "fused_axpy (new list), separate",
    "fused_axpy (new list), FlatTensors",
    "Python loop of add_",
)
"""What the layout report times, in order; the first is the limit every ratio divides by."""


class _Backend(NamedTuple):
    name: str
    device: str
    convert: Callable[[np.ndarray], Any]
    sync: Callable[[Any], None]


def parse_size(text: str) -> int:
    """A parameter count from '50000', '100k', '1.5m' or '1e6'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([km]?)\s*", text.lower())
    if match is None or float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[match.group(2)] < 1:
        raise ConfigError(f"size {text!r} is not a positive parameter count", "Write sizes like 50000, 100k or 1m.")
    return int(float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[match.group(2)])


def run_bench(sizes: Sequence[str], repeat: int, backends: Sequence[str] = BACKENDS,
              seed: int = 0) -> tuple[list[BenchRow], list[str]]:
    """Time every op for every size on every available backend; the rows and notes on what was skipped."""
    counts = [parse_size(s) for s in sizes]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    available, notes = _available(backends)
    rows = []
    for n in counts:
        inputs = _inputs(n, seed)
        for backend in available:
            for op, args in inputs.items():
                rows.extend(_time_op(op, n, backend, args, repeat, notes))
    return rows, notes


def format_table(rows: Sequence[BenchRow]) -> str:
    """The rows as an aligned text table."""
    header = ("op", "params", "backend", "implementation", "median ms", "vs loop")
    lines = [header] + [(r.op, _human(r.params), r.backend, r.implementation + (" (interp.)" if r.interpreted else ""),
                         f"{r.median_ms:.3f}", f"{r.speedup:.3g}x") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_json(path: str, rows: Sequence[BenchRow], notes: Sequence[str], repeat: int,
               layouts: Sequence[LayoutRow] | None = None) -> None:
    """Write the rows, notes and a description of this machine as JSON (and the axpy layout report, if given)."""
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "repeat": repeat}
    doc: dict[str, Any] = {"machine": machine, "notes": list(notes), "rows": [r._asdict() for r in rows]}
    if layouts is not None:
        import torch

        machine["torch_threads"] = torch.get_num_threads()
        doc["axpy_layouts"] = [r._asdict() for r in layouts]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)


def run_axpy_layouts(total: str | int = "10m", counts: Sequence[int] = AXPY_LAYOUTS, repeat: int = 5,
                     seed: int = 0, device: str = "cpu") -> list[LayoutRow]:
    """Time in-place/out-of-place axpy on ``total`` float32 torch parameters split into ``counts`` equal tensors.

    Per layout, every method in `AXPY_METHODS` is called once to warm up, then
    ``repeat`` rounds each call every method once (the order rotating from round to
    round), so the limit — one ``add_`` on a flat buffer of the same size — is measured
    under the same load as the methods it is compared with.
    """
    import torch

    n = parse_size(total) if isinstance(total, str) else int(total)
    bad = [k for k in counts if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"tensor counts {bad} are not between 1 and the {n} parameters")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k in counts:
        rows.extend(_time_layout(k, n // k, repeat, gen, device, sync))
    return rows


def _time_layout(k: int, size: int, repeat: int, gen: Any, device: str, sync: Callable[[], None]) -> list[LayoutRow]:
    import torch

    from hybrid_core.kernels import flatten, fused_axpy, fused_axpy_

    def separate() -> list[Any]:
        return [torch.randn(size, generator=gen).to(device) for _ in range(k)]

    scale = 1e-3
    flat_p, flat_d = (torch.randn(k * size, generator=gen).to(device) for _ in range(2))
    params, direction = separate(), separate()
    fparams, fdirection = flatten(separate()), flatten(separate())
    calls: dict[str, Callable[[], Any]] = {
        AXPY_METHODS[0]: lambda: flat_p.add_(flat_d, alpha=scale),
        AXPY_METHODS[1]: lambda: fused_axpy_(fparams, fdirection, scale),
        AXPY_METHODS[2]: lambda: fused_axpy_(params, direction, scale),
        AXPY_METHODS[3]: lambda: fused_axpy(params, direction, scale),
        AXPY_METHODS[4]: lambda: fused_axpy(fparams, fdirection, scale),
        AXPY_METHODS[5]: lambda: [p.add_(d, alpha=scale) for p, d in zip(params, direction)],
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    sync()
    order = list(calls)
    for r in range(repeat):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            calls[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    limit = samples[AXPY_METHODS[0]]
    rows = []
    for name, times in samples.items():
        ratios = tuple(t / lim for t, lim in zip(times, limit))
        rows.append(LayoutRow(k, size, name, statistics.median(times), statistics.median(ratios),
                              tuple(times), ratios))
    return rows


def format_layouts(rows: Sequence[LayoutRow]) -> str:
    """The layout report as an aligned text table."""
    header = ("layout", "method", "median ms", "vs limit")
    lines = [header] + [(f"{r.tensors} x {_human(r.elements)}", r.method, f"{r.median_ms:.3f}",
                         f"{r.median_ratio:.2f}x") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _inputs(n: int, seed: int) -> dict[str, tuple[Any, ...]]:
    """Host (NumPy float32) arguments for each op, sized to about ``n`` parameters."""
    rng = np.random.default_rng(seed)
    # A model-like list: per layer a (w, w) weight, a bias and two norm vectors, plus an odd-sized rest.
    width = max(1, int((-3 + math.sqrt(9 + 4 * n / _LAYERS)) / 2))
    shapes = [s for _ in range(_LAYERS) for s in ((width, width), (width,), (width,), (width,))]
    rest = n - sum(math.prod(s) for s in shapes)
    shapes += [(rest,)] if rest > 0 else []

    def arrays() -> list[np.ndarray]:
        return [rng.standard_normal(s, dtype=np.float32) for s in shapes]

    hidden = max(2, int(math.sqrt(n / (6 * _ENSEMBLE))))  # E·(D + H)·3H ≈ n with D = H
    gru = [rng.standard_normal(s, dtype=np.float32) * np.float32(1 / math.sqrt(hidden))
           for s in ((_ENSEMBLE, hidden, 3 * hidden), (_ENSEMBLE, hidden, 3 * hidden), (_ENSEMBLE, 3 * hidden),
                     (_ENSEMBLE, 3 * hidden), (_ENSEMBLE, hidden), (_ENSEMBLE, _STEPS, hidden))]
    return {
        "fused_axpy": (arrays(), arrays(), 0.5),
        "fused_stats": (np.asarray(1.0, dtype=np.float32), arrays(), arrays()),
        "gru_ensemble_rollout": tuple(gru),
    }


def _time_op(op: str, n: int, backend: _Backend, host_args: tuple[Any, ...], repeat: int,
             notes: list[str]) -> list[BenchRow]:
    args = tuple(_convert(a, backend.convert) for a in host_args)
    timings: dict[str, tuple[float, bool]] = {}
    kind = device_kind(backend.name, backend.device)
    for impl in REGISTRY[op]:
        if impl.rejection(backend.name, kind, "float32", forced=True) is not None:
            continue
        try:
            timings[impl.name] = (_median_ms(impl.load(), args, backend.sync, repeat),
                                  kind in impl.interpret_devices and kind not in impl.devices)
        except Exception as exc:  # one failing implementation must not hide the others' numbers
            notes.append(f"{op} {impl.name} on {backend.name}/{backend.device} failed: {type(exc).__name__}: {exc}")
    loop = timings.get("reference", (math.nan, False))[0]
    label = f"{backend.name}/{backend.device}"
    ordered = sorted(timings.items(), key=lambda item: item[0] != "reference")  # the baseline first
    return [BenchRow(op, n, label, name, interp, ms, loop / ms) for name, (ms, interp) in ordered]


def _median_ms(fn: Callable[..., Any], args: tuple[Any, ...], sync: Callable[[Any], None], repeat: int) -> float:
    sync(fn(*args))  # compile / warm up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        sync(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _convert(value: Any, convert: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(value, list):
        return [convert(v) for v in value]
    return convert(value) if isinstance(value, np.ndarray) else value


def _available(names: Sequence[str]) -> tuple[list[_Backend], list[str]]:
    backends, notes = [], []
    for name in names:
        try:
            backends.extend(_BACKEND_FACTORIES[name]())
        except Exception as exc:  # a missing or unusable library is reported, not fatal
            notes.append(f"skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return backends, notes


def _numpy() -> list[_Backend]:
    return [_Backend("numpy", "cpu", np.asarray, lambda _: None)]


def _torch() -> list[_Backend]:
    import torch

    found = [_Backend("torch", "cpu", torch.from_numpy, lambda _: None)]
    if torch.cuda.is_available():
        found.append(_Backend("torch", "cuda", lambda a: torch.from_numpy(a).cuda(),
                              lambda _: torch.cuda.synchronize()))
    return found


def _jax() -> list[_Backend]:
    import jax

    device = jax.devices()[0]
    return [_Backend("jax", device.platform, lambda a: jax.device_put(a, device), jax.block_until_ready)]


def _cupy() -> list[_Backend]:
    import cupy

    cupy.cuda.runtime.getDeviceCount()  # raises without a usable GPU and driver
    return [_Backend("cupy", "cuda", cupy.asarray, lambda _: cupy.cuda.Device().synchronize())]


_BACKEND_FACTORIES: dict[str, Callable[[], list[_Backend]]] = {
    "numpy": _numpy, "torch": _torch, "jax": _jax, "cupy": _cupy,
}


def _human(n: int) -> str:
    for unit, scale in (("m", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)
