"""A seeded generator of synthetic routing logs: request windows → route to the large model or not."""

from __future__ import annotations

import numpy as np

from hybrid_core import ConfigError

__all__ = ["ROUTING_FEATURES", "routing_logs"]

ROUTING_FEATURES = (
    "log_tokens",
    "difficulty",
    "small_confidence",
    "queue_load",
    "latency_budget",
    "premium",
)
"""The per-request features of `routing_logs`, in column order."""

_RECENT = 4  # how many past requests the failure rate and the load trend look at


def routing_logs(n: int = 4000, steps: int = 12, seed: int = 0,
                 label_noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows of ``steps`` requests, x (n, steps, 6) float64, and route labels y (n,) int64.

    The scenario: a router sits in front of a small, cheap model and a large, expensive one
    and, after each request, decides where the *latest* one goes (y = 1: the large model).
    It sees the last ``steps`` requests of the session, each as `ROUTING_FEATURES`:

    - ``log_tokens``: log prompt length, N(5 + 0.5·difficulty, 0.8);
    - ``difficulty``: a cheap difficulty estimate, session level μ ~ N(0, 1) plus N(0, 0.6²)
      per request;
    - ``small_confidence``: the small model's self-reported confidence,
      σ(1.5 − 1.2·difficulty + N(0, 0.5²));
    - ``queue_load``: the large model's queue utilisation, a random walk with N(0, 0.08²)
      steps from U(0.2, 0.8), clipped to [0, 1];
    - ``latency_budget``: log of the request's latency budget in ms, N(6 + 0.8·premium, 0.4²);
    - ``premium``: 1 for a premium user (probability 0.3), fixed for the session.

    Labelling rule, on the last request (index −1) and the ``_RECENT`` = 4 before it:

        score = 1.2·difficulty[−1]
              + 2.0·(mean of (1 − small_confidence) over the last 4 requests − 0.25)
              − 3.0·(queue_load[−1] − queue_load[−5])     (a filling queue keeps traffic cheap)
              − 1.5·(queue_load[−1] − 0.5)
              + 0.8·premium + 0.6·(latency_budget[−1] − 6.24) + N(0, 0.3²)
        y = [score > 0], then each label flipped with probability ``label_noise``.

    Two terms need memory of earlier requests (the recent failure rate and the load trend),
    so a model that sees only the last request cannot reach the best accuracy; with the
    defaults about half of the labels are 1. Same arguments → same arrays.
    """
    problems = []
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append(f"n={n!r}: must be an integer >= 1")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < _RECENT + 1:
        problems.append(f"steps={steps!r}: must be an integer >= {_RECENT + 1}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r}: must be an integer >= 0")
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise <= 0.5:
        problems.append(f"label_noise={label_noise!r}: must be a number in [0, 0.5]")
    if problems:
        raise ConfigError(problems)
    rng = np.random.default_rng(seed)
    premium = (rng.random(n) < 0.3).astype(np.float64)
    session = rng.normal(0.0, 1.0, n)
    difficulty = session[:, None] + rng.normal(0.0, 0.6, (n, steps))
    log_tokens = rng.normal(5.0 + 0.5 * difficulty, 0.8)
    small_conf = 1.0 / (1.0 + np.exp(-(1.5 - 1.2 * difficulty + rng.normal(0.0, 0.5, (n, steps)))))
    walk = rng.uniform(0.2, 0.8, n)[:, None] + np.cumsum(rng.normal(0.0, 0.08, (n, steps)), axis=1)
    load = np.clip(walk, 0.0, 1.0)
    budget = rng.normal(6.0 + 0.8 * premium[:, None], 0.4, (n, steps))
    score = (1.2 * difficulty[:, -1]
             + 2.0 * (np.mean(1.0 - small_conf[:, -_RECENT:], axis=1) - 0.25)
             - 3.0 * (load[:, -1] - load[:, -_RECENT - 1])
             - 1.5 * (load[:, -1] - 0.5)
             + 0.8 * premium + 0.6 * (budget[:, -1] - 6.24)
             + rng.normal(0.0, 0.3, n))
    flip = rng.random(n) < label_noise
    y = (score > 0) != flip
    x = np.stack([log_tokens, difficulty, small_conf, load, budget, np.repeat(premium[:, None], steps, axis=1)],
                 axis=2)
    return x, y.astype(np.int64)
