"""Dynamics models: the learned `RSSMDynamics` (the trainer's default), the baseline `TrendDynamics`,
and `evaluate_dynamics` to score any `DynamicsModel` on a recorded trajectory."""

from ._evaluate import evaluate_dynamics
from ._rssm import RSSMDynamics
from ._trend import TrendDynamics

__all__ = ["RSSMDynamics", "TrendDynamics", "evaluate_dynamics"]
