"""`train_router`: the FastGRNN router trained through `HybridTrainer` with the usual training kit."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from hybrid_core import BatchError, ConfigError, HybridConfig, HybridTrainer
from hybrid_core._backend import as_namespace, from_numpy, to_numpy
from hybrid_core.callbacks import EarlyStopping, ExponentialLR, ValidationLogger
from hybrid_core.models import FastGRNN
from hybrid_core.models.fastgrnn import NONLINEARITIES
from hybrid_core.optim import Adam, ClipGradNorm

from ._io import save_router
from ._router import Router, ZScore
from ._teacher import train_teacher

__all__ = ["RouterConfig", "RouterResult", "train_router"]


def _router_hybrid_config() -> HybridConfig:
    # An epoch here is a few dozen steps: the library's defaults (100 warm-up steps, horizons up to
    # 75) would leave whole epochs without a real step, so phases are scaled to the run. The pipeline
    # decays the learning rate per epoch itself, so the trainer's recommendation is off.
    return HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10,
                        horizon_arms=(0, 5, 15, 30), lr_recommend=False)


@dataclass(frozen=True)
class RouterConfig:
    """Every knob of `train_router`; invalid values raise one `ConfigError` listing each problem."""

    hidden_size: int = 48
    """FastGRNN hidden units H."""
    w_rank: int | None = None
    """Rank of the input matrix W = W1·W2 (None: full, min(features, H))."""
    u_rank: int | None = 16
    """Rank of the recurrent matrix U = U1·U2 (None: full, H)."""
    epochs: int = 30
    """Upper bound on passes over the training split (early stopping may end sooner)."""
    batch_size: int = 64
    """Windows per mini-batch; the last batch of an epoch may be smaller."""
    lr: float = 0.01
    """Adam's initial learning rate."""
    lr_decay: float = 0.95
    """The learning rate is multiplied by this after every epoch."""
    clip_norm: float = 5.0
    """Gradients are rescaled to at most this global norm before each update."""
    l2: float = 1e-4
    """L2 weight on the weight matrices (see `FastGRNN`)."""
    val_fraction: float = 0.2
    """Share of the shuffled windows held out for validation (early stopping, metrics)."""
    patience: int = 8
    """Epochs without a better validation loss before training stops."""
    min_delta: float = 0.0
    """How much lower the validation loss must be to count as better."""
    distill_alpha: float = 0.3
    """Weight α of the teacher's soft targets; 0 trains no teacher."""
    temperature: float = 2.0
    """Distillation temperature T."""
    teacher_hidden: int = 64
    """Hidden units of the MLP teacher."""
    teacher_epochs: int = 20
    """Epochs of plain Adam (lr 3e-3, L2 1e-4, same batch size) for the teacher."""
    nonlinearity: str = "exact"
    """The cell's gates: ``"exact"`` (σ, tanh) or ``"pwl"`` (the paper's piecewise-linear forms, see `FastGRNN`)."""
    seed: int = 0
    """Seeds the split, the batches, the teacher and the FastGRNN's initial weights."""
    hybrid: HybridConfig = field(default_factory=_router_hybrid_config)
    """The trainer's settings (phase lengths, prediction horizons)."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class RouterResult:
    """What `train_router` produced: the router, per-epoch metrics and the run's totals."""

    router: Router
    history: list[dict[str, Any]]
    """One row per epoch: epoch, step, lr, seconds, val_loss, val_accuracy and train_loss, the mean
    training objective (distillation and L2 terms included) over the epoch's real steps."""
    best_epoch: int | None
    """The epoch whose weights the router holds (lowest validation loss)."""
    stopped_epoch: int | None
    """The epoch at which early stopping ended training (None: it ran every epoch)."""
    val_loss: float
    """Binary cross-entropy of the router on the validation split (no L2 term)."""
    val_accuracy: float
    """Accuracy of the router on the validation split."""
    teacher_val_accuracy: float | None
    """Accuracy of the teacher on the validation split (None without distillation)."""
    trainer: dict[str, Any]
    """`HybridTrainer.fit`'s summary (steps, backward passes, phases, events)."""
    val_indices: np.ndarray
    """Which windows of the input formed the validation split."""

    def to_dict(self) -> dict[str, Any]:
        """Everything but the router and the split, as plain JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("router", "val_indices")}


def train_router(
    x: np.ndarray,
    y: np.ndarray,
    config: RouterConfig | None = None,
    *,
    xp: ModuleType | None = None,
    dtype: Any = None,
    device: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> RouterResult:
    """Train a FastGRNN router on raw windows ``x`` (n, T, features) and 0/1 routes ``y`` (n,).

    The windows are shuffled and split (``config.val_fraction`` for validation); a z-score
    normaliser is fitted on the training split; with ``distill_alpha`` > 0 an MLP teacher is
    trained first and its logits ride along in every batch. The FastGRNN (namespace ``xp``,
    default NumPy, ``dtype`` default float32) is trained by `HybridTrainer` with
    `ClipGradNorm` around Adam, an exponential learning-rate decay per epoch, a validation
    log and early stopping that restores the best epoch's weights. With ``out_dir`` the
    per-epoch metrics (``epochs.jsonl``), the summary (``summary.json``) and the router
    (``router.ckpt``, see `save_router`) are written there. ``progress`` shows the trainer's
    progress line on stderr.
    """
    config = RouterConfig() if config is None else config
    if not isinstance(config, RouterConfig):
        raise ConfigError(f"config must be a RouterConfig, got {type(config).__name__}")
    x, y = _checked_data(x, y)
    order = np.random.default_rng(config.seed).permutation(len(y))
    n_val = round(len(y) * config.val_fraction)
    if n_val < 1 or n_val >= len(y):
        raise ConfigError(f"val_fraction={config.val_fraction} leaves {n_val} of {len(y)} windows for validation",
                          "Pass more windows or a val_fraction that leaves both splits non-empty.")
    val, train = order[:n_val], order[n_val:]
    normalizer = ZScore.fit(x[train])
    x_train, y_train = normalizer.apply(x[train]), y[train]
    x_val, y_val = normalizer.apply(x[val]), y[val]

    teacher, teacher_acc = None, None
    if config.distill_alpha > 0:
        teacher = train_teacher(x_train, y_train, hidden=config.teacher_hidden, epochs=config.teacher_epochs,
                                batch_size=config.batch_size, lr=3e-3, l2=1e-4, seed=config.seed)
        teacher_acc = teacher.accuracy(x_val, y_val)

    xp = as_namespace(xp)
    model = FastGRNN(x.shape[2], config.hidden_size, w_rank=config.w_rank, u_rank=config.u_rank, xp=xp,
                     seed=config.seed, dtype=dtype, device=device, l2=config.l2,
                     distill_alpha=config.distill_alpha, temperature=config.temperature,
                     nonlinearity=config.nonlinearity)
    router = Router(model, normalizer)
    place = {"dtype": model.dtype, "device": array_api_compat.device(model.parameters()[0])}
    optimizer = ClipGradNorm(Adam(model, lr=config.lr), config.clip_norm)
    trainer = HybridTrainer(model, optimizer, config.hybrid)
    per_epoch = math.ceil(len(y_train) / config.batch_size)

    def batch(step: int) -> tuple[Any, ...]:
        epoch, i = divmod(step, per_epoch)
        idx = np.random.default_rng([config.seed, epoch]).permutation(len(y_train))[
            i * config.batch_size:(i + 1) * config.batch_size]
        out = (from_numpy(xp, x_train[idx], **place), from_numpy(xp, y_train[idx], **place))
        return out if teacher is None else (*out, from_numpy(xp, teacher.train_logits[idx], **place))

    val_inputs = from_numpy(xp, x_val, **place)
    cache: dict[str, Any] = {}

    def evaluate() -> dict[str, float]:
        # Early stopping and the logger both ask after each epoch; one forward pass serves both.
        trainer.flush()  # the epoch's last losses may still be on the device
        step = trainer.steps_done
        if cache.get("step") != step:
            logits = np.asarray(to_numpy(model.logits(val_inputs)), dtype=np.float64)
            real = [r.loss for r in trainer.metrics.records[-per_epoch:] if r.loss is not None and r.backward]
            cache.update(step=step, metrics={
                "epoch": step // per_epoch,
                "train_loss": float(np.mean(real)) if real else math.nan,
                "val_loss": _bce(logits, y_val),
                "val_accuracy": float(np.mean((logits > 0) == (y_val > 0.5))),
            })
        return cache["metrics"]

    directory = None if out_dir is None else Path(out_dir)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    logger = ValidationLogger(evaluate, per_epoch, None if directory is None else directory / "epochs.jsonl")
    stopper = EarlyStopping(lambda: evaluate()["val_loss"], per_epoch, config.patience, config.min_delta)
    decay = ExponentialLR(config.lr_decay, per_epoch)
    summary = trainer.fit(batch, config.epochs * per_epoch, progress=progress, callbacks=[logger, stopper, decay])
    if stopper.stopped_step is None:
        stopper.restore()
    logits = router.logits(x[val])
    result = RouterResult(
        router=router,
        history=logger.records,
        best_epoch=None if stopper.best_step is None else stopper.best_step // per_epoch,
        stopped_epoch=None if stopper.stopped_step is None else stopper.stopped_step // per_epoch,
        val_loss=_bce(logits, y_val),
        val_accuracy=float(np.mean((logits > 0) == (y_val > 0.5))),
        teacher_val_accuracy=teacher_acc,
        trainer=summary,
        val_indices=val,
    )
    if directory is not None:
        save_router(router, directory / "router.ckpt")
        _write_json(directory / "summary.json", {"config": asdict(config), **result.to_dict()})
    return result


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy with logits (the stable form)."""
    return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def _checked_data(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 3 or x.shape[0] < 2 or x.shape[1] < 1 or x.shape[2] < 1:
        raise BatchError(f"windows x have shape {x.shape}; expected (n >= 2, T >= 1, features >= 1)")
    if y.shape != (x.shape[0],) or not np.all((y == 0) | (y == 1)):
        raise BatchError(f"routes y must be {x.shape[0]} labels in {{0, 1}}; got shape {y.shape}",
                         "Pass one 0/1 route per window.")
    if not np.all(np.isfinite(x)):
        raise BatchError("windows x hold NaN or Inf", "Clean or impute the logs before training.")
    return x, y.astype(np.float64)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON through a temporary file renamed into place; NaN/Inf become null (JSON has neither)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _problems(c: RouterConfig) -> list[str]:
    def count(name: str, value: Any, allow_none: bool = False) -> str | None:
        if allow_none and value is None:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else f"{name}={value!r}: must be an integer >= 1" + (" or None" if allow_none else "")

    def number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return None if ok else f"{name}={value!r}: must be a number in {bounds}"

    checks = [
        count("hidden_size", c.hidden_size), count("w_rank", c.w_rank, True), count("u_rank", c.u_rank, True),
        count("epochs", c.epochs), count("batch_size", c.batch_size), count("patience", c.patience),
        count("teacher_hidden", c.teacher_hidden), count("teacher_epochs", c.teacher_epochs),
        number("lr", c.lr, 0, 10, True, False), number("lr_decay", c.lr_decay, 0, 1, True, False),
        number("clip_norm", c.clip_norm, 0, math.inf, True, True), number("l2", c.l2, 0, math.inf, False, True),
        number("val_fraction", c.val_fraction, 0, 1, True, True),
        number("min_delta", c.min_delta, 0, math.inf, False, True),
        number("distill_alpha", c.distill_alpha, 0, 1, False, False),
        number("temperature", c.temperature, 0, math.inf, True, True),
    ]
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
        checks.append(f"seed={c.seed!r}: must be an integer >= 0")
    if c.nonlinearity not in NONLINEARITIES:
        checks.append(f"nonlinearity={c.nonlinearity!r}: must be one of {', '.join(NONLINEARITIES)}")
    if not isinstance(c.hybrid, HybridConfig):
        checks.append(f"hybrid={c.hybrid!r}: must be a HybridConfig")
    return [p for p in checks if p]
