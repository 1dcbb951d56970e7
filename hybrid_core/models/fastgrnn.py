"""`FastGRNN`: a low-rank gated recurrent cell with hand-written BPTT in the pure array API."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, final

import array_api_compat
import numpy as np

from .._backend import as_namespace, library_name, to_numpy
from .._errors import BatchError, CheckpointError, ConfigError
from ._checks import check_batch_array, check_like_parameters, parameters_from_host
from ._gates import bce_with_logits, pwl_sigmoid, pwl_tanh, sigmoid, slopes, tanh
from ._support import Support

__all__ = ["NONLINEARITIES", "FastGRNN"]

NONLINEARITIES = ("exact", "pwl")
"""The gate nonlinearities of `FastGRNN`: σ and tanh, or the paper's piecewise-linear σ̂ and tanĥ."""


@final
class FastGRNN:
    """A FastGRNN cell run over a sequence, then a linear read-out to one logit; a `Model`.

    Kusupati et al. 2018, "FastGRNN" (NeurIPS). For inputs x of shape (n, T, d), h₀ = 0 and
    t = 1…T (row-vector convention, W = W1·W2 of rank ``w_rank``, U = U1·U2 of rank ``u_rank``):

        a_t = x_t·W + h_{t−1}·U
        z_t = σ(a_t + b_z),   h̃_t = tanh(a_t + b_h)
        h_t = (ζ·(1 − z_t) + ν) ⊙ h̃_t + z_t ⊙ h_{t−1},   ζ = σ(ζ̂), ν = σ(ν̂)
        s   = h_T·v + c        (the logit of the positive class)

    With ℓ(s, p) = max(s, 0) − s·p + log(1 + e^{−|s|}) (binary cross-entropy with logits,
    stable for any finite s) and ``L2 = ½·l2·(‖W1‖² + ‖W2‖² + ‖U1‖² + ‖U2‖² + ‖v‖²)``:

    - batch ``(x, y)``: L = mean ℓ(s, y) + L2;
    - batch ``(x, y, t)`` with teacher logits t (knowledge distillation, α = ``distill_alpha``,
      T = ``temperature``): L = (1 − α)·mean ℓ(s, y) + α·T²·mean ℓ(s/T, σ(t/T)) + L2.
      The T² keeps the soft term's gradient, α·T·(σ(s/T) − σ(t/T)), on the scale of the hard one.

    y holds 0/1 labels (any real or integer dtype; soft labels in [0, 1] work too). ``w_rank``
    and ``u_rank`` default to full rank (min(d, H) and H). Weights start N(0, 1/fan_in) per
    factor from ``numpy.random.default_rng(seed)``; b_z = 1 (gates start half-open towards
    keeping h), b_h = 0, ζ̂ = 1, ν̂ = −4 (the authors' initialisation). Gradients are full
    back-propagation through time; updates rebind arrays, so immutable arrays (JAX) work.

    ``nonlinearity="pwl"`` replaces σ and tanh in the cell by the paper's piecewise-linear
    σ̂(a) = clip((a + 1)/2, 0, 1) and tanĥ(a) = clip(a, −1, 1) (the forms an integer-only
    device computes exactly; see `hybrid_core.models.QuantizedFastGRNN`).

    Sparsity: `prune` keeps the largest-magnitude entries of W1, W2 (``w_density``) and U1, U2
    (``u_density``) and from then on every parameter change (`apply_update`, `set_parameters`) is
    projected onto that support (see `hybrid_core.models._support`); `threshold` re-selects it from
    the current magnitudes (iterative hard thresholding, driven by
    `hybrid_core.optim.HardThresholding`). The support is model state (`state_dict`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        w_rank: int | None = None,
        u_rank: int | None = None,
        xp: ModuleType | None = None,
        seed: int = 0,
        dtype: Any = None,
        device: Any = None,
        l2: float = 0.0,
        distill_alpha: float = 0.0,
        temperature: float = 1.0,
        nonlinearity: str = "exact",
    ) -> None:
        if _is_count(input_size) and _is_count(hidden_size):
            w_rank = min(input_size, hidden_size) if w_rank is None else w_rank
            u_rank = hidden_size if u_rank is None else u_rank
        problems = _problems(input_size, hidden_size, w_rank, u_rank, seed, l2, distill_alpha, temperature)
        if nonlinearity not in NONLINEARITIES:
            problems.append(f"nonlinearity={nonlinearity!r}: must be one of {', '.join(NONLINEARITIES)}")
        if problems:
            raise ConfigError(problems)
        self._xp = as_namespace(xp)
        self._settings = {"input_size": input_size, "hidden_size": hidden_size, "w_rank": w_rank,
                          "u_rank": u_rank, "l2": float(l2), "distill_alpha": float(distill_alpha),
                          "temperature": float(temperature), "nonlinearity": nonlinearity}
        self._params = self._initial_parameters(seed, self._xp.float32 if dtype is None else dtype, device)
        self._support: Support | None = None
        self._projecting = True

    def _initial_parameters(self, seed: int, dtype: Any, device: Any) -> list[Any]:
        d, h = self._settings["input_size"], self._settings["hidden_size"]
        rw, ru = self._settings["w_rank"], self._settings["u_rank"]
        rng = np.random.default_rng(seed)
        host = [rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=shape)
                for fan_in, shape in ((d, (d, rw)), (rw, (rw, h)), (h, (h, ru)), (ru, (ru, h)))]
        host += [np.ones(h), np.zeros(h), np.ones(1), np.full(1, -4.0), rng.normal(0.0, 1.0 / math.sqrt(h), h),
                 np.zeros(1)]
        return parameters_from_host(self._xp, host, dtype, device)

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (sizes, ranks, l2, distillation), enough to rebuild the model."""
        return dict(self._settings)

    @property
    def xp(self) -> ModuleType:
        """The array-API namespace of the parameters."""
        return self._xp

    @property
    def dtype(self) -> Any:
        """The parameters' dtype; inputs and teacher logits must have it too."""
        return self._params[0].dtype

    def parameters(self) -> list[Any]:
        """[W1, W2, U1, U2, b_z, b_h, ζ̂, ν̂, v, c] with shapes (d, r_w), (r_w, H), (H, r_u), (r_u, H),
        (H,), (H,), (1,), (1,), (H,), (1,)."""
        return list(self._params)

    def set_parameters(self, values: Sequence[Any]) -> None:
        """θ ← ``values`` (same shapes, dtypes and library; rebinds to them), projected onto the support."""
        self._params = self._projected(check_like_parameters(self._xp, self._params, values, "the parameters"))

    def apply_update(self, update: Sequence[Any], scale: float) -> None:
        """θ ← θ + scale·update for every parameter (rebinds, never writes in place), projected onto the
        support if the model is pruned."""
        update = check_like_parameters(self._xp, self._params, update, "the update")
        scale = float(scale)
        self._params = self._projected([p + scale * u for p, u in zip(self._params, update, strict=True)])

    # -- sparsity ---------------------------------------------------------------------------

    @property
    def support(self) -> Support | None:
        """The sparse support (None: dense)."""
        return self._support

    def prune(self, w_density: float = 1.0, u_density: float = 1.0) -> None:
        """Keep the ``w_density`` share of W1 and of W2 and the ``u_density`` share of U1 and of U2 (largest
        magnitudes, see `hybrid_core.models._support.kept_count`); every later change keeps to that support."""
        support = Support(self._xp, {"w": ((0, 1), w_density), "u": ((2, 3), u_density)})
        support.select(self._params)
        self._support = support
        self._params = support.project(self._params)

    def threshold(self) -> None:
        """Re-select the support from the current magnitudes and project (one hard-thresholding step)."""
        if self._support is None:
            raise ConfigError("the model has no support to re-select", "Call prune(w_density, u_density) first.")
        self._support.select(self._params)
        self._params = self._support.project(self._params)

    @contextlib.contextmanager
    def unconstrained(self) -> Iterator[None]:
        """Inside, updates are not projected (a dense step before `threshold`); on exit, even on an error,
        the parameters are projected onto the support again."""
        self._projecting = False
        try:
            yield
        finally:
            self._projecting = True
            self._params = self._projected(self._params)

    def nonzeros(self) -> list[int]:
        """The number of non-zero entries of each parameter (a host read)."""
        return [int(np.count_nonzero(to_numpy(p))) for p in self._params]

    def state_dict(self) -> dict[str, Any]:
        """State beyond the parameters: the sparse support (None when dense)."""
        return {"support": None if self._support is None else self._support.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """`CheckpointError` exactly when `load_state_dict` would refuse ``state``; changes nothing."""
        self._support_from(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (the support), then project the parameters onto it."""
        self._support = self._support_from(state)
        self._params = self._projected(self._params)

    def _support_from(self, state: Any) -> Support | None:
        if not isinstance(state, dict) or set(state) != {"support"}:
            raise CheckpointError("FastGRNN state must be {'support': ...}")
        saved = state["support"]
        if saved is None:
            return None
        densities = saved.get("densities") if isinstance(saved, dict) else None
        if not isinstance(densities, dict) or set(densities) != {"w", "u"}:
            raise CheckpointError("FastGRNN support state lacks its 'w' and 'u' densities")
        try:
            support = Support(self._xp, {"w": ((0, 1), densities["w"]), "u": ((2, 3), densities["u"])})
        except ConfigError as exc:
            raise CheckpointError(f"FastGRNN support state: {'; '.join(exc.problems)}") from exc
        support.load_state_dict(saved, self._params)
        return support

    def _projected(self, params: list[Any]) -> list[Any]:
        return params if self._support is None or not self._projecting else self._support.project(params)

    def logits(self, x: Any) -> Any:
        """The logit s of shape (n,) for sequences ``x`` of shape (n, T, input_size)."""
        self._check_inputs(x)
        return self._forward(x)[1]

    def loss(self, batch: Sequence[Any]) -> Any:
        """The 0-d loss on ``(x, y)`` or ``(x, y, teacher_logits)``, forward pass only."""
        x, y, teacher = self._unpack(batch)
        return self._head(self._forward(x)[1], y, teacher, with_delta=False)[0]

    def loss_and_grad(self, batch: Sequence[Any]) -> tuple[Any, list[Any]]:
        """The 0-d loss and its gradient for every parameter, by back-propagation through time."""
        x, y, teacher = self._unpack(batch)
        cache, s = self._forward(x)
        loss, ds = self._head(s, y, teacher, with_delta=True)
        return loss, self._backward(x, cache, ds)

    def accuracy(self, batch: Sequence[Any]) -> Any:
        """The fraction of rows where (s > 0) agrees with (y > ½), as a 0-d array."""
        xp = self._xp
        x, y, _ = self._unpack(batch)
        hit = (self._forward(x)[1] > 0) == (y > 0.5)
        return xp.mean(xp.astype(hit, self.dtype))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"FastGRNN({fields}, backend={library_name(self._xp)}, dtype={self.dtype})"

    # -- the arithmetic ---------------------------------------------------------------------

    def _forward(self, x: Any) -> tuple[list[tuple[Any, Any, Any]], Any]:
        """Per step (h_{t−1}, z_t, h̃_t), what BPTT needs, plus h_T; and the logits."""
        xp = self._xp
        w1, w2, u1, u2, bz, bh, zeta_hat, nu_hat, v, c = self._params
        n, steps = x.shape[0], x.shape[1]
        zeta, nu = sigmoid(xp, zeta_hat), sigmoid(xp, nu_hat)
        gate, update = (pwl_sigmoid, pwl_tanh) if self._settings["nonlinearity"] == "pwl" else (sigmoid, tanh)
        wx = (x @ w1) @ w2  # all time steps at once: the input path does not depend on h
        h = xp.zeros((n, self._settings["hidden_size"]), dtype=self.dtype, device=array_api_compat.device(w1))
        cache = []
        for t in range(steps):
            a = wx[:, t, :] + (h @ u1) @ u2
            z, cand = gate(xp, a + bz), update(xp, a + bh)
            cache.append((h, z, cand))
            h = (zeta * (1.0 - z) + nu) * cand + z * h
        cache.append((h, None, None))
        return cache, h @ v + c

    def _backward(self, x: Any, cache: list[tuple[Any, Any, Any]], ds: Any) -> list[Any]:
        """Gradients of every parameter given dL/ds, walking the sequence backwards."""
        xp = self._xp
        w1, w2, u1, u2, _, _, zeta_hat, nu_hat, v, _ = self._params
        zeta, nu = sigmoid(xp, zeta_hat), sigmoid(xp, nu_hat)
        n, steps, d = x.shape
        h_last = cache[-1][0]
        g_v = h_last.T @ ds
        g_c = xp.reshape(xp.sum(ds), (1,))
        gh = ds[:, None] * v[None, :]
        g_u = xp.zeros((v.shape[0], v.shape[0]), dtype=v.dtype, device=array_api_compat.device(v))
        g_bz = xp.zeros_like(v)
        g_bh = xp.zeros_like(v)
        g_zeta = xp.zeros_like(g_c)
        g_nu = xp.zeros_like(g_c)
        d_pre: list[Any] = [None] * steps
        for t in range(steps - 1, -1, -1):
            h_prev, z, cand = cache[t]
            dz_da, dcand_da = slopes(xp, z, cand, self._settings["nonlinearity"] == "pwl")
            d_z = gh * (h_prev - zeta * cand) * dz_da
            d_cand = gh * (zeta * (1.0 - z) + nu) * dcand_da
            g_zeta = g_zeta + xp.sum(gh * (1.0 - z) * cand)
            g_nu = g_nu + xp.sum(gh * cand)
            g_bz = g_bz + xp.sum(d_z, axis=0)
            g_bh = g_bh + xp.sum(d_cand, axis=0)
            # Both gates read the same a_t = x_t·W + h_{t−1}·U, so their errors add before W and U.
            d_a = d_z + d_cand
            g_u = g_u + h_prev.T @ d_a
            gh = gh * z + (d_a @ u2.T) @ u1.T
            d_pre[t] = d_a
        flat_x = xp.reshape(x, (n * steps, d))
        flat_d = xp.reshape(xp.stack(d_pre, axis=1), (n * steps, v.shape[0]))
        g_w = flat_x.T @ flat_d
        grads = [g_w @ w2.T, w1.T @ g_w, g_u @ u2.T, u1.T @ g_u, g_bz, g_bh,
                 g_zeta * zeta * (1.0 - zeta), g_nu * nu * (1.0 - nu), g_v, g_c]
        l2 = self._settings["l2"]
        if l2:
            for i in (0, 1, 2, 3, 8):
                grads[i] = grads[i] + l2 * self._params[i]
        return grads

    def _head(self, s: Any, y: Any, teacher: Any, *, with_delta: bool) -> tuple[Any, Any]:
        """The loss (distillation and L2 included) and, if asked, dL/ds."""
        xp = self._xp
        n = s.shape[0]
        loss = xp.mean(bce_with_logits(xp, s, y))
        delta = (sigmoid(xp, s) - y) / n if with_delta else None
        alpha, temp = self._settings["distill_alpha"], self._settings["temperature"]
        if teacher is not None and alpha:
            soft = sigmoid(xp, teacher / temp)
            loss = (1.0 - alpha) * loss + alpha * temp**2 * xp.mean(bce_with_logits(xp, s / temp, soft))
            if with_delta:
                delta = (1.0 - alpha) * delta + alpha * temp * (sigmoid(xp, s / temp) - soft) / n
        l2 = self._settings["l2"]
        if l2:
            penalty = xp.sum(self._params[8] * self._params[8])
            for w in self._params[:4]:
                penalty = penalty + xp.sum(w * w)
            loss = loss + 0.5 * l2 * penalty
        return loss, delta

    # -- checks -----------------------------------------------------------------------------

    def _unpack(self, batch: Any) -> tuple[Any, Any, Any]:
        """``(x, y, teacher or None)`` after the cheap checks: library, device, shapes and dtypes."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise BatchError(f"a batch must be (x, y) or (x, y, teacher_logits); got {type(batch).__name__}"
                             + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""),
                             "Pass batch=(sequences, labels) or (sequences, labels, teacher_logits).")
        x, y = batch[0], batch[1]
        self._check_inputs(x)
        n = x.shape[0]
        self._check_array(y, "y")
        if tuple(y.shape) != (n,):
            raise BatchError(f"labels y have shape {tuple(y.shape)}; expected ({n},) for x of shape "
                             f"{tuple(x.shape)}", "Pass one 0/1 label per sequence.")
        xp = self._xp
        if y.dtype != self.dtype:
            if not (xp.isdtype(y.dtype, "integral") or xp.isdtype(y.dtype, "bool")):
                raise BatchError(f"labels y have dtype {y.dtype}; expected integers, bools or {self.dtype}",
                                 f"Cast the labels to {self.dtype}.")
            y = xp.astype(y, self.dtype)
        teacher = batch[2] if len(batch) == 3 else None
        if teacher is not None:
            self._check_array(teacher, "teacher_logits")
            if tuple(teacher.shape) != (n,) or teacher.dtype != self.dtype:
                raise BatchError(f"teacher logits have shape {tuple(teacher.shape)} and dtype {teacher.dtype}; "
                                 f"expected ({n},) {self.dtype}",
                                 "Pass one teacher logit per sequence, in the model's dtype.")
        return x, y, teacher

    def _check_inputs(self, x: Any) -> None:
        self._check_array(x, "x")
        d = self._settings["input_size"]
        if len(x.shape) != 3 or x.shape[2] != d or x.shape[1] < 1:
            raise BatchError(f"inputs x have shape {tuple(x.shape)}; expected (n, T, {d}) with T >= 1",
                             f"Pass sequences as (batch, time steps, {d}).")
        if x.shape[0] == 0:
            raise BatchError("the batch is empty: x has 0 rows", "Skip empty batches before the step.")
        if x.dtype != self.dtype:
            raise BatchError(f"inputs x have dtype {x.dtype}; the model's parameters are {self.dtype}",
                             f"Cast x to {self.dtype} (or build the FastGRNN with dtype={x.dtype}).")

    def _check_array(self, a: Any, what: str) -> None:
        check_batch_array(self._xp, a, what, self._params[0])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _problems(input_size: Any, hidden_size: Any, w_rank: Any, u_rank: Any, seed: Any, l2: Any, alpha: Any,
              temperature: Any) -> list[str]:
    """Every problem with the constructor's plain arguments."""
    problems = [f"{name}={value!r}: must be an integer >= 1"
                for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                                    ("w_rank", w_rank), ("u_rank", u_rank))
                if value is not None and not _is_count(value)]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r}: must be an integer >= 0")
    if not _is_finite(l2) or l2 < 0:
        problems.append(f"l2={l2!r}: must be a finite number >= 0")
    if not _is_finite(alpha) or not 0 <= alpha <= 1:
        problems.append(f"distill_alpha={alpha!r}: must be a number in [0, 1]")
    if not _is_finite(temperature) or temperature <= 0:
        problems.append(f"temperature={temperature!r}: must be a finite number > 0")
    return problems


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
