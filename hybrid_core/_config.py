"""`HybridConfig`: every knob of the trainer, validated all at once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ._errors import ConfigError

__all__ = ["DIRECTIONS", "LAYER_FREEZE", "NONFINITE_POLICIES", "HybridConfig"]

DIRECTIONS = ("extrapolate", "linefit")
"""Where a predicted step's direction comes from: ``extrapolate`` = `Optimizer.extrapolate()`,
``linefit`` = a least-squares line through parameter snapshots."""

NONFINITE_POLICIES = ("raise", "skip")
"""What a real step does with a NaN/Inf loss or gradient: raise `DivergenceError` or skip the batch."""

LAYER_FREEZE = ("off", "autofreeze")
"""Layer-wise strategies `HybridConfig.layer_freeze` may name: ``off``, or ``autofreeze`` (freeze the front
parameter groups whose gradient norms stopped changing, guarded; see `hybrid_core._freeze`)."""

_INT_MAX = 10**9
_TUPLE_FIELDS = ("horizon_arms", "correction_fractions", "readout")
_READOUTS = ("lawa", "ema")


@dataclass(frozen=True)
class HybridConfig:
    """Settings of `HybridTrainer`; invalid values raise one `ConfigError` listing every problem.

    Phase lengths are in steps. The phase defaults come from an earlier parameter sweep of this
    design (a starting point, kept while measurements do not argue against them); the
    bookkeeping defaults (``read_every``, ``idle_after``, ``idle_steps``) are general choices,
    not fitted to a task: their costs are measured in docs/benchmarks.md.
    """

    warmup_steps: int = 100
    """Real steps before anything is predicted (statistics baseline)."""
    min_full_steps: int = 50
    """Real steps in each FULL phase before a PREDICT phase may start."""
    max_full_steps: int = 2000
    """A FULL phase never lasts longer: at this bound a short probe PREDICT is tried."""
    max_predict_steps: int = 75
    """Upper bound of a PREDICT phase (the horizon)."""
    probe_steps: int = 5
    """Length of the probe PREDICT that ends an over-long FULL phase (checked every step)."""
    check_interval: int = 15
    """Forward-only loss check every this many predicted steps; 0 = never."""
    correct_steps: int = 10
    """Real steps in each CORRECT phase."""
    confidence_threshold: float = 0.60
    """The dynamics model's confidence needed to start a PREDICT phase."""
    divergence_sigma: float = 2.2
    """A real-step loss this many standard deviations above its EMA counts as diverging."""
    direction: str = "extrapolate"
    """Source of predicted-step directions, one of `DIRECTIONS`."""
    linefit_snapshots: int = 5
    """``linefit``: how many parameter snapshots the line goes through (memory: that many copies)."""
    linefit_spacing: int = 10
    """``linefit``: real steps between snapshots."""
    horizon_arms: tuple[int, ...] = (0, 5, 15, 30, 50, 75)
    """PREDICT horizons the bandit chooses from; must include 0 (do not predict)."""
    bandit_alpha: float = 0.5
    """LinUCB exploration weight; 0 = greedy."""
    use_bandit: bool = True
    """Let the bandit pick the horizon (False: always ``max_predict_steps``)."""
    horizon_ladder: bool = True
    """Unlock a horizon only after the next shorter one earned a positive mean reward, so a task
    where prediction does not pay falls back to plain training after one short trial."""
    correction_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)
    """Fractions of the PREDICT displacement to roll back that CORRECT's line search tries."""
    forward_cost: float = 0.35
    """Price of a forward-only pass in FULL steps, for the bandit's reward (counted, not timed)."""
    predict_step_cost: float = 0.05
    """Price of one predicted step in FULL steps, for the bandit's reward."""
    explode_ratio: float = 10.0
    """Gradient norm this many times the WARMUP mean forces real steps."""
    on_nonfinite: str = "raise"
    """NaN/Inf loss or gradient in a real step: ``raise`` `DivergenceError` or ``skip`` the batch. Skipping
    gives up with `DivergenceError` at once when the weights themselves are not finite (skipping cannot
    help), and after ``max_consecutive_skips`` skips in a row."""
    max_consecutive_skips: int = 100
    """``on_nonfinite="skip"``: real steps that may be skipped in a row; the next non-finite one raises
    `DivergenceError` instead (a step read finite resets the count). Scattered bad batches never come near
    it (with 10% of batches bad at random, 100 in a row has probability 1e-100); a run this long means the
    model or a stretch of the data produces nothing finite, and stopping says so."""
    history_size: int = 256
    """Capacity of each ring buffer of `TrainingState`."""
    metrics_max_records: int = 10_000
    """Per-step records kept in memory by `MetricsCollector` (totals are always exact)."""
    seed: int = 0
    """Seed of every random choice the trainer makes."""
    read_every: int = 8
    """Real steps between host reads of the loss and gradient statistics (1 = every step). Between
    reads the values stay on the device; the statistics are measured on the step of each read; a
    non-finite value found late rolls the run back to the last read that was all finite and replays
    the steps since, reading each (see docs/architecture.md)."""
    idle_after: int = 4
    """FULL-phase decisions in a row with confidence below half the threshold before the trainer goes
    idle (no statistics, no features, no dynamics model: the loss alone is read); a PREDICT cycle whose
    reward leaves the bandit no horizon that paid makes it idle at once. 0 = never idle."""
    idle_steps: int = 1000
    """Real steps an idle spell lasts; then the dynamics model is fed again and, after
    ``min_full_steps`` fed steps, the question whether to predict is asked again."""

    readout: tuple[str, ...] = ("lawa", "ema")
    """Averaged-weight read-outs kept for evaluation (``lawa``, ``ema``; empty = none). Training always
    continues from the raw weights; `HybridTrainer.evaluation_parameters` swaps the best one in."""
    lawa_snapshots: int = 5
    """LAWA averages the last this many snapshots (memory: that many copies of the parameters)."""
    readout_spacing: int = 10
    """Real steps between two read-out snapshots."""
    ema_decay: float = 0.98
    """Per-step decay of the EMA read-out (bias-corrected; one copy of the parameters)."""
    readout_check_every: int = 100
    """Steps between paired comparisons of a read-out (they take turns) with the raw weights on a real
    step's batch (one forward pass); 0 = never compare (then ``raw`` stays the chosen one)."""
    lr_recommend: bool = True
    """Let the trainer raise the learning rate to a Prodigy-style estimate seeded with the user's rate,
    guarded by the divergence monitor and rollback (Adam-family optimizers without a scheduler)."""
    lr_search_steps: int = 200
    """Real steps at the start of the run during which the learning-rate estimate is fed at most (the search
    ends earlier once five scheduled reads in a row bring no rise)."""
    layer_freeze: str = "off"
    """Layer-wise strategy, one of `LAYER_FREEZE`: ``autofreeze`` freezes, every ``freeze_every`` steps, the
    front parameter groups whose gradient norms changed least (never the last group), guarded by the
    divergence monitor and the loss trend (needs `Model.parameter_groups`/`set_trainable`; otherwise the
    summary says it is unavailable)."""
    freeze_every: int = 50
    """Steps per AutoFreeze interval: each interval's gradient norms (measured steps only) are compared
    with the previous interval's, and a freeze is judged on the loss of the interval after it."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError(problems)

    def replace(self, **changes: Any) -> HybridConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError([f"unknown field {name!r}" for name in unknown])
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return HybridConfig(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HybridConfig:
        """The config `to_dict` described (lists accepted for the tuple fields); `ConfigError` if invalid."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError([f"unknown field {name!r}" for name in unknown])
        clean = {k: tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v for k, v in values.items()}
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for checkpoints and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _int_problem(name: str, value: Any, low: int, high: int = _INT_MAX) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name}={value!r}: must be an integer in [{low}, {high}]"
    if not low <= value <= high:
        return f"{name}={value!r}: must be in [{low}, {high}]"
    return None


