"""Fine-tune a tiny Hugging Face GPT-2 (built from a config, no download) with Accelerate and the hybrid trainer.

Run: python examples/accelerate_gpt2.py [--steps 300] [--pretrain 150] [--seed 0] [--out DIR]
Two processes: accelerate launch --cpu --num_processes 2 examples/accelerate_gpt2.py

The model is ``GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, ...))`` over bytes (256 symbols, no tokenizer).
It is first trained for ``--pretrain`` steps on Python source (the standard library's own files) in the plain
Accelerate loop, then fine-tuned on English text (``pydoc_data.topics``, the help texts that ship with Python)
through `hybrid_core.adapters.accelerate.prepare`: ``accelerator.backward``, bf16 autocast, gradient
accumulation 2, and ``accelerator.save_state`` carrying the hybrid trainer's state. It prints the validation
loss on held-out English before and after fine-tuning, and the trainer's phases.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from hybrid_core import HybridConfig
from hybrid_core.adapters.accelerate import prepare

CONTEXT = 64
SOURCE_FILES = ("functools.py", "textwrap.py", "string.py", "argparse.py")


def windows(data: bytes, count: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``CONTEXT`` bytes of ``data``, as token ids."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - CONTEXT, (count,), generator=g)
    return torch.stack([ids[s:s + CONTEXT] for s in starts.tolist()])


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The next-byte cross-entropy (transformers shifts the labels itself)."""
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    loss = float(lm_loss(model, data))
    model.train()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (hybrid trainer)")
    parser.add_argument("--pretrain", type=int, default=150, help="pre-training steps on Python source (plain loop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="accelerate_gpt2_state", help="where accelerator.save_state writes")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=10, eos_token_id=10, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(config)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    source = b"".join((stdlib / name).read_bytes() for name in SOURCE_FILES if (stdlib / name).is_file())
    english = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    cut = int(len(english) * 0.9)
    held_out = windows(english[cut:], 64, args.seed + 1)
    # Each batch holds 2 micro-batches of 16 windows: gradient_accumulation_steps=2 cuts it in two.
    pretrain = torch.utils.data.DataLoader(windows(source, 32 * max(args.pretrain, 1), args.seed), batch_size=16)
    finetune = torch.utils.data.DataLoader(windows(english[:cut], 32 * args.steps, args.seed + 2), batch_size=32)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, pretrain = accelerator.prepare(model, optimizer, pretrain)
    for _, batch in zip(range(args.pretrain * 2), pretrain):  # the plain Accelerate loop, 2 micro-batches a step
        with accelerator.accumulate(model):
            accelerator.backward(lm_loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    held_out = held_out.to(accelerator.device)
    before = evaluate(model, held_out)

    # Fine-tuning: a fresh optimizer and a schedule sized in training steps, through the hybrid trainer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps)
    optimizer, finetune, schedule = accelerator.prepare(optimizer, finetune, schedule)
    hybrid = HybridConfig(warmup_steps=min(50, args.steps), seed=args.seed)
    trainer = prepare(accelerator, model, optimizer, lm_loss, schedule, hybrid, clip_grad_norm=1.0)
    for _, batch in zip(range(args.steps), finetune):
        trainer.step(batch)
    accelerator.save_state(args.out)  # the hybrid trainer's state is in it (load_state resumes the run)
    summary = trainer.summary()
    after = evaluate(model, held_out)
    with trainer.evaluation_parameters() as kind:
        exported = evaluate(model, held_out)
    if accelerator.is_main_process:
        print(f"processes: {accelerator.num_processes}, mixed precision: {accelerator.mixed_precision}, "
              f"gradient accumulation: {accelerator.gradient_accumulation_steps}")
        print(f"held-out English loss: {before:.4f} after pre-training on Python source, {after:.4f} after "
              f"fine-tuning ({kind} read-out: {exported:.4f}) nats/byte (ln 256 = {math.log(256):.2f})")
        print(f"steps per phase: {summary['steps_per_phase']}, backward passes: {summary['backward_passes']} of "
              f"{args.steps} steps")
        print(f"state saved to {args.out}")


if __name__ == "__main__":
    main()
