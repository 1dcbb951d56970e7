"""`QuantizedFastGRNN`: a trained (sparse) `FastGRNN` in 8-bit weights, run in integer arithmetic only.

Every scale is a power of two, 2^−e, so rescaling is a rounding shift, as on a microcontroller
without an FPU. Weights W1, W2, U1, U2 and v are int8 with one exponent per tensor, chosen so the
largest |w| fits ±127 (no clipping: dequantizing errs by at most half a step, 2^−e/2). Activations:
the input x and the two low-rank intermediates x·W1 and h·U1 are int16, every product of an
int8 weight and an int8/int16 activation accumulates in int32; the exponents of x and of the
intermediates come from the float model's largest magnitudes on calibration data (values beyond
saturate). Pre-activations go to Q12 (2^−12), gates and states are Q14 (2^−14, int16: |h| < 2):

    a    = shift(shift(x·W1)·W2) + shift(shift(h·U1)·U2)               (int32, Q12)
    z    = σ(a + b_z),  h̃ = tanh(a + b_h)                              (Q14)
    h    = (((ζ·(1 − z)) >> 14 + ν)·h̃ + z·h) >> 14                     (Q14)
    s    = h·v + c                                                       (int32, 2^−(14+e_v))

σ and tanh: for a model trained with ``nonlinearity="pwl"`` the paper's clip((a + 1)/2, 0, 1)
and clip(a, −1, 1), exact in integers; otherwise a 65-entry Q14 table of σ on [−8, 8] (step ¼)
with integer linear interpolation, and tanh(a) = 2σ(2a) − 1. The table is a constant of this
module (rebuilt at load, not stored per model).
"""

from __future__ import annotations

import math
from typing import Any, final

import numpy as np

from .._backend import to_numpy
from .._errors import BatchError, ConfigError
from .fastgrnn import FastGRNN

__all__ = ["EXPONENTS", "WEIGHTS", "QuantizedFastGRNN", "quantize_tensor"]

WEIGHTS = ("w1", "w2", "u1", "u2", "v")
"""The int8 weight tensors, in `FastGRNN.parameters` order (v is the read-out)."""
EXPONENTS = ("x", "xw1", "hu1", *WEIGHTS)
"""The per-tensor exponents e (scale 2^−e) a quantized model stores."""

_Q = 14  # gates, candidate and state: Q14 in int16
_ONE = 1 << _Q
_A = 12  # pre-activations: Q12
_INT16 = 32767
_SIGMOID_TABLE = np.round(_ONE / (1.0 + np.exp(-np.linspace(-8.0, 8.0, 65)))).astype(np.int64)


def quantize_tensor(w: np.ndarray, bound: int = 127) -> tuple[np.ndarray, int]:
    """(round(w·2^e), e) with the largest e such that max|w|·2^e <= ``bound``: no value clips, so
    |w − q·2^−e| <= 2^−e/2 for every entry. An all-zero tensor gets e = 0."""
    top = float(np.max(np.abs(w))) if w.size else 0.0
    e = 0 if top == 0.0 else math.floor(math.log2(bound / top))
    q = np.round(np.asarray(w, dtype=np.float64) * 2.0**e)
    return np.clip(q, -bound, bound).astype(np.int8 if bound <= 127 else np.int32), e


def _exponent_for(top: float, bound: int) -> int:
    return 0 if top <= 0.0 or not math.isfinite(top) else math.floor(math.log2(bound / top))


def _shift(x: np.ndarray, s: int) -> np.ndarray:
    """x·2^−s rounded half up (an arithmetic shift right by s with rounding; a left shift for s < 0)."""
    x = x.astype(np.int64)
    if s > 0:
        return (x + (1 << (s - 1))) >> s
    return x << -s if s < 0 else x


def _sigmoid_q14(a12: np.ndarray) -> np.ndarray:
    """σ of Q12 values in Q14: table at step ¼ on [−8, 8], linear interpolation in integers."""
    pos = np.clip(a12 + (8 << _A), 0, (16 << _A) - 1)
    j, frac = pos >> (_A - 2), pos & ((1 << (_A - 2)) - 1)
    lo, hi = _SIGMOID_TABLE[j], _SIGMOID_TABLE[j + 1]
    return lo + (((hi - lo) * frac + (1 << (_A - 3))) >> (_A - 2))


