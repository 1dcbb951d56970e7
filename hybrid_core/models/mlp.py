"""`MLP`: a multi-layer perceptron with hand-written backprop in the pure array API."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .._backend import as_namespace, from_numpy, library_name
from .._errors import BackendError, BatchError, ConfigError

__all__ = ["MLP"]

_LOSSES = ("cross_entropy", "mse")
_ACTIVATIONS = ("tanh", "relu")


class MLP:
    """A dense network x → act(x·W₀ + b₀) → … → x·W_L + b_L implementing `Model`.

    Losses: ``cross_entropy`` (softmax over the outputs, integer labels, mean over
    the batch) or ``mse`` (mean over the batch of ½‖output − target‖²). ``l2`` adds
    ½·l2·Σ‖W‖² (weights only). Works on any array-API namespace; weights start from a
    seeded NumPy generator (N(0, 1/fan_in)), biases at zero.
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
        problems = []
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            problems.append(f"sizes={sizes!r}: must list at least two positive integers")
        if loss not in _LOSSES:
            problems.append(f"loss={loss!r}: must be one of {', '.join(_LOSSES)}")
        if activation not in _ACTIVATIONS:
            problems.append(f"activation={activation!r}: must be one of {', '.join(_ACTIVATIONS)}")
        if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
            problems.append(f"l2={l2!r}: must be a finite number >= 0")
        if problems:
            raise ConfigError(problems)
        self.xp = as_namespace(xp)
        self.sizes = sizes
        self.loss_kind = loss
        self.activation = activation
        self.l2 = float(l2)
        self.dtype = self.xp.float32 if dtype is None else dtype
        self.device = device
        rng = np.random.default_rng(seed)
        params = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            w = rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=(fan_in, fan_out))
            params += [from_numpy(self.xp, w, dtype=self.dtype, device=device),
                       from_numpy(self.xp, np.zeros(fan_out), dtype=self.dtype, device=device)]
        self._params = params

    def parameters(self) -> list[Any]:
        """[W₀, b₀, W₁, b₁, …]; W_i has shape (sizes[i], sizes[i+1])."""
        return list(self._params)

    def apply_update(self, update: Sequence[Any], scale: float) -> None:
        """θ ← θ + scale·update (rebinds the arrays, so immutable backends work)."""
        update = list(update)
        if len(update) != len(self._params):
            raise BatchError(f"update has {len(update)} arrays for {len(self._params)} parameters")
        for i, (p, u) in enumerate(zip(self._params, update)):
            if tuple(u.shape) != tuple(p.shape):
                raise BatchError(f"update {i} has shape {tuple(u.shape)}, parameter {i} has {tuple(p.shape)}")
        self._check_library(update, "the update")
        self._params = [p + scale * u for p, u in zip(self._params, update)]

    def outputs(self, x: Any) -> Any:
        """The network's output for inputs ``x`` (logits for cross-entropy)."""
        self._check_x(x)
        return self._forward(x)[1]

    def loss(self, batch: Any) -> Any:
        """The scalar loss on ``batch = (x, y)``, forward only."""
        x, y = self._unpack(batch)
        return self._loss_from_output(self._forward(x)[1], y)[0]

    def loss_and_grad(self, batch: Any) -> tuple[Any, list[Any]]:
        """The scalar loss and its gradient w.r.t. every parameter (hand-written backprop)."""
        xp = self.xp
        x, y = self._unpack(batch)
        inputs, out = self._forward(x)
        loss, delta = self._loss_from_output(out, y)
        grads: list[Any] = [None] * len(self._params)
        for layer in range(len(inputs) - 1, -1, -1):
            w = self._params[2 * layer]
            gw = xp.matmul(xp.permute_dims(inputs[layer], (1, 0)), delta)
            grads[2 * layer] = gw + self.l2 * w if self.l2 else gw
            grads[2 * layer + 1] = xp.sum(delta, axis=0)
            if layer:
                delta = xp.matmul(delta, xp.permute_dims(w, (1, 0))) * self._act_grad(inputs[layer])
        return loss, grads

    def accuracy(self, batch: Any) -> Any:
        """Fraction of correctly classified samples (0-d array); cross-entropy models only."""
        if self.loss_kind != "cross_entropy":
            raise ConfigError("accuracy() needs loss='cross_entropy'")
        x, y = self._unpack(batch)
        pred = self.xp.argmax(self._forward(x)[1], axis=1)
        return self.xp.mean(self.xp.astype(pred == self.xp.astype(y, pred.dtype), self.dtype))

    # -- internals ------------------------------------------------------------------------------

    def _forward(self, x: Any) -> tuple[list[Any], Any]:
        """The input of every layer (what backprop needs) and the network output."""
        xp = self.xp
        inputs = [x]
        for layer in range(len(self._params) // 2 - 1):
            z = xp.matmul(inputs[-1], self._params[2 * layer]) + self._params[2 * layer + 1]
            inputs.append(xp.tanh(z) if self.activation == "tanh" else xp.maximum(z, xp.zeros_like(z)))
        return inputs, xp.matmul(inputs[-1], self._params[-2]) + self._params[-1]

    def _act_grad(self, h: Any) -> Any:
        xp = self.xp
        if self.activation == "tanh":
            return 1.0 - h * h
        return xp.astype(h > 0, h.dtype)

    def _loss_from_output(self, out: Any, y: Any) -> tuple[Any, Any]:
        """Loss and d(loss)/d(output) (already divided by the batch size), plus the L2 term."""
        xp = self.xp
        n = out.shape[0]
        if self.loss_kind == "cross_entropy":
            shifted = out - xp.max(out, axis=1, keepdims=True)
            expd = xp.exp(shifted)
            total = xp.sum(expd, axis=1, keepdims=True)
            log_probs = shifted - xp.log(total)
            classes = xp.arange(out.shape[1], device=array_api_compat.device(out))
            onehot = xp.astype(xp.reshape(y, (n, 1)) == xp.reshape(xp.astype(classes, y.dtype), (1, -1)),
                               out.dtype)
            loss = -xp.sum(onehot * log_probs) / n
            delta = (expd / total - onehot) / n
        else:
            diff = out - y
            loss = 0.5 * xp.sum(diff * diff) / n
            delta = diff / n
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum(xp.sum(w * w) for w in self._params[0::2])
        return loss, delta

    def _unpack(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise BatchError(f"a batch must be a pair (x, y), got {type(batch).__name__}")
        x, y = batch
        self._check_library([x, y], "the batch")
        self._check_x(x)
        n = x.shape[0]
        if self.loss_kind == "cross_entropy":
            if tuple(y.shape) != (n,):
                raise BatchError(f"labels have shape {tuple(y.shape)}; expected ({n},) integer class ids",
                                 "Pass y as a 1-D integer array with one class id per row of x.")
        elif tuple(y.shape) != (n, self.sizes[-1]):
            raise BatchError(f"targets have shape {tuple(y.shape)}; expected ({n}, {self.sizes[-1]})")
        return x, y

    def _check_x(self, x: Any) -> None:
        if len(x.shape) != 2 or x.shape[1] != self.sizes[0]:
            raise BatchError(f"inputs have shape {tuple(x.shape)}; expected (n, {self.sizes[0]})",
                             "Reshape the inputs to (batch, features).")
        if x.shape[0] == 0:
            raise BatchError("the batch is empty", "Drop empty batches before the step.")

    def _check_library(self, arrays: Sequence[Any], what: str) -> None:
        for a in arrays:
            try:
                got = array_api_compat.array_namespace(a)
            except TypeError as exc:
                raise BackendError(f"{what} holds a {type(a).__name__}, not an array of "
                                   f"{library_name(self.xp)}") from exc
            if got is not self.xp:
                raise BackendError(
                    f"{what} is a {library_name(got)} array but the model uses {library_name(self.xp)}",
                    f"Convert {what} to {library_name(self.xp)} before the step.",
                )
