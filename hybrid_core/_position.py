"""`DataPosition`: where `fit` is in its data, as a checkpoint part; `DataFeed`: the batches of one `fit` call.

Three kinds of source (`source_kind`):

- a *function* of the global step index: ``batches(trainer.steps_done)``; it needs no position;
- a *re-iterable* (a list, a ``DataLoader``, anything whose ``iter()`` starts a fresh pass): passes over it
  are counted (``epoch``, the passes completed; ``batch``, the steps taken in the current pass). A pass ends
  when the iterator stops, or after ``len(source)`` batches when the source has a length;
- a *one-shot iterator* (a generator, ``iter(x) is x``): one pass; it cannot be restarted or rewound.

Continuing a pass: the part keeps the live iterator of the last `fit` (not saved), so a later `fit` over
the *same object* continues it where the last one stopped. After a restore from a checkpoint, or when the
live iterator is out of step (a step that raised undid steps), the pass is rebuilt: a fresh ``iter()``
whose first ``batch`` batches are drawn again and dropped (the process's random generators are put back
afterwards, as the checkpoint left them). A ``DataLoader``'s own ``torch.Generator`` (``generator=``, or
its sampler's) is saved as it was when the pass started and set back before the pass is rebuilt, so a
shuffled loader with a seeded ``generator=`` draws the same order again. At the start of every pass the
source's (its ``sampler``'s, its ``batch_sampler``'s) ``set_epoch(epoch)`` is called when it has one
(``DistributedSampler``): a source that draws its order from the epoch number resumes exactly too. A
re-iterable of another object starts a new pass at its first batch (the epoch count goes on).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from ._errors import ConfigError
from ._statecheck import fields, integer, optional, sequence

__all__ = ["DataFeed", "DataPosition", "source_kind"]


def source_kind(batches: Any) -> str:
    """``"function"``, ``"iterator"`` (one-shot) or ``"reiterable"``; `ConfigError` for anything else."""
    if isinstance(batches, Iterator):
        return "iterator"
    if isinstance(batches, Iterable):
        return "reiterable"
    if callable(batches):
        return "function"
    raise ConfigError(f"batches is a {type(batches).__name__}: expected an iterable of batches or a function "
                      "of the global step index", "Pass a list, a DataLoader, a generator, or def batch(step): ...")


class DataPosition:
    """The data position of `fit` over re-iterable sources (a trainer part; see the module docstring).

    ``epoch`` is the number of passes completed, ``batch`` the steps taken in the current pass, and
    ``generators`` the states (uint8 arrays) of the source's torch generators when the current pass started.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0
        self.generators: list[np.ndarray] | None = None
        self.restored = False
        """The position came from a checkpoint: the next `fit` rebuilds its pass (not saved)."""
        self.source: Any = None
        """The object the live iterator iterates (not saved)."""
        self.iterator: Iterator[Any] | None = None
        """The live iterator of the current pass over `source`, or None (not saved)."""
        self.drawn = 0
        """Batches `iterator` has given in this pass (equal to `batch` while it is in step)."""
        self.ended: list[tuple[int, int, list[np.ndarray] | None]] = []
        """(epoch, steps, generator states at its start) of the passes ended lately, newest last (not saved): a step
        that raises may undo steps of the pass before."""

    def rewind(self, steps: int) -> None:
        """Go back ``steps`` steps (undone by a step that raised), into passes ended lately if need be."""
        while steps > self.batch and self.ended:
            steps -= self.batch
            self.epoch, self.batch, self.generators = self.ended.pop()
        self.batch = max(0, self.batch - steps)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batch", "generators"}`` (the generators' states at the pass's start: uint8 arrays or None)."""
        gens = None if self.generators is None else [g.copy() for g in self.generators]
        return {"epoch": self.epoch, "batch": self.batch, "generators": gens}

    def check_state_dict(self, state: dict[str, Any]) -> tuple[int, int, list[np.ndarray] | None]:
        """(epoch, batch, generator states) as `load_state_dict` would set them; `ValueError` naming the field."""
        fields(state, ("epoch", "batch", "generators"), what="data position")
        gens = optional(sequence, state["generators"], "generators", 64)
        if gens is not None:
            for i, g in enumerate(gens):
                if not isinstance(g, np.ndarray) or g.dtype != np.uint8 or g.ndim != 1:
                    raise ValueError(f"generators[{i}] is not a 1-D uint8 array (a torch generator's state)")
            gens = [g.copy() for g in gens]
        return integer(state["epoch"], "epoch"), integer(state["batch"], "batch"), gens

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved position; the next `fit` over a re-iterable rebuilds its pass from it."""
        self.epoch, self.batch, self.generators = self.check_state_dict(state)
        self.restored, self.source, self.iterator, self.drawn, self.ended = True, None, None, 0, []

    def __repr__(self) -> str:
        return f"DataPosition(epoch={self.epoch}, batch={self.batch})"


_END = object()
_ENDED_KEPT = 64
"""Ended passes remembered for `DataPosition.rewind` (more than any rollback undoes)."""


class DataFeed:
    """The batches of one `fit` call over ``batches`` (see the module docstring).

    ``epochs`` is the run's total number of passes (None: no limit); ``bounded`` says whether the run has a
    step total (without one and without ``epochs``, a re-iterable is trained to the end of the current pass).
    ``protect()`` is a context manager around batches drawn again to be dropped (it keeps the process's
    random generators as they were).
    """

    END = _END

    def __init__(self, position: DataPosition, batches: Any, epochs: int | None, bounded: bool,
                 protect: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self.position = position
        self.batches = batches
        self.kind = source_kind(batches)
        self.epochs = epochs
        self.bounded = bounded
        self._protect = protect
        self.length = _length(batches) if self.kind == "reiterable" else None
        self.passes_ended = 0
        """Passes ended in this call."""
        self.ran_out = False
        """The source ended before the run's total (a one-shot iterator's end, or an empty pass)."""
        self.empty = False

    @property
    def finished(self) -> bool:
        """No batch is due any more: ``epochs`` reached, or the one pass of an unbounded call ended."""
        if self.kind == "function":
            return False
        if self.epochs is not None and self.position.epoch >= self.epochs:
            return True
        return self.ran_out or (self.epochs is None and not self.bounded and self.passes_ended > 0)

    def next(self, step: int) -> Any:
        """The batch of step ``step``, or `END` when the source has none (see `finished`, `ran_out`)."""
        if self.kind == "function":
            return self.batches(step)
        pos = self.position
        while not self.finished:
            if pos.iterator is None or pos.source is not self.batches:
                self._begin()
            try:
                batch = next(pos.iterator)
            except StopIteration:
                self._end_pass(stopped=True)
                continue
            pos.drawn += 1
            return batch
        return _END

    def moved(self, delta: int) -> None:
        """After a step: ``delta`` is the change of the trainer's step count (1, or ≤ 0 when a step raised)."""
        if self.kind == "function":
            return
        pos = self.position
        if delta < 0:
            pos.rewind(-delta)
        else:
            pos.batch += delta
        if pos.drawn != pos.batch and self.kind == "reiterable":
            pos.iterator = None  # it gave batches that were not trained on: rebuild the pass from `batch`
        if delta > 0 and self.length is not None and pos.batch >= self.length:
            self._end_pass(stopped=False)

    def _begin(self) -> None:
        """Make the live iterator: continue the last call's, rebuild the pass, or start a new one."""
        pos, source = self.position, self.batches
        if self.kind == "iterator":
            if pos.restored and pos.batch > 0:
                warnings.warn(f"hybrid_core: resuming at batch {pos.batch} of epoch {pos.epoch}, but batches is a "
                              "one-shot iterator, which cannot be fast-forwarded: training goes on with the batches "
                              "it gives from where it is. Pass a re-iterable (a list, a DataLoader) or a function "
                              "of the step index to resume on the batches the run would have seen.", stacklevel=4)
            if not pos.restored and pos.source is not source:
                pos.batch = 0  # another iterator: a new pass
            pos.source, pos.iterator, pos.drawn, pos.restored = source, source, pos.batch, False
            return
        if pos.restored or (pos.source is source and pos.batch > 0):
            self._rebuild()
        else:
            if pos.source is not source:
                pos.batch = 0  # another object: a new pass at its first batch
            pos.generators = _states(_generators(source))
            pos.source, pos.iterator, pos.drawn = source, self._fresh(), 0
        pos.restored = False

    def _rebuild(self) -> None:
        pos, source = self.position, self.batches
        gens = _generators(source)
        if pos.generators is not None and len(pos.generators) == len(gens):
            for g, saved in zip(gens, pos.generators, strict=True):
                g.set_state(sys.modules["torch"].from_numpy(saved.copy()))
        elif pos.generators:
            warnings.warn(f"hybrid_core: the data position holds {len(pos.generators)} torch generator state(s), "
                          f"this source has {len(gens)} generator(s): its order is not restored", stacklevel=5)
        else:
            pos.generators = _states(gens)
        # Drawn again and dropped: the process's generators are put back afterwards (a loader without its own
        # generator draws its order from torch's global one when the pass starts, so iter() is inside too).
        with self._protect() if pos.batch > 0 else nullcontext():
            iterator = self._fresh()
            for i in range(pos.batch):
                try:
                    next(iterator)
                except StopIteration:
                    raise ConfigError(f"the data position is batch {pos.batch} of epoch {pos.epoch}, but this source's "
                                      f"pass ended after {i} batches: it is not the source the position was taken on",
                                      "Resume with the same data (same batches, same order), or reset the position "
                                      "with trainer.data_position.load_state_dict({'epoch': 0, 'batch': 0, "
                                      "'generators': None}).") from None
        pos.source, pos.iterator, pos.drawn = source, iterator, pos.batch

    def _fresh(self) -> Iterator[Any]:
        for obj in _parts(self.batches):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.position.epoch)
        return iter(self.batches)

    def _end_pass(self, stopped: bool) -> None:
        pos = self.position
        if stopped and pos.batch == 0:
            self.ran_out = self.empty = True  # nothing in this pass: never loop on an empty source
            pos.iterator = None
            return
        pos.ended = [*pos.ended[-(_ENDED_KEPT - 1):], (pos.epoch, pos.batch, pos.generators)]
        pos.epoch, pos.batch, pos.iterator, pos.drawn = pos.epoch + 1, 0, None, 0
        self.passes_ended += 1
        if self.kind == "iterator":
            pos.source = None
            if self.epochs is None or pos.epoch < self.epochs:
                self.ran_out = self.bounded or self.epochs is not None  # a one-shot iterator makes one pass
            return
        pos.generators = _states(_generators(self.batches))  # as they are now: when the next pass starts


def _length(source: Any) -> int | None:
    try:
        n = len(source)
    except (TypeError, NotImplementedError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _parts(source: Any) -> list[Any]:
    """The source, its sampler and its batch sampler (each once): where generators and ``set_epoch`` live."""
    out: list[Any] = []
    for obj in (source, getattr(source, "sampler", None), getattr(source, "batch_sampler", None),
                getattr(getattr(source, "batch_sampler", None), "sampler", None)):
        if obj is not None and all(obj is not o for o in out):
            out.append(obj)
    return out


def _generators(source: Any) -> list[Any]:
    """The distinct ``torch.Generator`` objects of a source (a DataLoader's ``generator=``, its samplers')."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    found: list[Any] = []
    for obj in _parts(source):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _states(gens: list[Any]) -> list[np.ndarray] | None:
    return [g.get_state().numpy().copy() for g in gens] if gens else None
