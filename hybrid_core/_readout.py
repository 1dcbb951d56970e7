"""`ReadOut`: a nowcast of where the noisy weight trajectory settles, read out for evaluation only.

Two averages of parameter snapshots taken every ``readout_spacing`` real steps:

- ``lawa``: the mean of the last ``lawa_snapshots`` snapshots (latest weight averaging, LAWA);
- ``ema``: an exponential moving average of the snapshots with a per-step decay of
  ``ema_decay`` (a snapshot ``n`` steps after the previous one gets weight ``1 − decay**n``),
  bias-corrected: divided by the total weight, so it is a weighted mean of snapshots from the
  first one on and never shrinks toward the zero it started from.

Training always continues from the raw weights: the read-out is swapped in only for evaluation
(`HybridTrainer.evaluation_parameters`) and export. A snapshot is staged (copied on the device, no
host read) right after the real step whose index it carries, and only committed when the read of
that step found every value finite; a rollback to the last verified point drops what is staged,
so NaN weights never enter an average.

Every ``readout_check_every`` steps the trainer evaluates one read-out (they take turns) on the
next real step's batch (one forward pass, before the update) and pairs it with that step's own loss on the
same batch; `chosen` is the read-out whose mean difference over the last `COMPARISONS` pairs is
the most negative, else ``raw``. Memory: ``lawa_snapshots`` copies of the parameters for LAWA, one
for the EMA, plus the snapshots staged between two reads (at most ``read_every / spacing + 1``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ._config import HybridConfig
from ._errors import ConfigError
from ._inplace import copy_into, lerp_
from ._protocols import Array, Model
from ._statecheck import arrays_like, fields, integer, optional, real, reals, sequence

__all__ = ["COMPARISONS", "READOUTS", "ReadOut"]

READOUTS = ("lawa", "ema")
"""The read-outs `HybridConfig.readout` may name."""

COMPARISONS = 4
"""Paired comparisons (read-out vs raw on one batch) whose mean decides `ReadOut.chosen`."""


class ReadOut:
    """Averaged-weight read-outs of one trainer (see the module docstring)."""

    def __init__(self, config: HybridConfig, model: Model) -> None:
        self.kinds: tuple[str, ...] = tuple(config.readout)
        self._model = model
        self._count = config.lawa_snapshots
        self._spacing = config.readout_spacing
        self._decay = config.ema_decay
        self._check_every = config.readout_check_every
        self._snapshots: deque[tuple[int, list[Array]]] = deque(maxlen=self._count)
        self._staged: list[tuple[int, list[Array]]] = []
        self._free: list[list[Array]] = []
        """Buffers of snapshots that left the window, reused by the next `stage` (torch, NumPy)."""
        self._ema: list[Array] | None = None
        self._ema_norm = 0.0
        self._ema_step = 0
        self._diffs: dict[str, deque[float]] = {k: deque(maxlen=COMPARISONS) for k in self.kinds}
        self._cache: dict[str, list[Array]] = {}
        self._turn = 0
        """Which read-out the next paired check evaluates (they take turns)."""
        self.chosen = "raw"
        """The read-out that evaluated best in the latest paired comparisons (``raw`` until one is better)."""

    @property
    def enabled(self) -> bool:
        """Whether any read-out is kept."""
        return bool(self.kinds)

    @property
    def memory_copies(self) -> int:
        """Parameter-sized copies kept between reads (staged snapshots not counted)."""
        return (self._count if "lawa" in self.kinds else 0) + (1 if "ema" in self.kinds else 0)

    # -- snapshots ----------------------------------------------------------------------------

    def stage(self, step: int, model: Model) -> None:
        """After real step ``step``: copy the weights if ``step + 1`` is a multiple of the spacing."""
        if self.kinds and (step + 1) % self._spacing == 0:
            buffer = self._free.pop() if self._free else None
            self._staged.append((step + 1, copy_into(buffer, model.parameters())))

    def commit(self) -> None:
        """The staged snapshots' steps were read finite: add them to the averages."""
        for steps, params in self._staged:
            if "ema" in self.kinds:
                self._fold_ema(steps, params)
            if "lawa" not in self.kinds:
                self._free.append(params)
                continue
            if len(self._snapshots) == self._count:
                self._free.append(self._snapshots[0][1])
            self._snapshots.append((steps, params))
        if self._staged:
            self._cache = {}
        self._staged = []

    def drop_after(self, steps: int) -> None:
        """Forget LAWA snapshots taken after ``steps`` steps (they are about to be retaken on a new path;
        the EMA keeps what it folded in)."""
        kept = [(s, p) for s, p in self._snapshots if s <= steps]
        if len(kept) != len(self._snapshots):
            self._free += [p for s, p in self._snapshots if s > steps]
            self._snapshots = deque(kept, maxlen=self._count)
            self._cache = {}
        self.discard()

    def discard(self) -> None:
        """A rollback: forget the staged snapshots (their steps will be replayed)."""
        self._free += [p for _, p in self._staged]
        self._staged = []

    def _fold_ema(self, steps: int, params: list[Array]) -> None:
        # The average starts from zeros at step 0; dividing by the total weight `_ema_norm` removes that bias.
        keep = self._decay ** (steps - self._ema_step)
        if self._ema is None:
            self._ema = [(1.0 - keep) * p for p in params]
        else:
            self._ema = lerp_(self._ema, params, 1.0 - keep)
        self._ema_norm = keep * self._ema_norm + (1.0 - keep)
        self._ema_step = steps

    # -- the read-outs ------------------------------------------------------------------------

    def available(self, kind: str) -> bool:
        """Whether ``kind`` has at least one committed snapshot."""
        if kind == "lawa":
            return "lawa" in self.kinds and bool(self._snapshots)
        return kind == "ema" and self._ema is not None

    def values(self, kind: str) -> list[Array]:
        """The read-out ``kind``'s parameters (fresh arrays, cached until the next commit)."""
        if not self.available(kind):
            raise ConfigError(f"read-out {kind!r} is not available yet",
                              "It needs one snapshot first (every readout_spacing real steps); "
                              "ask for 'raw' meanwhile.")
        if kind not in self._cache:
            if kind == "lawa":
                snaps = [s for _, s in self._snapshots]
                out = []
                for i in range(len(snaps[0])):
                    acc = snaps[0][i]
                    for s in snaps[1:]:
                        acc = acc + s[i]
                    out.append(acc / len(snaps))
            else:
                assert self._ema is not None
                out = [e / self._ema_norm for e in self._ema]
            self._cache[kind] = out
        return copy_into(None, self._cache[kind])

    def resolve(self, kind: str | None) -> str:
        """``kind``, or `chosen` when None; `ConfigError` for an unknown, unkept or not yet available read-out."""
        if kind is None:
            return self.chosen if self.chosen == "raw" or self.available(self.chosen) else "raw"
        if kind == "raw":
            return kind
        if kind not in READOUTS:
            raise ConfigError(f"read-out {kind!r}: must be 'raw' or one of {', '.join(map(repr, READOUTS))}")
        if kind not in self.kinds:
            raise ConfigError(f"read-out {kind!r} is not kept by this trainer (HybridConfig.readout={self.kinds})",
                              f"Add {kind!r} to HybridConfig.readout.")
        if not self.available(kind):
            raise ConfigError(f"read-out {kind!r} is not available yet",
                              "It needs one snapshot first (every readout_spacing real steps); ask for 'raw' "
                              "meanwhile.")
        return kind

    # -- paired comparisons ---------------------------------------------------------------------

    def compare_due(self, step: int) -> bool:
        """Whether real step ``step`` should pair its loss with the read-outs' on its batch."""
        return (self._check_every > 0 and step > 0 and step % self._check_every == 0
                and any(self.available(k) for k in self.kinds))

    def probe(self, model: Model, batch: Any, forward: Callable[[Any], Array], with_raw: bool = False
              ) -> dict[str, Array]:
        """One read-out's loss on ``batch`` (a device array), the read-outs taking turns so that a check costs
        one forward pass; the raw weights are put back exactly. ``with_raw`` adds the raw weights' own
        loss by ``forward`` (key ``"raw"``), for models whose training loss is not comparable with it."""
        ready = [k for k in self.kinds if self.available(k)]
        kinds = [ready[self._turn % len(ready)]]
        self._turn += 1
        raw = copy_into(None, model.parameters())
        out = {"raw": forward(batch)} if with_raw else {}
        try:
            for kind in kinds:
                model.set_parameters(self.values(kind))
                out[kind] = forward(batch)
        finally:
            model.set_parameters(raw)
        return out

    def record(self, raw_loss: float, losses: dict[str, float]) -> None:
        """One paired comparison: the raw weights' loss and each read-out's on the same batch."""
        if not math.isfinite(raw_loss):
            return
        for kind, loss in losses.items():
            if math.isfinite(loss):
                self._diffs[kind].append(loss - raw_loss)
        means = {k: sum(d) / len(d) for k, d in self._diffs.items() if d}
        best = min(means, key=lambda k: means[k], default=None)
        self.chosen = best if best is not None and means[best] < 0 else "raw"

    def summary(self) -> dict[str, Any]:
        """What the read-out holds and decided (for the metrics summary)."""
        return {"kinds": list(self.kinds), "chosen": self.chosen, "snapshots": len(self._snapshots),
                "memory_copies": self.memory_copies,
                "mean_diff_vs_raw": {k: (sum(d) / len(d) if d else None) for k, d in self._diffs.items()},
                "comparisons": {k: len(d) for k, d in self._diffs.items()}}

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Snapshots, the EMA and the comparisons (nothing is staged: a checkpoint is written after a read)."""
        return {"kinds": list(self.kinds), "snapshots": [[s, list(p)] for s, p in self._snapshots],
                "ema": None if self._ema is None else list(self._ema), "ema_norm": self._ema_norm,
                "ema_step": self._ema_step, "diffs": {k: list(d) for k, d in self._diffs.items()},
                "chosen": self.chosen, "turn": self._turn}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `ValueError` naming the field if malformed or not fitting
        this model (count, library, shapes, dtypes, finite values) or this config (snapshots kept, read-outs)."""
        fields(state, ("kinds", "snapshots", "ema", "ema_norm", "ema_step", "diffs", "chosen"), ("turn",),
               what="read-out state")
        params = self._model.parameters()
        for i, kind in enumerate(sequence(state["kinds"], "kinds", len(READOUTS))):
            if kind not in READOUTS:
                raise ValueError(f"kinds[{i}]={kind!r}: not one of {', '.join(READOUTS)}")
        snapshots = []
        for i, item in enumerate(sequence(state["snapshots"], "snapshots", self._count)):
            step, arrays = sequence(item, f"snapshots[{i}]", 2, 2)
            snapshots.append((integer(step, f"snapshots[{i}].step"), arrays_like(arrays, f"snapshots[{i}]", params)))
        diffs = state["diffs"]
        if not isinstance(diffs, dict) or any(k not in READOUTS for k in diffs):
            raise ValueError(f"diffs must map read-outs ({', '.join(READOUTS)}) to lists of numbers")
        chosen = state["chosen"]
        if chosen != "raw" and chosen not in self.kinds:
            raise ValueError(f"chosen read-out {chosen!r} is not kept by this config")
        return {"_snapshots": deque(snapshots, maxlen=self._count),
                "_ema": optional(arrays_like, state["ema"], "ema", params),
                "_ema_norm": real(state["ema_norm"], "ema_norm", 0.0, 1.0),
                "_ema_step": integer(state["ema_step"], "ema_step"),
                "_diffs": {k: deque(reals(diffs.get(k, []), f"diffs[{k!r}]", COMPARISONS, finite=False),
                                    maxlen=COMPARISONS) for k in self.kinds},
                "chosen": chosen, "_turn": integer(state.get("turn", 0), "turn")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if it does not fit
        this model or config)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)
        self._staged, self._cache, self._free = [], {}, []