@final
class QuantizedFastGRNN:
    """A FastGRNN with int8 weights, int32 biases and power-of-two scales; NumPy integer inference.

    Build it with `from_model` (a trained float `FastGRNN` and calibration inputs), run it with
    `logits` / `predict`, export it with `hybrid_core.models.save_quantized`. ``weights`` maps
    `WEIGHTS` to int8 arrays (zeros where the model was pruned), ``exponents`` maps `EXPONENTS`
    to ints, ``b_z``/``b_h`` are int32 in Q12, ``c`` int32 at the read-out's scale, ``zeta``/``nu``
    Q14 ints.
    """

    def __init__(self, settings: dict[str, Any], weights: dict[str, np.ndarray], exponents: dict[str, int],
                 b_z: np.ndarray, b_h: np.ndarray, c: int, zeta: int, nu: int) -> None:
        self.settings = dict(settings)
        self.weights = {k: np.asarray(weights[k], dtype=np.int8) for k in WEIGHTS}
        self.exponents = {k: int(exponents[k]) for k in EXPONENTS}
        self.b_z, self.b_h = np.asarray(b_z, dtype=np.int32), np.asarray(b_h, dtype=np.int32)
        self.c, self.zeta, self.nu = int(c), int(zeta), int(nu)
        widest = max(self.settings["input_size"], self.settings["hidden_size"], self.settings["w_rank"],
                     self.settings["u_rank"])
        if widest * 127 * _INT16 >= 2**31:
            raise ConfigError(f"a dimension of {widest} could overflow the int32 accumulators",
                              "Quantize models whose sizes and ranks are below 516.")

    @classmethod
    def from_model(cls, model: FastGRNN, calibration: Any) -> QuantizedFastGRNN:
        """Quantize ``model`` (its support kept: pruned weights stay 0); ``calibration`` are inputs of shape
        (n, T, input_size) like those it will see, for the activation ranges."""
        params = [np.asarray(to_numpy(p), dtype=np.float64) for p in model.parameters()]
        w1, w2, u1, u2, bz, bh, zeta_hat, nu_hat, v, c = params
        x = np.asarray(to_numpy(calibration), dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != model.settings["input_size"] or x.shape[0] < 1:
            raise BatchError(f"calibration inputs have shape {x.shape}; expected (n, T, "
                             f"{model.settings['input_size']})", "Pass (normalised) training sequences.")
        weights, exps = {}, {}
        for name, w in zip(WEIGHTS, (w1, w2, u1, u2, v), strict=True):
            weights[name], exps[name] = quantize_tensor(w)
        hs = _float_states(params, x, model.settings["nonlinearity"])
        exps["x"] = _exponent_for(float(np.max(np.abs(x))), _INT16)
        exps["xw1"] = _exponent_for(float(np.max(np.abs(x @ w1))), _INT16)
        exps["hu1"] = _exponent_for(float(np.max(np.abs(hs @ u1))), _INT16)
        out_e = _Q + exps["v"]
        return cls(model.settings, weights, exps, np.round(bz * 2.0**_A), np.round(bh * 2.0**_A),
                   round(float(c[0]) * 2.0**out_e), round(_ONE / (1 + math.exp(-zeta_hat[0]))),
                   round(_ONE / (1 + math.exp(-nu_hat[0]))))

    # -- integer inference ----------------------------------------------------------------------

    def logits_int(self, x: Any) -> np.ndarray:
        """The logits as int64 accumulator values (scale 2^−(14 + e_v)); ``x`` float (n, T, d), quantized here."""
        x = np.asarray(x, dtype=np.float64)
        d = self.settings["input_size"]
        if x.ndim != 3 or x.shape[2] != d or x.shape[0] < 1 or x.shape[1] < 1:
            raise BatchError(f"inputs x have shape {x.shape}; expected (n, T, {d}) with n, T >= 1",
                             f"Pass sequences as (batch, time steps, {d}).")
        e, w = self.exponents, {k: a.astype(np.int32) for k, a in self.weights.items()}
        xq = np.clip(np.round(x * 2.0**e["x"]), -_INT16, _INT16).astype(np.int32)
        p = np.clip(_shift(xq @ w["w1"], e["x"] + e["w1"] - e["xw1"]), -_INT16, _INT16).astype(np.int32)
        wx = _shift(p @ w["w2"], e["xw1"] + e["w2"] - _A)
        pwl = self.settings["nonlinearity"] == "pwl"
        h = np.zeros((x.shape[0], self.settings["hidden_size"]), dtype=np.int64)
        for t in range(x.shape[1]):
            q = np.clip(_shift(h.astype(np.int32) @ w["u1"], _Q + e["u1"] - e["hu1"]), -_INT16, _INT16)
            a = wx[:, t, :] + _shift(q.astype(np.int32) @ w["u2"], e["hu1"] + e["u2"] - _A)
            az, ah = a + self.b_z, a + self.b_h
            if pwl:
                z = np.clip((az + (1 << _A)) << (_Q - _A - 1), 0, _ONE)
                cand = np.clip(ah << (_Q - _A), -_ONE, _ONE)
            else:
                z = _sigmoid_q14(az)
                cand = 2 * _sigmoid_q14(2 * ah) - _ONE
            coef = _shift(self.zeta * (_ONE - z), _Q) + self.nu
            h = np.clip(_shift(coef * cand + z * h, _Q), -_INT16, _INT16)
        return (h.astype(np.int32) @ w["v"]).astype(np.int64) + self.c

    def logits(self, x: Any) -> np.ndarray:
        """The logits as float64 (the integer ones times their scale)."""
        return self.logits_int(x) * 2.0 ** -(_Q + self.exponents["v"])

    def predict(self, x: Any) -> np.ndarray:
        """1 where the (integer) logit is positive, else 0."""
        return (self.logits_int(x) > 0).astype(np.int64)

    # -- the float view -------------------------------------------------------------------------

    def dequantized_parameters(self) -> list[np.ndarray]:
        """The parameters the integers stand for, float64 in `FastGRNN.parameters` order."""
        e = self.exponents
        w = {k: self.weights[k].astype(np.float64) * 2.0 ** -e[k] for k in WEIGHTS}
        return [w["w1"], w["w2"], w["u1"], w["u2"], self.b_z * 2.0**-_A, self.b_h * 2.0**-_A,
                np.array([_logit(self.zeta / _ONE)]), np.array([_logit(self.nu / _ONE)]), w["v"],
                np.array([self.c * 2.0 ** -(_Q + e["v"])])]

    def to_float(self, *, xp: Any = None, dtype: Any = None, device: Any = None) -> FastGRNN:
        """A float `FastGRNN` holding the dequantized parameters (any backend), e.g. to fine-tune or compare."""
        from .._backend import as_namespace, from_numpy

        xp = as_namespace(xp)
        model = FastGRNN(**self.settings, xp=xp, dtype=dtype, device=device)
        current = model.parameters()
        model.set_parameters([from_numpy(xp, p.reshape(c.shape), dtype=c.dtype, device=device)
                              for p, c in zip(self.dequantized_parameters(), current, strict=True)])
        return model

    def nonzeros(self) -> dict[str, int]:
        """Non-zero int8 entries per weight tensor."""
        return {k: int(np.count_nonzero(a)) for k, a in self.weights.items()}

    def __repr__(self) -> str:
        return f"QuantizedFastGRNN({self.settings}, nonzeros={self.nonzeros()})"


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _float_states(params: list[np.ndarray], x: np.ndarray, nonlinearity: str) -> np.ndarray:
    """Every h_{t−1} the float cell sees on ``x`` (float64), stacked: the range of h·U1."""
    w1, w2, u1, u2, bz, bh, zeta_hat, nu_hat, _, _ = params
    zeta, nu = 1 / (1 + np.exp(-zeta_hat)), 1 / (1 + np.exp(-nu_hat))
    wx = (x @ w1) @ w2
    h = np.zeros((x.shape[0], w2.shape[1]))
    seen = []
    for t in range(x.shape[1]):
        seen.append(h)
        a = wx[:, t, :] + (h @ u1) @ u2
        if nonlinearity == "pwl":
            z, cand = np.clip((a + bz + 1) / 2, 0, 1), np.clip(a + bh, -1, 1)
        else:
            z, cand = 1 / (1 + np.exp(-(a + bz))), np.tanh(a + bh)
        h = (zeta * (1 - z) + nu) * cand + z * h
    seen.append(h)
    return np.concatenate(seen, axis=0)
