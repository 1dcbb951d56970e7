"""The learning rate of an optax transformation as users write it, known on the host.

`scan` looks inside a transformation (its functions' closures: optax builds its transformations as closures)
for what optax keeps there: the schedule or constant given to an optimizer (``optax.adamw(schedule)`` builds
``scale_by_learning_rate``), a schedule given to ``inject_hyperparams``, Adam's ``b1`` and a ``MultiSteps``'
``every_k_schedule``. `LearningRate` owns the learning rate: where it comes from, the schedule's step count
kept on the host (mirroring the device's count), and its value, so reading it never reads the device.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_core._backend import dtype_name, is_low_precision
from hybrid_core._errors import CheckpointError, ConfigError

from ._optax_state import INJECTED, find_all, injected_holding

__all__ = ["HostSchedule", "LearningRate", "Scan", "scan"]

LR_HINT = ("Pass the learning rate you gave optax: OptaxOptimizer(model, tx, learning_rate=schedule_or_float), or "
           "build the transformation with optax.inject_hyperparams to set it by hand.")

_CHUNK = 4096
"""Schedule values computed per device read: one read per this many steps, never one per step."""


@dataclass
class Scan:
    """What `scan` found inside a transformation, in walk order."""

    schedules: list[Callable[[Any], Any]] = field(default_factory=list)
    constants: list[float] = field(default_factory=list)
    adam_b1: list[float] = field(default_factory=list)
    multisteps: list[Any] = field(default_factory=list)
    """Each ``MultiSteps``' k (``every_k_schedule`` as a Python int), or None when it is a schedule."""


def scan(transformation: Any) -> Scan:
    """Walk ``transformation``'s functions, their closures, bound objects and containers (each object once)."""
    found = Scan()
    seen: set[int] = set()
    for fn in _functions(transformation, seen, 0):
        cells = _cells(fn)
        name = fn.__qualname__
        if name.startswith("scale_by_learning_rate.") and callable(cells.get("learning_rate")):
            _add(found.schedules, cells["learning_rate"])
        elif name.startswith("scale.") and _number(cells.get("step_size")) and cells["step_size"] < 0:
            found.constants.append(-float(cells["step_size"]))
        elif name.startswith("inject_hyperparams.") and isinstance(cells.get("sched_hps"), dict):
            lr = getattr(cells["sched_hps"].get("learning_rate"), "schedule_fn", None)  # optax's WrappedSchedule
            if callable(lr):
                _add(found.schedules, lr)
        elif name.startswith("scale_by_adam.") and "update_fn" in name and _number(cells.get("b1")):
            found.adam_b1.append(float(cells["b1"]))
    for obj in _objects(transformation, set(), 0):
        every = getattr(obj, "_every_k_schedule", None)
        if type(obj).__name__ == "MultiSteps" and callable(every):
            k = every(0)
            found.multisteps.append(int(k) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else None)
    return found