def _float_problem(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> str | None:
    left = "(" if open_low else "["
    allowed = f"{left}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r}: must be a number in {allowed}"
    if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        return f"{name}={value!r}: must be a finite number in {allowed}"
    return None


def _choice_problem(name: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    if not isinstance(value, str) or value not in allowed:
        return f"{name}={value!r}: must be one of {', '.join(map(repr, allowed))}"
    return None


def _arms_problem(arms: Any) -> str | None:
    ok = isinstance(arms, tuple) and len(arms) >= 1 and all(
        isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 100_000 for a in arms)
    if not ok or 0 not in arms or len(set(arms)) != len(arms):
        return f"horizon_arms={arms!r}: must be a tuple of distinct integers in [0, 100000] including 0"
    return None


def _fractions_problem(fractions: Any) -> str | None:
    ok = isinstance(fractions, tuple) and len(fractions) >= 1 and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 <= f <= 1.0 for f in fractions)
    return None if ok else f"correction_fractions={fractions!r}: must be a non-empty tuple of numbers in [0, 1]"


def _readout_problem(kinds: Any) -> str | None:
    ok = isinstance(kinds, tuple) and all(k in _READOUTS for k in kinds) and len(set(kinds)) == len(kinds)
    return None if ok else f"readout={kinds!r}: must be a tuple of distinct names from {', '.join(_READOUTS)}"


def _problems(c: HybridConfig) -> list[str]:
    checks = [
        _int_problem("warmup_steps", c.warmup_steps, 1),
        _int_problem("min_full_steps", c.min_full_steps, 1),
        _int_problem("max_full_steps", c.max_full_steps, 1),
        _int_problem("max_predict_steps", c.max_predict_steps, 1, 100_000),
        _int_problem("probe_steps", c.probe_steps, 1, 100_000),
        _int_problem("check_interval", c.check_interval, 0, 100_000),
        _int_problem("correct_steps", c.correct_steps, 1),
        _float_problem("confidence_threshold", c.confidence_threshold, 0.0, 1.0),
        _float_problem("divergence_sigma", c.divergence_sigma, 0.0, 1e6, open_low=True),
        _choice_problem("direction", c.direction, DIRECTIONS),
        _choice_problem("on_nonfinite", c.on_nonfinite, NONFINITE_POLICIES),
        _int_problem("max_consecutive_skips", c.max_consecutive_skips, 1),
        _int_problem("linefit_snapshots", c.linefit_snapshots, 2, 1000),
        _int_problem("linefit_spacing", c.linefit_spacing, 1),
        _arms_problem(c.horizon_arms),
        _float_problem("bandit_alpha", c.bandit_alpha, 0.0, 1e6),
        None if isinstance(c.use_bandit, bool) else f"use_bandit={c.use_bandit!r}: must be True or False",
        None if isinstance(c.horizon_ladder, bool) else f"horizon_ladder={c.horizon_ladder!r}: must be True or False",
        _fractions_problem(c.correction_fractions),
        _float_problem("forward_cost", c.forward_cost, 0.0, 1.0),
        _float_problem("predict_step_cost", c.predict_step_cost, 0.0, 1.0),
        _float_problem("explode_ratio", c.explode_ratio, 1.0, 1e12, open_low=True),
        _int_problem("history_size", c.history_size, 16, 1_000_000),
        _int_problem("metrics_max_records", c.metrics_max_records, 0),
        _int_problem("seed", c.seed, 0, 2**63 - 1),
        _int_problem("read_every", c.read_every, 1, 100_000),
        _int_problem("idle_after", c.idle_after, 0),
        _int_problem("idle_steps", c.idle_steps, 1),
        _readout_problem(c.readout),
        _int_problem("lawa_snapshots", c.lawa_snapshots, 1, 1000),
        _int_problem("readout_spacing", c.readout_spacing, 1),
        _float_problem("ema_decay", c.ema_decay, 0.0, 1.0, open_low=True),
        None if c.ema_decay != 1.0 else "ema_decay=1.0: must be < 1 (1 never moves the average)",
        _int_problem("readout_check_every", c.readout_check_every, 0),
        None if isinstance(c.lr_recommend, bool) else f"lr_recommend={c.lr_recommend!r}: must be True or False",
        _int_problem("lr_search_steps", c.lr_search_steps, 0),
        _choice_problem("layer_freeze", c.layer_freeze, LAYER_FREEZE),
        _int_problem("freeze_every", c.freeze_every, 1),
    ]
    problems = [p for p in checks if p is not None]
    # Cross-field bounds only make sense once both fields are valid integers.
    if not any(p.startswith(("min_full_steps=", "max_full_steps=")) for p in problems):
        if c.max_full_steps < c.min_full_steps:
            problems.append(
                f"max_full_steps={c.max_full_steps!r}: must be >= min_full_steps ({c.min_full_steps})"
            )
    if not any(p.startswith(("probe_steps=", "max_predict_steps=")) for p in problems):
        if c.probe_steps > c.max_predict_steps:
            problems.append(
                f"probe_steps={c.probe_steps!r}: must be <= max_predict_steps ({c.max_predict_steps})"
            )
    if c.layer_freeze == "autofreeze" and not any(p.startswith(("freeze_every=", "read_every=")) for p in problems):
        if c.freeze_every < c.read_every:
            problems.append(f"freeze_every={c.freeze_every!r}: must be >= read_every ({c.read_every}) with "
                            "layer_freeze='autofreeze' (gradient norms are measured on read steps only)")
    return problems
