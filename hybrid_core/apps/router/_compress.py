"""`compress_router`: FastGRNN-LSQ's last two stages after `train_router`, then 8-bit quantization.

Kusupati et al. (2018) train FastGRNN in three stages: low rank (what `train_router` does), iterative
hard thresholding to the target densities, fine-tuning on the fixed support; then quantize. Stages 2
and 3 here run through `HybridTrainer` like stage 1: stage 2 with `HardThresholding` around the
clipped Adam (the support follows the largest weights after every real step), stage 3 with the
clipped Adam alone (the model's fixed mask keeps every change, predicted ones included, on the
support) and early stopping. The result is quantized (`QuantizedFastGRNN`) with the training split
as calibration data.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_core import ConfigError, HybridConfig, HybridTrainer
from hybrid_core._backend import from_numpy, to_numpy
from hybrid_core._codec import encode
from hybrid_core.callbacks import EarlyStopping, ExponentialLR
from hybrid_core.models import FastGRNN, QuantizedFastGRNN, model_size_bytes
from hybrid_core.models._export import quantized_document
from hybrid_core.optim import Adam, ClipGradNorm, HardThresholding

from ._io import QuantizedRouter, save_quantized_router
from ._pipeline import RouterResult, _bce, _checked_data, _write_json
from ._router import Router

__all__ = ["CompressConfig", "CompressResult", "compress_router", "format_stages"]

_HEADER_BYTES = 50  # the checkpoint header: magic, version, length, SHA-256


@dataclass(frozen=True)
class CompressConfig:
    """The knobs of `compress_router`; invalid values raise one `ConfigError` listing each problem."""

    w_density: float = 0.5
    """Share of W1 and of W2 kept (per tensor)."""
    u_density: float = 0.5
    """Share of U1 and of U2 kept (per tensor)."""
    iht_epochs: int = 10
    """Epochs of iterative hard thresholding (stage 2)."""
    finetune_epochs: int = 10
    """Upper bound on the epochs of fine-tuning on the fixed support (stage 3, early stopping may end sooner)."""
    lr: float = 0.005
    """Adam's learning rate at the start of stages 2 and 3 (decayed per epoch by the router's ``lr_decay``)."""
    patience: int = 4
    """Stage 3's early-stopping patience in epochs."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("w_density", "u_density"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                problems.append(f"{name}={value!r}: must be a number in (0, 1]")
        for name in ("iht_epochs", "finetune_epochs", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r}: must be an integer >= 1")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (
                math.isfinite(self.lr) and 0 < self.lr <= 10):
            problems.append(f"lr={self.lr!r}: must be a number in (0, 10]")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class CompressResult:
    """What `compress_router` produced: the sparse float router, its int8 form and one row per stage."""

    router: Router
    """The sparse, fine-tuned float router."""
    quantized: QuantizedRouter
    """Its int8 form (integer inference)."""
    stages: list[dict[str, Any]]
    """One row per form: stage, val_accuracy, val_loss, nonzeros, parameters, size_bytes, file_bytes (None where
    no file is written), agreement (int8 forms: share of validation windows predicted as by their float model)."""
    trainers: dict[str, Any]
    """`HybridTrainer.fit`'s summary of stages 2 (``"iht"``) and 3 (``"finetune"``)."""

    def to_dict(self) -> dict[str, Any]:
        """The stage rows and the trainers' summaries, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in ("stages", "trainers")}


def compress_router(trained: RouterResult, x: np.ndarray, y: np.ndarray, config: CompressConfig | None = None,
                    *, hybrid: HybridConfig | None = None, batch_size: int = 64, lr_decay: float = 0.95,
                    seed: int = 0, out_dir: str | os.PathLike[str] | None = None,
                    progress: bool = False) -> CompressResult:
    """Prune, fine-tune and quantize ``trained.router`` on the same windows ``x``, ``y`` and split.

    The float router of ``trained`` is changed in place (it becomes the sparse one). With
    ``out_dir``, ``router.fgq`` (the int8 export, see `save_quantized_router`) and ``compression.json``
    (the rows and the config) are written there.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    x, y = _checked_data(x, y)
    router = trained.router
    model, normalizer = router.model, router.normalizer
    val = trained.val_indices
    train = np.setdiff1d(np.arange(len(y)), val)
    x_train, y_train = normalizer.apply(x[train]), y[train]
    x_val, y_val = x[val], y[val]
    hybrid = HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10,
                          horizon_arms=(0, 5, 15, 30), lr_recommend=False) if hybrid is None else hybrid

    rows = [_float_row("float low-rank", router, x_val, y_val)]
    rows.append(_int8_row("int8 low-rank", router, x_train, x_val, y_val))
    model.prune(config.w_density, config.u_density)
    rows.append(_float_row("pruned (one shot)", router, x_val, y_val))
    fit = _Stage(model, x_train, y_train, normalizer.apply(x_val), y_val, batch_size, seed, hybrid, lr_decay)
    trainers = {"iht": fit.run(HardThresholding(ClipGradNorm(Adam(model, lr=config.lr), 5.0), model),
                               config.iht_epochs, None, progress)}
    rows.append(_float_row("sparse (IHT)", router, x_val, y_val))
    trainers["finetune"] = fit.run(ClipGradNorm(Adam(model, lr=config.lr), 5.0), config.finetune_epochs,
                                   config.patience, progress)
    rows.append(_float_row("sparse fine-tuned", router, x_val, y_val))
    quantized = QuantizedRouter(QuantizedFastGRNN.from_model(model, x_train), normalizer)
    rows.append(_int8_row("int8 sparse", router, x_train, x_val, y_val, quantized))
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        rows[-1]["file_bytes"] = save_quantized_router(quantized, directory / "router.fgq")
        _write_json(directory / "compression.json", {"config": asdict(config), "stages": rows, "trainers": trainers})
    return CompressResult(router, quantized, rows, trainers)


