"""The checkpoint file format: msgpack with arrays as ExtType, a header and a checksum.

Layout: ``MAGIC`` (8 bytes) · format version (uint16) · payload length (uint64) ·
SHA-256 of the payload (32 bytes) · payload (msgpack). Arrays are ExtType 1 holding
msgpack ``[dtype, shape, bytes, library]`` (little-endian, C order, dtypes from a fixed list;
``bfloat16`` is stored as its 16-bit patterns and decoded to float32 holding the same values);
integers beyond 64 bits (NumPy generator states) are ExtType 2 holding their decimal
text. Decoding never runs code (no pickle anywhere), every length is checked
against the file before anything is allocated, so a crafted file cannot exhaust memory, and
documents nested deeper than `MAX_DEPTH` are refused (nothing downstream recurses further).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack
import numpy as np

from ._backend import BACKEND_MODULES
from ._errors import CheckpointError

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_DEPTH", "ForeignArray", "decode", "encode", "read_file", "write_atomic"]

MAGIC = b"HYBRIDCK"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHQ32s")
_ARRAY, _BIGINT = 1, 2
_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64", "complex64", "complex128", "bfloat16"]
)
_LIBRARIES = frozenset(BACKEND_MODULES)  # the backends a stored array may come from
DEFAULT_MAX_BYTES = 8 * 2**30
"""Largest checkpoint `read_file` accepts unless told otherwise (8 GiB)."""
MAX_DEPTH = 64
"""Deepest nesting of lists and dicts a checkpoint may hold (a trainer's state needs about 8 levels)."""


class ForeignArray(NamedTuple):
    """A decoded array that was saved from another library than NumPy (restored by the caller)."""

    library: str
    array: np.ndarray
    dtype: str | None = None
    """The dtype it was saved with when ``array`` holds it in a wider one: ``"bfloat16"`` (NumPy has
    none; ``array`` is then float32 holding exactly the saved values)."""


def encode(obj: Any, to_host: Callable[[Any], tuple[Any, ...] | None], max_depth: int = MAX_DEPTH) -> bytes:
    """msgpack bytes of ``obj``: dicts, lists, tuples, scalars, strings, None and arrays.

    ``to_host`` turns any non-NumPy array (torch, jax, …) into ``(numpy array, library
    name)`` or ``(numpy array, library name, dtype name)`` (a bfloat16 array as float32 with
    ``"bfloat16"``), or returns None for objects that are not arrays. A state nested deeper than
    ``max_depth`` is refused here, since `decode` would refuse the file.
    """
    deepest = _deeper_than(obj, max_depth)
    if deepest:
        raise CheckpointError(f"cannot store the state: the value at {deepest} nests deeper than {max_depth} levels",
                              "Flatten the state dict (a checkpoint holds at most that many levels).")

    def default(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, int):  # only reached for ints msgpack cannot hold
            return msgpack.ExtType(_BIGINT, str(value).encode("ascii"))
        host = (value, "numpy") if isinstance(value, np.ndarray) else to_host(value)
        if host is None:
            raise CheckpointError(f"cannot store a {type(value).__name__} in a checkpoint",
                                  "State dicts may hold numbers, strings, lists, dicts and arrays only.")
        arr, library, *saved_as = host
        dtype = saved_as[0] if saved_as else arr.dtype.name
        if dtype not in _DTYPES:
            raise CheckpointError(f"cannot store an array of dtype {dtype}")
        if dtype == "bfloat16":  # the top 16 bits of the (exactly representable) float32 values
            data = (np.ascontiguousarray(arr, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        record = [dtype, list(arr.shape), data, library]
        return msgpack.ExtType(_ARRAY, msgpack.packb(record, use_bin_type=True))

    try:
        return msgpack.packb(obj, default=default, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"cannot encode the training state: {exc}") from exc


def decode(payload: bytes) -> Any:
    """The object `encode` wrote; `CheckpointError` for anything malformed."""
    limit = len(payload)

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _BIGINT:
            text = data.decode("ascii")
            if not text.lstrip("-").isdigit() or len(text) > 200:
                raise CheckpointError("malformed big integer in checkpoint")
            return int(text)
        if code != _ARRAY:
            raise CheckpointError(f"unknown msgpack extension type {code} in checkpoint")
        fields = msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_array_len=64, max_map_len=0,
                                 max_str_len=32, max_ext_len=0)
        if not (isinstance(fields, list) and len(fields) == 4):
            raise CheckpointError("malformed array record in checkpoint")
        dtype, shape, raw, library = fields
        if dtype not in _DTYPES or not isinstance(shape, list) or not isinstance(raw, bytes) or (
                library not in _LIBRARIES):
            raise CheckpointError(f"malformed array record (dtype {dtype!r}) in checkpoint")
        if any(not isinstance(n, int) or n < 0 for n in shape):
            raise CheckpointError("negative or non-integer array shape in checkpoint")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if int(np.prod(shape, dtype=object)) * itemsize != len(raw):
            raise CheckpointError("array byte count does not match its shape in checkpoint")
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
            return _numpy_bfloat16(arr) if library == "numpy" else ForeignArray(library, arr, dtype)
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
        return arr if library == "numpy" else ForeignArray(library, arr)

    try:
        doc = msgpack.unpackb(payload, raw=False, ext_hook=ext_hook, strict_map_key=False,
                              max_bin_len=limit, max_str_len=limit, max_array_len=limit,
                              max_map_len=limit, max_ext_len=limit)
    except CheckpointError:
        raise
    except Exception as exc:  # msgpack raises several types for malformed input
        raise CheckpointError(f"checkpoint payload is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    deepest = _deeper_than(doc, MAX_DEPTH)
    if deepest:
        raise CheckpointError(f"the value at {deepest} nests deeper than {MAX_DEPTH} levels",
                              "A checkpoint written by this library is never that deep: load an earlier one.")
    return doc


def _deeper_than(obj: Any, limit: int) -> str | None:
    """Where ``obj`` (dicts, lists, tuples) nests deeper than ``limit`` levels, or None; walks without recursion."""
    stack: list[tuple[Any, int, str]] = [(obj, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict):
            children: list[tuple[Any, str]] = [(k, where) for k in value]
            children += [(v, f"{where}[{k!r}]" if depth < 3 else where) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(v, where) for v in value]
        else:
            continue
        if depth >= limit:
            return where or "the top level"
        stack.extend((child, depth + 1, at) for child, at in children)
    return None


def _numpy_bfloat16(arr: np.ndarray) -> np.ndarray:
    """A NumPy bfloat16 array (``ml_dtypes``, which JAX installs) of the float32 ``arr``."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise CheckpointError("the checkpoint holds a NumPy bfloat16 array and ml_dtypes is not installed",
                              "pip install ml_dtypes (JAX installs it) to load this checkpoint.") from exc
    return arr.astype(ml_dtypes.bfloat16)


def write_atomic(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write header + ``payload`` to ``path`` via a temporary file, fsync and rename.

    A crash at any point leaves either the old file or the new one, never a mix. Any `OSError`
    (no permission, a directory at ``path``, a full disk) raises `CheckpointError` naming ``path``;
    the temporary file is removed and a file already at ``path`` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path}: cannot write the checkpoint ({type(exc).__name__}: {exc})",
                                  "Check the path (a directory there?), its permissions and the free disk space; "
                                  "a checkpoint already at this path is intact.") from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_file(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Read, verify (magic, version, length, checksum) and decode a checkpoint."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read: refuse it before opening
            raise CheckpointError(f"{path}: not a regular file", "Pass the path of a checkpoint file.")
        size = info.st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes exceeds the limit of {max_bytes}",
                                  "Pass a larger max_bytes if this file is trusted.")
        # O_NONBLOCK: should a FIFO appear at the path after the stat, opening it does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CheckpointError(f"{path}: not a regular file", "Pass the path of a checkpoint file.")
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise CheckpointError(f"{path}: truncated header ({len(head)} bytes)")
            magic, version, length, digest = _HEADER.unpack(head)
            if magic != MAGIC:
                raise CheckpointError(f"{path}: not a hybrid-predict-trainer checkpoint (bad magic)")
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path}: format version {version} is newer than this library's "
                                      f"{FORMAT_VERSION}", "Upgrade hybrid-predict-trainer to read it.")
            if version < 1:
                raise CheckpointError(f"{path}: unknown format version {version}")
            if length != size - _HEADER.size:
                raise CheckpointError(f"{path}: header promises {length} payload bytes, file holds "
                                      f"{size - _HEADER.size} (truncated or padded)")
            payload = f.read(length)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
    try:
        return decode(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc.message}", exc.recovery) from exc
