"""DivergenceMonitor levels."""

import math

import numpy as np

from hybrid_core import TrainingState
from hybrid_core._monitor import DivergenceMonitor, Level
from hybrid_core._state import Measured


def _state(noise=0.05, steps=120):
    rng = np.random.default_rng(0)
    st = TrainingState(64)
    for i in range(steps):
        loss = 1.0 + noise * rng.normal()
        st.record_real(loss, warmup=i < 20, measured=Measured(4.0, 1e-4, -0.01, 0.5, 10, 0.01))
    return st


def test_levels():
    mon = DivergenceMonitor(sigma=2.2, explode_ratio=10.0)
    st = _state()
    assert mon.assess(st, 1.0, 2.0).level is Level.OK
    assert mon.assess(st, math.nan, 2.0).level is Level.FATAL
    assert mon.assess(st, 1.0, math.inf).level is Level.FATAL
    std = math.sqrt(st.loss_var_ema)
    assert mon.assess(st, st.loss_ema_fast + 3 * std, 2.0).level is Level.SHRINK
    spike = mon.assess(st, st.loss_ema_fast + 10 * std, 2.0)
    assert spike.level is Level.FORCE_FULL and "σ" in spike.reasons[0]
    assert mon.assess(st, 1.0, 25.0).level is Level.FORCE_FULL  # 12.5× the warm-up gradient norm
    assert mon.assess(st, 1.0, 1e-4).level is Level.SHRINK  # vanishing
    st.pred_err_ema = 2.0
    assert mon.assess(st, 1.0, 2.0).level is Level.SHRINK


def test_quiet_during_warmup_and_flags_oscillation():
    mon = DivergenceMonitor()
    fresh = TrainingState()
    fresh.record_real(1.0, warmup=True, measured=Measured(1.0, 0.0, 0.0, 1.0, 1, 0.1))
    assert mon.assess(fresh, 50.0, 100.0).level is Level.OK
    st = TrainingState(64)
    for i in range(60):
        st.record_real(1.0 + (0.01 if i % 2 else -0.01), warmup=i < 5, measured=Measured(4.0, 1e-4, 0, 0.5, 10, 0.01))
    verdict = mon.assess(st, 1.0, 2.0)
    assert verdict.level is Level.SHRINK and "oscillates" in verdict.reasons[-1]
