"""The ``lm-stdlib`` task: a byte-level transformer language model on Python's own standard library.

The text is a fixed list of standard-library modules (whichever of them this Python
has), read as bytes: 256 symbols, no tokenizer, no download. The last 10% of the
concatenation is the validation split.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["STDLIB_FILES", "build_lm", "loss_fn", "module_and_data", "stdlib_corpus", "windows_data"]

STDLIB_FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py",
    "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "operator.py", "pathlib.py", "pprint.py", "random.py", "shutil.py", "statistics.py",
    "string.py", "textwrap.py", "threading.py", "typing.py", "uuid.py", "warnings.py", "weakref.py",
)
"""Standard-library files the corpus is made of, in this order (missing ones are skipped)."""

CONTEXT = 64
BATCH = 16


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, validation bytes) as uint8 arrays."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / name).read_bytes() for name in STDLIB_FILES if (root / name).is_file()]
    data = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def module_and_data(seed: int) -> tuple[Any, Any, Any]:
    """(module, batch(step), validation batch) of one run: the native loop trains these directly."""
    batch, val = _data(seed)
    return _module(seed), batch, val


def _module(seed: int) -> Any:
    import torch
    from torch import nn

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = 64
            self.embed = nn.Embedding(256, d)
            self.position = nn.Parameter(torch.zeros(CONTEXT, d))
            layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 256)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

        def forward(self, tokens: Any) -> Any:
            h = self.embed(tokens) + self.position[: tokens.shape[1]]
            n = tokens.shape[1]
            h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
            return self.head(self.norm(h))

    torch.manual_seed(seed)
    return TinyTransformer()


def loss_fn(mod: Any, batch: Any) -> Any:
    """Mean next-byte cross-entropy of ``mod`` on ``batch = (x, y)``."""
    import torch

    x, y = batch
    logits = mod(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))


def _data(seed: int) -> tuple[Any, Any]:
    """(batch(step), validation batch): 16 random training windows per step, 64 fixed validation windows."""
    return windows_data(seed, *stdlib_corpus())


def windows_data(seed: int, train: np.ndarray, val: np.ndarray) -> tuple[Any, Any]:
    """(batch(step), validation batch) over byte arrays: 16 random training windows per step (seed ``seed``),
    64 fixed, evenly spaced validation windows; torch with one thread."""
    import torch

    torch.set_num_threads(1)
    train_t = torch.from_numpy(train.astype(np.int64))

    def windows(source: Any, starts: np.ndarray) -> tuple[Any, Any]:
        idx = torch.from_numpy(starts[:, None] + np.arange(CONTEXT + 1)[None, :])
        chunk = source[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(step: int) -> Any:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        return windows(train_t, rng.integers(0, len(train) - CONTEXT - 1, size=BATCH))

    val_t = torch.from_numpy(val.astype(np.int64))
    val_starts = np.linspace(0, len(val) - CONTEXT - 2, 64).astype(np.int64)
    return batch, windows(val_t, val_starts)


def build_lm(seed: int, lr: float) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, batch(step), validate()) of the hybrid run: the module in `TorchModel`,
    ``torch.optim.Adam`` in `TorchOptimizer`; torch with one thread."""
    import torch

    from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

    batch, val_batch = _data(seed)
    model = TorchModel(_module(seed), loss_fn)
    optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=lr))

    def validate() -> float:
        return float(model.loss(val_batch))

    return model, optimizer, batch, validate
