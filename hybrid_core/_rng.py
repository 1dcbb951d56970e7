"""`GlobalRandomState`: the process-global random generators a training step draws from, as a trainer part.

The trainer's own generators are saved by the parts that own them (the RSSM dynamics model's NumPy
``Generator`` is in the ``dynamics`` part). This part holds what belongs to no object of the trainer:
the generators a model's forward pass draws from through module-level functions — Python's
``random``, NumPy's global ``numpy.random`` and torch's default CPU generator (``nn.Dropout``), plus
torch's CUDA generators once CUDA is initialized. JAX keeps no generator of its own: its keys are
values the caller passes in (derive them from the step index in the batch function, and a resumed run
gets the same keys), and the trainer carries none.

These generators belong to the process, not to the trainer: `load_state_dict` (reached through
`HybridTrainer.load`, `HybridTrainer.restore` and a resuming `fit`) sets the process's generators,
which also changes what any other code in the process draws next. Saving only reads them.
"""

from __future__ import annotations

import importlib
import math
import random
import sys
import warnings
from typing import Any

import numpy as np

from ._errors import CheckpointError

__all__ = ["GlobalRandomState"]

_STATE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError)


class GlobalRandomState:
    """The process's framework random generators (Python, NumPy, torch CPU and CUDA) as a checkpoint part.

    ``state_dict`` reads Python's and NumPy's global generators always, torch's when torch is
    imported (its CUDA generators when CUDA is initialized). ``load_state_dict`` checks every saved
    state first, then sets the process's generators to them; a generator the file does not hold is
    left as it is. Torch state in a process without torch, or CUDA states for another number of
    CUDA devices than this process has, are not restored: a `RuntimeWarning` says so.
    """

    def state_dict(self) -> dict[str, Any]:
        """``{"python": …, "numpy": …, "torch": None | {"cpu": uint8 array, "cuda": [uint8 array, …]}}``."""
        version, internal, gauss = random.getstate()
        torch = sys.modules.get("torch")
        return {
            "python": {"version": version, "internal": np.array(internal, dtype=np.uint32),
                       "gauss_next": gauss},
            "numpy": np.random.get_state(legacy=False),
            "torch": None if torch is None else _torch_state(torch),
        }

    def check_state_dict(self, state: dict[str, Any]) -> tuple[Any, Any, Any]:
        """The generators' states `load_state_dict` would set; `CheckpointError` naming the generator if
        ``state`` is malformed. Changes nothing."""
        if not isinstance(state, dict) or set(state) != {"python", "numpy", "torch"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"the random state must hold python, numpy and torch, not {keys}")
        python = _checked("python", _python_state, state["python"])
        numpy_state = _checked("numpy", _numpy_state, state["numpy"])
        torch_plan = None if state["torch"] is None else _checked("torch", _torch_plan, state["torch"])
        return python, numpy_state, torch_plan

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the process's generators to ``state`` (as `state_dict` made it), or raise `CheckpointError` first."""
        python, numpy_state, torch_plan = self.check_state_dict(state)
        random.setstate(python)
        np.random.set_state(numpy_state)
        if torch_plan is not None:
            torch_plan()


