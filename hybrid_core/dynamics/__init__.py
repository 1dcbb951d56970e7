"""Learned dynamics models: `RSSMDynamics`, and `evaluate_dynamics` to score any `DynamicsModel`."""

from ._evaluate import evaluate_dynamics
from ._rssm import RSSMDynamics

__all__ = ["RSSMDynamics", "evaluate_dynamics"]
