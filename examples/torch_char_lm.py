"""A character-level transformer language model on Python's own standard library, trained by HybridTrainer.

Run: python examples/torch_char_lm.py [--steps 500] [--seed 0] [--lr 3e-3] [--files 8] [--sample 120] [--no-compare]

The text is read at run time from the standard-library folder of the Python that runs
this script (``sysconfig.get_paths()["stdlib"]``), as bytes: 256 symbols, no tokenizer,
no download. The last 10% is held out for validation. The model goes through the torch
adapter (`TorchModel`, `TorchOptimizer` around ``torch.optim.Adam``); at the end it
prints the losses, those of plain Adam on the same batches from the same weights,
and a short string sampled from the model.
"""

from __future__ import annotations

import argparse
import copy
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core.adapters.torch import TorchModel, TorchOptimizer

FILES = ("functools.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "copy.py", "abc.py", "fnmatch.py",
         "contextlib.py", "dataclasses.py", "enum.py", "argparse.py")
"""Standard-library modules to read, in this order (``--files N`` takes the first N that exist)."""


class CharTransformer(nn.Module):
    """Byte embedding + learned positions, pre-norm causal transformer blocks, a linear head over 256 bytes."""

    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits (batch, time, 256) for byte ids (batch, time)."""
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def next_byte_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting byte t+1 from bytes ≤ t; ``batch`` is (batch, context + 1) byte ids."""
    logits = module(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def read_corpus(count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` modules of `FILES` found in this Python's standard library, joined, as int64 bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [name for name in FILES if (root / name).is_file()][:count]
    if not found:
        raise SystemExit(f"none of {', '.join(FILES)} is in {root}")
    data = b"\n".join((root / name).read_bytes() for name in found)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64)), found


def plain_run(module: nn.Module, batches: list[torch.Tensor], lr: float) -> float:
    """Ordinary Adam with the same clipping over ``batches``; returns its wall-clock seconds."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    start = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        next_byte_loss(module, batch).backward()
        nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def sample(module: nn.Module, prompt: str, length: int, context: int, generator: torch.Generator) -> str:
    """``prompt`` continued by ``length`` bytes drawn from the model (temperature 0.8)."""
    tokens = torch.tensor(list(prompt.encode()), dtype=torch.int64)[None]
    for _ in range(length):
        logits = module(tokens[:, -context:])[0, -1] / 0.8
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt[None]], dim=1)
    return bytes(tokens[0].tolist()).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    """Train the LM with HybridTrainer, then print the metrics, losses and a sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and sample")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--files", type=int, default=8, help=f"standard-library modules to read (1-{len(FILES)})")
    parser.add_argument("--context", type=int, default=64, help="bytes the model sees (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the plain-Adam run on the same batches")
    parser.add_argument("--sample", type=int, default=120, help="bytes to sample at the end (default 120)")
    args = parser.parse_args(argv)
    if min(args.steps, args.files, args.context, args.batch_size) < 1 or args.sample < 0 or args.lr <= 0:
        parser.error("--steps, --files, --context, --batch-size must be >= 1, --sample >= 0, --lr > 0")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    data, names = read_corpus(args.files)
    cut = int(len(data) * 0.9)
    train, val_text = data[:cut], data[cut:]
    span = args.context + 1
    val = val_text[: (len(val_text) // span) * span].reshape(-1, span)[:64]
    print(f"corpus: {len(data):,} bytes from {len(names)} standard-library files ({', '.join(names)}); "
          f"validation: {val.shape[0]} windows of {args.context} bytes")

    rng = np.random.default_rng(args.seed)
    starts = torch.from_numpy(rng.integers(0, len(train) - span, size=(args.steps, args.batch_size)))
    batches = [train[s[:, None] + torch.arange(span)] for s in starts]

    module = CharTransformer(args.context, width=64, layers=2, heads=4)
    plain = copy.deepcopy(module)  # same initial weights for the plain run
    model = TorchModel(module, next_byte_loss)
    optimizer = TorchOptimizer(model, torch.optim.Adam(model.parameters(), lr=args.lr), clip_grad_norm=1.0)
    config = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10)
    trainer = HybridTrainer(model, optimizer, config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"validation loss before training: {float(model.loss(val)):.3f} nats/byte (ln 256 = {math.log(256):.3f})")

    start = time.perf_counter()
    summary = trainer.fit(batches, progress=False)
    seconds = time.perf_counter() - start
    plain_seconds = plain_run(plain, batches, args.lr) if args.compare else math.nan
    losses = [r.loss for r in trainer.metrics.records if r.loss is not None and r.backward]
    print("steps per phase:", summary["steps_per_phase"])
    print(f"backward passes: {summary['backward_passes']} of {summary['steps']} steps "
          f"({summary['backward_passes_skipped']} skipped) in {seconds:.1f} s")
    print(f"training loss, mean of the last 20 real steps: {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    print(f"validation loss: {float(model.loss(val)):.3f} nats/byte")
    if args.compare:
        with torch.no_grad():
            plain_val = float(next_byte_loss(plain, val))
        print(f"plain Adam, same steps and batches: validation loss {plain_val:.3f} nats/byte "
              f"in {plain_seconds:.1f} s")
    if args.sample:
        generator = torch.Generator().manual_seed(args.seed)
        print("sample:")
        print(sample(module.eval(), "def ", args.sample, args.context, generator))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
