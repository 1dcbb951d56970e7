"""The compact export of a `QuantizedFastGRNN`, and the model's size in bytes in each form.

The file is the checkpoint format (`hybrid_core._codec`: magic, version, length, SHA-256,
msgpack without pickle, written atomically) holding
``{kind, version, settings, exponents: int8[8], weights: {name: tensor}, b_z, b_h: int32[H],
c: int64, zeta, nu: int, extra}``. Each weight tensor is stored in the smallest of three encodings:
``dense`` (all int8 values), ``bitmap`` (one bit per entry, then the non-zero int8 values) or
``index`` (uint16 flat indices of the non-zeros, then their values). Loading checks every field
(keys, dtypes, shapes against the settings, index bounds and order, bit counts, value range) and
raises `CheckpointError` for anything else: a damaged or foreign file never yields a model.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .._codec import encode, read_file, write_atomic
from .._errors import CheckpointError, HybridError
from ._quantized import EXPONENTS, WEIGHTS, QuantizedFastGRNN
from .fastgrnn import FastGRNN

__all__ = ["EXPORT_MAX_BYTES", "MAX_WIDTH", "from_document", "load_quantized", "model_size_bytes", "quantized_document",
           "save_quantized", "stored_bytes"]

KIND = "hybrid_core.fastgrnn.int8"
_VERSION = 1
_KEYS = {"kind", "version", "settings", "exponents", "weights", "b_z", "b_h", "c", "zeta", "nu", "extra"}
MAX_WIDTH = 515
"""Largest size or rank an export may hold: the int32 accumulators of `QuantizedFastGRNN` bound it."""
EXPORT_MAX_BYTES = 64 * 2**20
"""Largest export `load_quantized` reads unless told otherwise (64 MiB)."""


def _encode_tensor(q: np.ndarray) -> dict[str, Any]:
    flat = q.reshape(-1)
    nz = np.flatnonzero(flat)
    options = [{"encoding": "dense", "values": flat.astype(np.int8)},
               {"encoding": "bitmap", "bits": np.packbits(flat != 0), "values": flat[nz].astype(np.int8)}]
    if flat.size <= 65536:
        options.append({"encoding": "index", "index": nz.astype(np.uint16), "values": flat[nz].astype(np.int8)})
    return min(options, key=stored_bytes)


def _decode_tensor(saved: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    size = math.prod(shape)
    if not isinstance(saved, dict) or saved.get("encoding") not in ("dense", "bitmap", "index"):
        raise CheckpointError(f"weight {name}: unknown encoding")
    encoding = saved["encoding"]
    keys = {"dense": {"encoding", "values"}, "bitmap": {"encoding", "bits", "values"},
            "index": {"encoding", "index", "values"}}[encoding]
    values = saved.get("values")
    if set(saved) != keys or not _array(values, np.int8, 1) or np.any(values == -128):
        raise CheckpointError(f"weight {name}: fields {sorted(saved)} or values are not a {encoding} int8 tensor")
    if encoding == "dense":
        if values.size != size:
            raise CheckpointError(f"weight {name}: {values.size} values for shape {shape}")
        return values.reshape(shape).copy()
    if encoding == "bitmap":
        bits = saved["bits"]
        if not _array(bits, np.uint8, 1) or bits.size != (size + 7) // 8:
            raise CheckpointError(f"weight {name}: bitmap of the wrong length for shape {shape}")
        where = np.flatnonzero(np.unpackbits(bits)[:size])
        if np.any(np.unpackbits(bits)[size:]):
            raise CheckpointError(f"weight {name}: bits set beyond the tensor")
    else:
        where = saved["index"]
        if not _array(where, np.uint16, 1) or (where.size and (np.any(np.diff(where.astype(np.int64)) <= 0)
                                                                or int(where[-1]) >= size)):
            raise CheckpointError(f"weight {name}: indices are not increasing and below {size}")
    if where.size != values.size or np.any(values == 0):
        raise CheckpointError(f"weight {name}: {where.size} positions for {values.size} non-zero values")
    out = np.zeros(size, dtype=np.int8)
    out[where.astype(np.int64)] = values
    return out.reshape(shape)


def _array(value: Any, dtype: Any, ndim: int) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == dtype and value.ndim == ndim


def stored_bytes(value: Any) -> int:
    """Bytes of the arrays and numbers a document stores: array bytes, 1 per exponent, 4 per int32 scalar, 8 per
    int64 one (``c``); names and msgpack framing are not counted (see the file's length for those)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(stored_bytes(v) for k, v in value.items() if k not in ("encoding", "kind", "settings", "extra"))
    return 0


def quantized_document(model: QuantizedFastGRNN, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The export's content (see the module docstring); ``extra`` rides along (e.g. a router's normaliser)."""
    return {"kind": KIND, "version": _VERSION, "settings": dict(model.settings),
            "exponents": np.array([model.exponents[k] for k in EXPONENTS], dtype=np.int8),
            "weights": {k: _encode_tensor(model.weights[k]) for k in WEIGHTS},
            "b_z": model.b_z.astype(np.int32), "b_h": model.b_h.astype(np.int32),
            "c": np.array([model.c], dtype=np.int64), "zeta": np.array([model.zeta], dtype=np.int16),
            "nu": np.array([model.nu], dtype=np.int16), "extra": dict(extra or {})}


def save_quantized(model: QuantizedFastGRNN, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> int:
    """Write the export to ``path`` atomically; returns the file's length in bytes."""
    payload = encode(quantized_document(model, extra), lambda _: None)
    write_atomic(path, payload)
    return os.path.getsize(path)


def load_quantized(path: str | os.PathLike[str], max_bytes: int = EXPORT_MAX_BYTES
                   ) -> tuple[QuantizedFastGRNN, dict[str, Any]]:
    """The model exported at ``path`` and its ``extra``; `CheckpointError` for a damaged, foreign or
    inconsistent file."""
    where = os.fspath(path)
    try:
        return from_document(read_file(path, max_bytes))
    except CheckpointError as exc:
        raise CheckpointError(exc.message if exc.message.startswith(where) else f"{where}: {exc.message}",
                              exc.recovery) from exc


def from_document(doc: Any) -> tuple[QuantizedFastGRNN, dict[str, Any]]:
    """A `QuantizedFastGRNN` and its ``extra`` from a decoded export; `CheckpointError` if anything is off."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise CheckpointError("not a quantized FastGRNN export", "Pass a file written by save_quantized.")
    if set(doc) != _KEYS or doc["version"] != _VERSION:
        raise CheckpointError(f"export has keys {sorted(doc)} and version {doc.get('version')!r}; expected "
                              f"{sorted(_KEYS)} and version {_VERSION}")
    settings = doc["settings"]
    sizes = ("input_size", "hidden_size", "w_rank", "u_rank")
    if not isinstance(settings, dict) or not all(
            type(settings.get(k)) is int and 1 <= settings[k] <= MAX_WIDTH for k in sizes):
        raise CheckpointError(f"the export's sizes and ranks must be integers in [1, {MAX_WIDTH}]")
    try:
        FastGRNN(**settings)  # every setting checked (ranks, l2, nonlinearity, ...); small, as the sizes are
    except (HybridError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the export's settings do not make a FastGRNN ({exc})") from exc
    d, h, rw, ru = (settings[k] for k in ("input_size", "hidden_size", "w_rank", "u_rank"))
    shapes = {"w1": (d, rw), "w2": (rw, h), "u1": (h, ru), "u2": (ru, h), "v": (h, 1)}
    exps = doc["exponents"]
    if not _array(exps, np.int8, 1) or exps.size != len(EXPONENTS) or np.any(np.abs(exps.astype(int)) > 40):
        raise CheckpointError(f"exponents must be {len(EXPONENTS)} int8 values in [-40, 40]")
    weights = doc["weights"]
    if not isinstance(weights, dict) or set(weights) != set(WEIGHTS):
        raise CheckpointError(f"weights must be exactly {list(WEIGHTS)}")
    decoded = {k: _decode_tensor(weights[k], shapes[k], k) for k in WEIGHTS}
    decoded["v"] = decoded["v"].reshape(h)
    for name in ("b_z", "b_h"):
        if not _array(doc[name], np.int32, 1) or doc[name].shape != (h,):
            raise CheckpointError(f"{name} must be {h} int32 values")
    for name, dtype in (("c", np.int64), ("zeta", np.int16), ("nu", np.int16)):
        if not _array(doc[name], dtype, 1) or doc[name].shape != (1,):
            raise CheckpointError(f"{name} must be one {np.dtype(dtype).name} value")
    if not all(0 <= int(doc[k][0]) <= 1 << 14 for k in ("zeta", "nu")) or not isinstance(doc["extra"], dict):
        raise CheckpointError("zeta and nu must be in [0, 2^14] and extra a dict")
    try:
        model = QuantizedFastGRNN(settings, decoded, dict(zip(EXPONENTS, exps.astype(int).tolist(), strict=True)),
                                  doc["b_z"], doc["b_h"], int(doc["c"][0]), int(doc["zeta"][0]), int(doc["nu"][0]))
    except HybridError as exc:
        raise CheckpointError(f"the export does not make a model ({exc.message})") from exc
    return model, doc["extra"]


def model_size_bytes(model: FastGRNN | QuantizedFastGRNN, form: str = "auto") -> int:
    """The bytes a model's weights take in ``form``:

    - ``"float"``: every parameter dense in its dtype (a `FastGRNN`);
    - ``"sparse"``: the float model with W1, W2, U1, U2 in the smallest of dense, bitmap + non-zero values,
      uint16 indices + non-zero values (as the export stores them, with float values);
    - ``"quantized"`` (``"auto"`` for a `QuantizedFastGRNN`): what `save_quantized` stores (`stored_bytes`).

    ``"auto"`` is ``"quantized"`` for a quantized model and ``"sparse"`` for a pruned `FastGRNN`, else ``"float"``.
    """
    if isinstance(model, QuantizedFastGRNN):
        if form not in ("auto", "quantized"):
            raise ValueError(f"a QuantizedFastGRNN has only the 'quantized' form, not {form!r}")
        return stored_bytes(quantized_document(model))
    if form == "auto":
        form = "float" if model.support is None else "sparse"
    from .._backend import to_numpy

    params = [np.asarray(to_numpy(p)) for p in model.parameters()]
    if form == "float":
        return sum(int(p.nbytes) for p in params)
    if form != "sparse":
        raise ValueError(f"form={form!r}: must be 'float', 'sparse', 'quantized' or 'auto'")
    total = sum(int(p.nbytes) for p in params[4:])
    for p in params[:4]:
        nnz, item = int(np.count_nonzero(p)), p.dtype.itemsize
        total += min(p.size * item, (p.size + 7) // 8 + nnz * item, 2 * nnz + nnz * item)
    return total