class _Stage:
    """Runs one training stage of the pruned model through `HybridTrainer` on the fixed split."""

    def __init__(self, model: FastGRNN, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, batch_size: int, seed: int, hybrid: HybridConfig, lr_decay: float) -> None:
        self.model, self.x_train, self.y_train, self.y_val = model, x_train, y_train, y_val
        self.batch_size, self.seed, self.hybrid, self.lr_decay = batch_size, seed, hybrid, lr_decay
        self.place = {"dtype": model.dtype, "device": _device(model)}
        self.val_inputs = from_numpy(model.xp, x_val, **self.place)
        self.per_epoch = math.ceil(len(y_train) / batch_size)

    def run(self, optimizer: Any, epochs: int, patience: int | None, progress: bool) -> dict[str, Any]:
        model, xp, per_epoch = self.model, self.model.xp, self.per_epoch
        trainer = HybridTrainer(model, optimizer, self.hybrid)

        def batch(step: int) -> tuple[Any, ...]:
            epoch, i = divmod(step, per_epoch)
            idx = np.random.default_rng([self.seed, 1000 + epoch]).permutation(len(self.y_train))[
                i * self.batch_size:(i + 1) * self.batch_size]
            return (from_numpy(xp, self.x_train[idx], **self.place), from_numpy(xp, self.y_train[idx], **self.place))

        def val_loss() -> float:
            trainer.flush()
            return _bce(np.asarray(to_numpy(model.logits(self.val_inputs)), dtype=np.float64), self.y_val)

        callbacks: list[Any] = [ExponentialLR(self.lr_decay, per_epoch)]
        stopper = None
        if patience is not None:
            stopper = EarlyStopping(val_loss, per_epoch, patience)
            callbacks.append(stopper)
        summary = trainer.fit(batch, epochs * per_epoch, progress=progress, callbacks=callbacks)
        if stopper is not None and stopper.stopped_step is None:
            stopper.restore()
        return summary


def _device(model: FastGRNN) -> Any:
    import array_api_compat

    return array_api_compat.device(model.parameters()[0])


def _float_row(stage: str, router: Router, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    logits = router.logits(x_val)
    model = router.model
    return {"stage": stage, "val_accuracy": float(np.mean((logits > 0) == (y_val > 0.5))),
            "val_loss": _bce(logits, y_val), "nonzeros": sum(model.nonzeros()),
            "parameters": sum(int(np.prod(p.shape)) for p in model.parameters()),
            "size_bytes": model_size_bytes(model), "file_bytes": None, "agreement": None}


def _int8_row(stage: str, router: Router, x_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              quantized: QuantizedRouter | None = None) -> dict[str, Any]:
    if quantized is None:
        quantized = QuantizedRouter(QuantizedFastGRNN.from_model(router.model, x_train), router.normalizer)
    logits = quantized.logits(x_val)
    agree = float(np.mean((logits > 0) == (router.logits(x_val) > 0)))
    doc = quantized_document(quantized.model, quantized.extra())
    return {"stage": stage, "val_accuracy": float(np.mean((logits > 0) == (y_val > 0.5))),
            "val_loss": _bce(logits, y_val), "nonzeros": sum(quantized.model.nonzeros().values()),
            "parameters": sum(a.size for a in quantized.model.weights.values()) + 2 * len(quantized.model.b_z) + 3,
            "size_bytes": model_size_bytes(quantized.model),
            "file_bytes": _HEADER_BYTES + len(encode(doc, lambda _: None)), "agreement": agree}


def format_stages(rows: list[dict[str, Any]]) -> str:
    """The stage rows as a Markdown table: accuracy, non-zeros, stored bytes, file bytes, int8/float agreement."""
    lines = ["| form | val accuracy | non-zero weights | size (bytes) | file (bytes) | agrees with float |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        agree = "" if r["agreement"] is None else f"{r['agreement']:.2%}"
        file_bytes = "" if r["file_bytes"] is None else str(r["file_bytes"])
        lines.append(f"| {r['stage']} | {r['val_accuracy']:.2%} | {r['nonzeros']} / {r['parameters']} | "
                     f"{r['size_bytes']} | {file_bytes} | {agree} |")
    return "\n".join(lines)
