"""`MLP`: a dense network with hand-written backprop in the pure array API (runs on any namespace)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any, final

import array_api_compat
import numpy as np

from .._backend import as_namespace, library_name
from .._errors import BatchError, ConfigError
from ._checks import check_batch_array, check_like_parameters, parameters_from_host

__all__ = ["MLP"]

_LOSSES = ("cross_entropy", "mse")
_ACTIVATIONS = ("tanh", "relu")


@final
class MLP:
    """x → act(x·W₀ + b₀) → … → x·W_L + b_L, trained on a cross-entropy or squared-error loss; a `Model`.

    On a batch of n rows, with f(x) the network output and Wₖ the weight matrices:

    - ``cross_entropy``: L = −(1/n)·Σᵢ log softmax(f(xᵢ))[yᵢ] + ½·l2·Σₖ‖Wₖ‖²; y holds integer
      class ids in [0, sizes[-1]), shape (n,). Ids are not range-checked (that would need a host
      sync); an out-of-range id contributes nothing.
    - ``mse``: L = (1/n)·Σᵢ ½·‖f(xᵢ) − yᵢ‖² + ½·l2·Σₖ‖Wₖ‖²; y has shape (n, sizes[-1]).

    Weights start N(0, 1/fan_in) from ``numpy.random.default_rng(seed)``, biases at zero, in ``dtype``
    (default: the namespace's float32) on ``device``. Updates rebind the parameter list instead of
    writing into arrays, so immutable arrays (JAX) work.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        xp: ModuleType | None = None,
        loss: str = "cross_entropy",
        activation: str = "tanh",
        seed: int = 0,
        dtype: Any = None,
        device: Any = None,
        l2: float = 0.0,
    ) -> None:
        sizes = tuple(sizes)
        problems = _problems(sizes, loss, activation, seed, l2)
        if problems:
            raise ConfigError(problems)
        self._xp = as_namespace(xp)
        self._sizes = sizes
        self._loss_kind = loss
        self._activation = activation
        self._l2 = float(l2)
        self._params = self._initial_parameters(seed, self._xp.float32 if dtype is None else dtype, device)

    def _initial_parameters(self, seed: int, dtype: Any, device: Any) -> list[Any]:
        rng = np.random.default_rng(seed)
        host = []
        for fan_in, fan_out in itertools.pairwise(self._sizes):
            host += [rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=(fan_in, fan_out)), np.zeros(fan_out)]
        return parameters_from_host(self._xp, host, dtype, device)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths, input first."""
        return self._sizes

    @property
    def xp(self) -> ModuleType:
        """The array-API namespace of the parameters."""
        return self._xp

    @property
    def dtype(self) -> Any:
        """The parameters' dtype; inputs (and ``mse`` targets) must have it too."""
        return self._params[0].dtype

    def parameters(self) -> list[Any]:
        """[W₀, b₀, W₁, b₁, …]; Wₖ has shape (sizes[k], sizes[k+1]), bₖ shape (sizes[k+1],)."""
        return list(self._params)

    def set_parameters(self, values: Sequence[Any]) -> None:
        """θ ← ``values`` (same shapes, dtypes and library; rebinds to them)."""
        self._params = list(check_like_parameters(self._xp, self._params, values, "the parameters"))

    def apply_update(self, update: Sequence[Any], scale: float) -> None:
        """θ ← θ + scale·update for every parameter (rebinds, never writes in place)."""
        update = check_like_parameters(self._xp, self._params, update, "the update")
        scale = float(scale)
        self._params = [p + scale * u for p, u in zip(self._params, update, strict=True)]

    def outputs(self, x: Any) -> Any:
        """The network output for inputs ``x`` of shape (n, sizes[0]) (logits for ``cross_entropy``)."""
        self._check_inputs(x)
        return self._forward(x)[1]

    def loss(self, batch: tuple[Any, Any]) -> Any:
        """The 0-d loss on ``batch = (x, y)``, forward pass only."""
        x, y = self._unpack(batch)
        return self._head(self._forward(x)[1], y, with_delta=False)[0]

    def loss_and_grad(self, batch: tuple[Any, Any]) -> tuple[Any, list[Any]]:
        """The 0-d loss on ``batch = (x, y)`` and its gradient for every parameter, by backprop."""
        x, y = self._unpack(batch)
        acts, out = self._forward(x)
        loss, delta = self._head(out, y, with_delta=True)
        grads: list[Any] = []
        for k in range(len(acts) - 1, -1, -1):
            w = self._params[2 * k]
            gw = acts[k].T @ delta
            grads[:0] = [gw + self._l2 * w if self._l2 else gw, self._xp.sum(delta, axis=0)]
            if k:
                delta = (delta @ w.T) * self._activation_slope(acts[k])
        return loss, grads

    def accuracy(self, batch: tuple[Any, Any]) -> Any:
        """The fraction of rows whose largest logit is the label, as a 0-d array (``cross_entropy`` only)."""
        if self._loss_kind != "cross_entropy":
            raise ConfigError("accuracy() needs a classifier, but this MLP has loss='mse'",
                              "Build the MLP with loss='cross_entropy' to measure accuracy.")
        xp = self._xp
        x, y = self._unpack(batch)
        predicted = xp.argmax(self._forward(x)[1], axis=1)
        return xp.mean(xp.astype(predicted == xp.astype(y, predicted.dtype), self.dtype))

    def __repr__(self) -> str:
        return (f"MLP(sizes={list(self._sizes)}, loss={self._loss_kind!r}, activation={self._activation!r}, "
                f"l2={self._l2}, backend={library_name(self._xp)}, dtype={self.dtype})")

    def _forward(self, x: Any) -> tuple[list[Any], Any]:
        """Every layer's input (what backprop needs) and the network output."""
        xp = self._xp
        acts = [x]
        for k in range(len(self._params) // 2 - 1):
            z = acts[-1] @ self._params[2 * k] + self._params[2 * k + 1]
            acts.append(xp.tanh(z) if self._activation == "tanh" else xp.maximum(z, xp.zeros_like(z)))
        return acts, acts[-1] @ self._params[-2] + self._params[-1]

    def _activation_slope(self, h: Any) -> Any:
        """act'(z) written in terms of h = act(z), so backprop needs no pre-activations."""
        if self._activation == "tanh":
            return 1.0 - h * h
        return self._xp.astype(h > 0, h.dtype)

    def _head(self, out: Any, y: Any, *, with_delta: bool) -> tuple[Any, Any]:
        """The loss (with the L2 term) and, if asked, dL/d(output)."""
        xp = self._xp
        n = out.shape[0]
        delta = None
        if self._loss_kind == "cross_entropy":
            # Shifting by the row max keeps exp() finite for any finite logits.
            shifted = out - xp.max(out, axis=1, keepdims=True)
            expd = xp.exp(shifted)
            total = xp.sum(expd, axis=1, keepdims=True)
            classes = xp.arange(out.shape[1], device=array_api_compat.device(out))
            # One label dtype for the comparison: mixed signed/unsigned integers do not promote.
            labels = xp.astype(y, classes.dtype)
            onehot = xp.astype(labels[:, None] == classes[None, :], out.dtype)
            loss = -xp.sum(onehot * (shifted - xp.log(total))) / n
            if with_delta:
                delta = (expd / total - onehot) / n
        else:
            diff = out - y
            loss = 0.5 * xp.sum(diff * diff) / n
            if with_delta:
                delta = diff / n
        if self._l2:
            penalty = xp.sum(self._params[0] * self._params[0])
            for w in self._params[2::2]:
                penalty = penalty + xp.sum(w * w)
            loss = loss + 0.5 * self._l2 * penalty
        return loss, delta

    def _unpack(self, batch: Any) -> tuple[Any, Any]:
        """``(x, y)`` after the cheap checks: library, device, shapes and dtypes."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise BatchError(f"a batch must be a pair (x, y); got {type(batch).__name__}",
                             "Pass batch=(inputs, targets).")
        x, y = batch
        self._check_inputs(x)
        self._check_array(y, "y")
        n, width = x.shape[0], self._sizes[-1]
        if self._loss_kind == "cross_entropy":
            if tuple(y.shape) != (n,):
                raise BatchError(f"labels y have shape {tuple(y.shape)}; expected ({n},) for x of shape "
                                 f"{tuple(x.shape)}",
                                 "Pass one integer class id per row of x (not one-hot rows).")
            if not self._xp.isdtype(y.dtype, "integral"):
                raise BatchError(f"labels y have dtype {y.dtype}; expected an integer dtype",
                                 f"Cast the labels to an integer dtype (class ids in [0, {width})).")
            return x, y
        if tuple(y.shape) != (n, width):
            raise BatchError(f"targets y have shape {tuple(y.shape)}; expected ({n}, {width}) for x of shape "
                             f"{tuple(x.shape)}",
                             f"Pass one row of {width} targets per row of x.")
        if y.dtype != self.dtype:
            raise BatchError(f"targets y have dtype {y.dtype}; the model's parameters are {self.dtype}",
                             f"Cast y to {self.dtype}.")
        return x, y

    def _check_inputs(self, x: Any) -> None:
        self._check_array(x, "x")
        if len(x.shape) != 2 or x.shape[1] != self._sizes[0]:
            raise BatchError(f"inputs x have shape {tuple(x.shape)}; expected (n, {self._sizes[0]})",
                             f"Reshape the inputs to (batch, {self._sizes[0]}).")
        if x.shape[0] == 0:
            raise BatchError("the batch is empty: x has 0 rows", "Skip empty batches before the step.")
        if x.dtype != self.dtype:
            raise BatchError(f"inputs x have dtype {x.dtype}; the model's parameters are {self.dtype}",
                             f"Cast x to {self.dtype} (or build the MLP with dtype={x.dtype}).")

    def _check_array(self, a: Any, what: str) -> None:
        check_batch_array(self._xp, a, what, self._params[0])


def _problems(sizes: tuple[Any, ...], loss: Any, activation: Any, seed: Any, l2: Any) -> list[str]:
    """Every problem with the constructor's plain arguments."""
    problems = []
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        problems.append(f"sizes={list(sizes)!r}: must list at least two positive integers (input first)")
    if loss not in _LOSSES:
        problems.append(f"loss={loss!r}: must be one of {', '.join(_LOSSES)}")
    elif loss == "cross_entropy" and sizes and sizes[-1] == 1:
        problems.append("sizes[-1]=1: cross_entropy needs at least 2 classes")
    if activation not in _ACTIVATIONS:
        problems.append(f"activation={activation!r}: must be one of {', '.join(_ACTIVATIONS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r}: must be an integer >= 0")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        problems.append(f"l2={l2!r}: must be a finite number >= 0")
    return problems