def _add(items: list[Any], item: Any) -> None:
    if not any(x is item for x in items):
        items.append(item)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cells(fn: types.FunctionType) -> dict[str, Any]:
    out = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _objects(obj: Any, seen: set[int], depth: int) -> Iterator[Any]:
    """Every function, bound object and container reachable from ``obj`` (not arrays), depth first."""
    if id(obj) in seen or depth > 40:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, types.FunctionType):
        children = list(_cells(obj).values())
    elif isinstance(obj, types.MethodType):
        children = [obj.__func__, obj.__self__]
    elif isinstance(obj, (tuple, list)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif hasattr(obj, "func") and hasattr(obj, "keywords"):  # functools.partial
        children = [obj.func, *obj.args, *obj.keywords.values()]
    elif callable(getattr(obj, "update", None)) and hasattr(obj, "__dict__"):  # MultiSteps and the like
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        if callable(child) or isinstance(child, (tuple, list, dict)) or callable(getattr(child, "update", None)):
            yield from _objects(child, seen, depth + 1)


def _functions(obj: Any, seen: set[int], depth: int) -> Iterator[types.FunctionType]:
    return (o for o in _objects(obj, seen, depth) if isinstance(o, types.FunctionType))


class HostSchedule:
    """A schedule's values on the host: computed on the device ``_CHUNK`` steps at a time (``jax.vmap``), read
    in one transfer, then looked up; the values are optax's (float32, as its update computes them, up to the
    last bit, which the vectorised evaluation can round otherwise)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self._start = 0
        self._values = self._chunk(0)

    def _chunk(self, start: int) -> np.ndarray:
        counts = jnp.arange(start, start + _CHUNK, dtype=jnp.int32)
        try:
            values = jax.vmap(self.fn)(counts)
        except Exception as exc:  # not traceable: optax could not use it inside its jitted update either
            raise ConfigError(f"the learning-rate schedule cannot be evaluated on a step count array "
                              f"({type(exc).__name__}: {exc})",
                              "Pass a schedule written with jax.numpy (like optax's).") from exc
        values = np.asarray(jax.device_get(jnp.broadcast_to(jnp.asarray(values, jnp.float32), (_CHUNK,))),
                            dtype=np.float64)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            bad = int(np.argmax(~np.isfinite(values) | (values < 0)))
            raise ConfigError(f"the learning-rate schedule gives {values[bad]} at step {start + bad}",
                              "A learning rate must be a finite number >= 0 at every step.")
        return values

    def __call__(self, count: int) -> float:
        """The schedule's value at ``count`` (one device read when ``count`` leaves the chunk on the host)."""
        count = min(count, np.iinfo(np.int32).max)  # optax's counts saturate at int32's largest value
        if not self._start <= count < self._start + _CHUNK:
            self._start = count - count % _CHUNK
            self._values = self._chunk(self._start)
        return float(self._values[count - self._start])


class LearningRate:
    """Where the learning rate comes from and what it is, for an `OptaxOptimizer`.

    Sources, in order: ``given`` (``learning_rate=``/``lr=``, a float or a schedule), a constant
    ``inject_hyperparams`` learning rate (settable, lives on the device: read once), a schedule or constant found
    inside the transformation by `scan`, and last a scheduled ``inject_hyperparams`` learning rate that could not be
    found (read from the device, counted). A schedule's step count is kept on the host: one per update and one per
    `skip` (as the device's counts; with ``MultiSteps(k)`` the inner optimizer's: one per k updates).
    """

    def __init__(self, transformation: Any, state: Any, given: float | Callable[[Any], Any] | None) -> None:
        found = scan(transformation)
        node = injected_holding(state, "learning_rate")
        injected_schedule = node is not None and "learning_rate" in getattr(node, "hyperparams_states", {})
        self.kind, self._fixed, self.schedule = self._source(found, node, injected_schedule, given)
        self.found = found
        ks = found.multisteps
        self.every_k = ks[0] if len(ks) == 1 else None
        if self.schedule is not None and ks and self.every_k is None:
            raise ConfigError("the learning rate is a schedule inside optax.MultiSteps with a scheduled (or nested) "
                              "every_k_schedule, whose step count cannot be followed on the host",
                              "Give MultiSteps an int every_k_schedule.")
        self.count = 0  # the schedule's count at the next update
        self.mini = 0  # MultiSteps: gradients accumulated towards the next inner update
        self.used = 0  # the count the last update used
        self._host_lr: float | None = None  # host copy of a constant injected lr

    @staticmethod
    def _source(found: Scan, node: Any, injected_schedule: bool, given: Any) -> tuple[str, float | None, Any]:
        if given is not None:
            if node is not None and not injected_schedule:
                raise ConfigError("lr is given but the transformation injects its own learning_rate",
                                  "Drop lr=; read and set the learning rate through OptaxOptimizer.lr.")
            if callable(given):
                if found.schedules and not any(s is given for s in found.schedules):
                    raise ConfigError("the schedule given is not the one inside the transformation",
                                      "Pass the same schedule object you gave optax (or drop learning_rate=).")
                return "schedule", None, HostSchedule(given)
            if not _positive(given):
                raise ConfigError(f"lr={given!r}: must be a finite number > 0 or a schedule")
            if found.schedules:
                raise ConfigError(f"lr={given!r} is given but the transformation's learning rate is a schedule",
                                  "Drop lr= (the schedule is found), or pass learning_rate=the schedule.")
            if len(found.constants) == 1 and not math.isclose(found.constants[0], given, rel_tol=1e-6):
                raise ConfigError(f"lr={given!r} but the transformation uses {found.constants[0]!r}",
                                  "Pass the learning rate the transformation was built with.")
            return "fixed", float(given), None
        if node is not None and not injected_schedule:
            return "injected", None, None
        if len(found.schedules) > 1:
            raise ConfigError(f"the transformation holds {len(found.schedules)} schedules; which one is the learning "
                              "rate is ambiguous", "Pass learning_rate=the schedule that scales the updates.")
        if found.schedules:
            return "schedule", None, HostSchedule(found.schedules[0])
        if injected_schedule:
            return "device", None, None
        if len(found.constants) == 1 and _positive(found.constants[0]):
            return "fixed", found.constants[0], None
        what = "several" if found.constants else "no"
        raise ConfigError(f"the learning rate is not visible in this transformation ({what} learning-rate scaling "
                          "found in it)", LR_HINT)

    def value(self, state: Any) -> float:
        """The learning rate of the last update (before any: of the first), from the host."""
        if self.kind == "fixed":
            return self._fixed
        if self.kind == "schedule":
            return self.schedule(self.used)
        node = injected_holding(state, "learning_rate")
        if self.kind == "device":
            return float(node.hyperparams["learning_rate"])  # a schedule moves it on the device
        if self._host_lr is None:  # constant between `lr` sets and state loads: read it once
            self._host_lr = float(node.hyperparams["learning_rate"])
        return self._host_lr

    def next_value(self) -> float | None:
        """The learning rate the next update uses, when known on the host (None: it lives in the state)."""
        if self.kind == "fixed":
            return self._fixed
        if self.kind == "schedule":
            return self.schedule(self.count)
        return None

    def set(self, state: Any, value: float) -> Any:
        """``state`` with the injected learning rate set to ``value``; `ConfigError` for any other source."""
        from ._optax_state import replace_node

        if self.kind in ("schedule", "device"):
            raise ConfigError("the learning rate is a schedule, which would overwrite it at the next step",
                              "Change the schedule (build the transformation again), or inject a constant "
                              "learning_rate with optax.inject_hyperparams to set it by hand.")
        if self.kind == "fixed":
            raise ConfigError("this transformation's learning rate is fixed inside it",
                              "Build it with optax.inject_hyperparams, e.g. optax.inject_hyperparams(optax.adam)("
                              "learning_rate=1e-3), so the learning rate lives in its state and can be set.")
        if not _positive(value):
            raise ConfigError(f"lr={value!r}: must be a finite number > 0")
        node = injected_holding(state, "learning_rate")
        old = node.hyperparams["learning_rate"]
        hyper = {**node.hyperparams, "learning_rate": jnp.asarray(value, dtype=old.dtype)}
        self._host_lr = float(value)
        return replace_node(state, node, lambda n: n._replace(hyperparams=hyper))

    def updated(self) -> bool:
        """One real update ran: advance the host count as the device's. Whether the inner optimizer updated."""
        if self.every_k is not None:
            self.mini += 1
            if self.mini < self.every_k:
                return False
            self.mini = 0
        self.used = self.count
        self.count += 1
        return True

    def skip(self) -> None:
        """A step without an update advanced the schedules' counts on the device: follow them."""
        self.count += 1

    def state_dict(self) -> dict[str, int]:
        """The host counts."""
        return {"count": self.count, "mini": self.mini, "used": self.used}

    def check_state_dict(self, state: Any) -> dict[str, int]:
        """The counts `load_state_dict` would set; `CheckpointError` naming the field otherwise."""
        if not isinstance(state, dict) or set(state) != {"count", "mini", "used"}:
            raise CheckpointError("the learning-rate counts are not {count, mini, used}",
                                  "Load a state_dict() saved by an OptaxOptimizer with the same transformation.")
        for key, value in state.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"lr.{key}={value!r}: expected an integer >= 0",
                                      "Load a state_dict() saved by an OptaxOptimizer with the same transformation.")
        return dict(state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore `state_dict` output (checked by `check_state_dict`)."""
        self.count, self.mini, self.used = state["count"], state["mini"], state["used"]
        self._host_lr = None

    def describe(self) -> str:
        """Where the learning rate comes from, for the optimizer's summary."""
        return {"fixed": "a constant (host)", "schedule": "a schedule evaluated on the host at the host step count",
                "injected": "inject_hyperparams' constant (settable; read once)",
                "device": "inject_hyperparams' schedule, read from the device"}[self.kind]


def check_hyperparam_dtypes(state: Any) -> None:
    """`ConfigError` if ``optax.inject_hyperparams`` keeps a float hyperparameter in bfloat16 or float16.

    Without ``hyperparam_dtype`` optax stores them in the parameters' dtype, and in bfloat16 Adam's
    ``b2=0.999`` is 1.0, so its bias correction divides by zero at the first step (NaN everywhere).
    """
    for node in find_all(state, INJECTED):
        low = sorted(k for k, v in node.hyperparams.items() if is_low_precision(v))
        if low:
            dtype = dtype_name(node.hyperparams[low[0]])
            raise ConfigError(
                f"optax.inject_hyperparams keeps {', '.join(low)} in {dtype} (the parameters' dtype), where they "
                f"round: b2=0.999 is 1.0 in bfloat16 and Adam divides by zero",
                "Build it with optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32).")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
