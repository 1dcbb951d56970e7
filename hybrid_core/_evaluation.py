"""Evaluating and exporting a read-out of averaged weights: the bodies of `HybridTrainer.evaluation_parameters`
and `HybridTrainer.export_parameters`, as plain functions of the read-out and the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._checks import has_method
from ._errors import ModelError
from ._ledger import copies
from ._protocols import Array, Model
from ._readout import ReadOut

__all__ = ["export_parameters", "readout_swapped_in"]


@contextmanager
def readout_swapped_in(readout: ReadOut, model: Model, kind: str | None = None) -> Iterator[str]:
    """Swap the read-out ``kind`` (None: the chosen one) into ``model`` for the ``with`` body; yields its name.

    On exit, also when the body raises, the raw weights are put back bit for bit. Needs `Model.set_parameters`
    unless the read-out is ``raw``.
    """
    chosen = readout.resolve(kind)
    if chosen == "raw":
        yield chosen
        return
    if not has_method(model, "set_parameters"):
        raise ModelError(f"{type(model).__name__} has no set_parameters, so a read-out cannot be swapped in",
                         "Implement Model.set_parameters(values), or evaluate the raw weights (kind='raw').")
    raw = copies(model.parameters())
    model.set_parameters(readout.values(chosen))
    try:
        yield chosen
    finally:
        model.set_parameters(raw)


def export_parameters(readout: ReadOut, model: Model, kind: str | None = None) -> list[Array]:
    """Fresh copies of the parameters to deploy: the read-out ``kind`` (None: the chosen one), or the raw weights."""
    chosen = readout.resolve(kind)
    return copies(model.parameters()) if chosen == "raw" else readout.values(chosen)