def _checked(field: str, parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except CheckpointError as exc:
        raise CheckpointError(f"random state {field}: {exc.message}", exc.recovery) from exc
    except _STATE_ERRORS as exc:
        raise CheckpointError(f"random state {field} is not valid ({type(exc).__name__}: {exc})") from exc


def _python_state(saved: dict[str, Any]) -> tuple[Any, ...]:
    internal = saved["internal"]
    if not isinstance(internal, np.ndarray) or internal.dtype != np.uint32 or internal.ndim != 1:
        raise CheckpointError(f"internal must be a 1-D uint32 array, not {type(internal).__name__}")
    gauss = saved["gauss_next"]
    if gauss is not None and not (isinstance(gauss, float) and math.isfinite(gauss)):
        raise CheckpointError(f"gauss_next must be a finite float or None, not {gauss!r}")
    candidate = (saved["version"], tuple(int(v) for v in internal), gauss)
    random.Random().setstate(candidate)  # Python's own checks, on a scratch generator
    return candidate


def _numpy_state(saved: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(saved, dict):
        raise CheckpointError(f"a dict was expected, not {type(saved).__name__}")
    current = np.random.get_bit_generator()
    if saved.get("bit_generator") != type(current).__name__:
        raise CheckpointError(
            f"saved from a {saved.get('bit_generator')!r} global generator, this process's is "
            f"{type(current).__name__!r}",
            f"Call np.random.set_bit_generator(np.random.{saved.get('bit_generator')}()) before loading.")
    _like(saved, np.random.get_state(legacy=False), "")
    if saved["bit_generator"] == "MT19937":  # what np.random.seed makes; NumPy itself lets these through
        key, pos = saved["state"]["key"], saved["state"]["pos"]
        if key.shape != (624,) or not 0 <= pos <= 624 or saved["has_gauss"] not in (0, 1):
            raise CheckpointError(f"not an MT19937 state: key of shape {key.shape}, pos {pos}, "
                                  f"has_gauss {saved['has_gauss']}")
    np.random.RandomState(type(current)()).set_state(saved)  # NumPy's own checks, on a scratch generator
    return saved


def _like(saved: Any, current: Any, where: str) -> None:
    """``saved`` has the layout of ``current``: the same keys, array shapes and dtypes, scalar types; finite floats."""
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(f"{where or 'the state'} holds {found}, expected {sorted(current)}")
        for key, value in current.items():
            _like(saved[key], value, f"{where}.{key}" if where else str(key))
    elif isinstance(current, np.ndarray):
        if not isinstance(saved, np.ndarray) or saved.dtype != current.dtype or saved.shape != current.shape:
            found = f"{saved.dtype} {saved.shape}" if isinstance(saved, np.ndarray) else type(saved).__name__
            raise CheckpointError(f"{where} is {found}, expected {current.dtype} {current.shape}")
    elif type(saved) is not type(current) or (isinstance(saved, float) and not math.isfinite(saved)):
        raise CheckpointError(f"{where} is {saved!r}, expected a finite {type(current).__name__}")


def _torch_state(torch: Any) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if _cuda_in_use(torch) else []
    return {"cpu": torch.get_rng_state().numpy().copy(), "cuda": [s.numpy().copy() for s in cuda]}


def _cuda_in_use(torch: Any) -> bool:
    """Whether CUDA is initialized: before that no CUDA generator has drawn (and reading one would start CUDA)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def _bytes(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise CheckpointError(f"{what} must be a 1-D uint8 array, not {type(value).__name__}")
    return value


def _torch_plan(saved: dict[str, Any]) -> Any:
    """Check the saved torch states; return the function that applies them (None: nothing to do here)."""
    cpu = _bytes(saved["cpu"], "cpu")
    cuda = saved["cuda"]
    if not isinstance(cuda, list):
        raise CheckpointError(f"cuda must be a list, not {type(cuda).__name__}")
    cuda = [_bytes(s, f"cuda[{i}]") for i, s in enumerate(cuda)]
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        warnings.warn("the checkpoint holds torch's random state but torch does not import here: not restored",
                      RuntimeWarning, stacklevel=2)
        return None
    cpu_state = torch.from_numpy(cpu.copy())
    torch.Generator().set_state(cpu_state)  # torch's own checks, on a scratch generator
    cuda_states = None
    if cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count != len(cuda):
            warnings.warn(f"the checkpoint holds the random state of {len(cuda)} CUDA devices, this process "
                          f"has {count}: the CUDA generators are not restored", RuntimeWarning, stacklevel=2)
        else:
            current = torch.cuda.get_rng_state_all()
            for i, (s, c) in enumerate(zip(cuda, current)):
                if s.shape[0] != c.numel():
                    raise CheckpointError(f"cuda[{i}] holds {s.shape[0]} bytes, this torch's CUDA generator "
                                          f"state has {c.numel()}")
            cuda_states = [torch.from_numpy(s.copy()) for s in cuda]

    def apply() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

    return apply
