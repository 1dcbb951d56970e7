"""`LinUCBBandit`: picks the PREDICT horizon from a small context, learning what pays.

Disjoint LinUCB (Li et al., 2010) with a full matrix per arm. Each arm keeps
A⁻¹ = (λI + Σ x xᵀ)⁻¹, updated by Sherman–Morrison, and b = Σ r·x; it scores
θᵀx + α·√(xᵀA⁻¹x) with θ = A⁻¹b. Arm 0 means "do not predict" and is always
present: its reward is 0 by definition (plain training is the yardstick), so the
bandit settles on it whenever predicting loses on average.

With ``ladder`` on, the horizons are a ladder: a horizon may be chosen only once the
next shorter one has been tried and earned a positive mean reward. Exploring every
arm once costs a whole PREDICT phase per arm — on a task where prediction does not
pay, that exploration alone makes a run measurably worse than plain training — and
a longer horizon of the same direction rarely pays where a shorter one loses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import ConfigError
from ._statecheck import fields, flag, integer, matrix, real, sequence

__all__ = ["MAX_ARMS", "LinUCBBandit"]

MAX_ARMS = 100_000
"""Bound on a saved state's arm count and on each arm (the config's bound on a horizon)."""


class LinUCBBandit:
    """Contextual bandit over PREDICT horizons (``arms``, which must include 0)."""

    def __init__(self, arms: Sequence[int], dim: int, alpha: float = 0.5, ridge: float = 1.0,
                 ladder: bool = False) -> None:
        arms = list(arms)
        problems = []
        if not arms or 0 not in arms or any(isinstance(a, bool) or not isinstance(a, int) or a < 0 for a in arms):
            problems.append(f"arms={arms!r}: must be non-negative integers including 0")
        if len(set(arms)) != len(arms):
            problems.append(f"arms={arms!r}: must not repeat")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            problems.append(f"dim={dim!r}: must be an integer >= 1")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            problems.append(f"alpha={alpha!r}: must be a finite number >= 0")
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge > 0):
            problems.append(f"ridge={ridge!r}: must be a finite number > 0")
        if not isinstance(ladder, bool):
            problems.append(f"ladder={ladder!r}: must be True or False")
        if problems:
            raise ConfigError(problems)
        self.ladder = ladder
        self.arms = sorted(arms)
        self.dim = dim
        self.alpha = float(alpha)
        self.ridge = float(ridge)
        self._a_inv = np.stack([np.eye(dim) / ridge for _ in self.arms])
        self._b = np.zeros((len(self.arms), dim))
        self.pulls = np.zeros(len(self.arms), dtype=np.int64)
        self.reward_sums = np.zeros(len(self.arms))

    def allowed(self) -> list[int]:
        """The arms `choose` may pick now: all, or with ``ladder`` the rungs reached so far."""
        if not self.ladder:
            return list(self.arms)
        out = [self.arms[0]]
        for i in range(1, len(self.arms)):
            out.append(self.arms[i])
            if not (self.pulls[i] > 0 and self.reward_sums[i] > 0):
                break
        return out

    def gave_up(self) -> bool:
        """Whether every horizon `choose` may pick besides 0 was tried and earned no positive mean reward."""
        tried = [i for i, arm in enumerate(self.arms) if arm != 0 and arm in self.allowed()]
        return bool(tried) and all(self.pulls[i] > 0 and self.reward_sums[i] <= 0 for i in tried)

    def scores(self, context: np.ndarray) -> np.ndarray:
        """Upper confidence bound of each arm's reward for ``context``."""
        x = self._context(context)
        theta = np.einsum("aij,aj->ai", self._a_inv, self._b)
        width = np.sqrt(np.maximum(np.einsum("i,aij,j->a", x, self._a_inv, x), 0.0))
        return theta @ x + self.alpha * width

    def choose(self, context: np.ndarray) -> int:
        """The allowed horizon with the highest score; ties go to the shorter horizon (0 first)."""
        scores = self.scores(context)
        allowed = len(self.allowed())  # arms are sorted and the allowed ones are a prefix
        return self.arms[int(np.argmax(scores[:allowed]))]

    def update(self, arm: int, context: np.ndarray, reward: float) -> None:
        """Learn ``reward`` for ``arm`` in ``context`` (Sherman–Morrison rank-one update)."""
        if arm not in self.arms:
            raise ConfigError(f"arm={arm!r}: not one of {self.arms}")
        if not math.isfinite(reward):
            raise ConfigError(f"reward={reward!r}: must be finite")
        i = self.arms.index(arm)
        x = self._context(context)
        a_inv = self._a_inv[i]
        ax = a_inv @ x
        self._a_inv[i] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)
        self._b[i] += reward * x
        self.pulls[i] += 1
        self.reward_sums[i] += reward

    def theta(self, arm: int) -> np.ndarray:
        """The arm's current reward weights A⁻¹b."""
        i = self.arms.index(arm)
        return self._a_inv[i] @ self._b[i]

    def _context(self, context: np.ndarray) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ConfigError(f"context must be {self.dim} finite numbers, got shape {x.shape}")
        return x

    def state_dict(self) -> dict[str, Any]:
        """Arms, hyper-parameters and the per-arm matrices (as nested lists)."""
        return {"arms": list(self.arms), "dim": self.dim, "alpha": self.alpha, "ridge": self.ridge,
                "a_inv": self._a_inv.tolist(), "b": self._b.tolist(), "pulls": self.pulls.tolist(),
                "reward_sums": self.reward_sums.tolist(), "ladder": self.ladder}

    def check_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """The attributes `load_state_dict` would set; `ValueError` naming the field if malformed.

        The arms must be distinct sorted integers including 0 (at most `MAX_ARMS`), the context dimension
        this bandit's, the matrices of their shapes and finite, the pull counts integers >= 0.
        """
        fields(state, ("arms", "dim", "alpha", "ridge", "a_inv", "b", "pulls"), ("reward_sums", "ladder"),
               what="bandit state")
        saved_arms = sequence(state["arms"], "arms", MAX_ARMS)
        arms = [integer(a, f"arms[{i}]", 0, MAX_ARMS) for i, a in enumerate(saved_arms)]
        if not arms or arms[0] != 0 or arms != sorted(set(arms)):
            raise ValueError(f"arms={arms!r}: must be distinct sorted integers starting at 0")
        d = integer(state["dim"], "dim", 1)
        if d != self.dim:
            raise ValueError(f"dim={d}: this bandit's context has {self.dim} entries")
        n = len(arms)
        ridge = real(state["ridge"], "ridge", 0.0)
        if ridge == 0.0:
            raise ValueError("ridge=0.0: must be > 0")
        pulls = [integer(p, f"pulls[{i}]") for i, p in enumerate(sequence(state["pulls"], "pulls", n, n))]
        return {"arms": arms, "alpha": real(state["alpha"], "alpha", 0.0), "ridge": ridge,
                "_a_inv": matrix(state["a_inv"], "a_inv", (n, d, d)), "_b": matrix(state["b"], "b", (n, d)),
                "pulls": np.array(pulls, dtype=np.int64),
                "reward_sums": (np.zeros(n) if "reward_sums" not in state
                                else matrix(state["reward_sums"], "reward_sums", (n,))),
                "ladder": flag(state.get("ladder", self.ladder), "ladder")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (`ValueError` naming the field, and no change, if malformed)."""
        for name, value in self.check_state_dict(state).items():
            setattr(self, name, value)
