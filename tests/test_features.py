"""TrainingState history bounds and the 64-slot feature encoder."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import FEATURE_DIM, FEATURE_NAMES, FEATURE_SLOTS, Phase, PhaseState, TrainingState, encode_features
from hybrid_core._features import LOG_LOSS_SLOT
from hybrid_core._state import Measured, RingBuffer

finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.0, max_value=1e308, allow_nan=False)


def test_sixty_four_named_documented_slots():
    assert FEATURE_DIM == 64 == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    assert all(doc.strip() for _, doc in FEATURE_SLOTS)
    assert FEATURE_NAMES[LOG_LOSS_SLOT] == "log_loss"


def test_ring_buffer_keeps_newest_values_only():
    buf = RingBuffer(4)
    for v in range(10):
        buf.append(float(v))
    assert len(buf) == 4 and buf.last().tolist() == [6.0, 7.0, 8.0, 9.0]
    assert buf.last(2).tolist() == [8.0, 9.0] and buf.get(0) == 9.0 and buf.get(3) == 6.0
    with pytest.raises(IndexError):
        buf.get(4)
    copy = RingBuffer(4)
    copy.load_state_dict(buf.state_dict())
    assert copy.last().tolist() == buf.last().tolist()


def _run(state, losses, lr=0.01):
    for i, loss in enumerate(losses):
        state.record_real(loss, warmup=i < 5, measured=Measured(grad_sq=4.0, update_sq=1e-4, grad_dot_update=-0.01,
                                                                grad_max=0.5, param_count=100, lr=lr))


def test_history_is_bounded_for_long_runs():
    state = TrainingState(history_size=32)
    _run(state, [1.0 / (1 + i) for i in range(5000)])
    assert len(state.losses) == 32 and len(state.grad_norms) == 32
    assert state.real_steps == 5000


def test_slots_mean_what_they_say():
    state = TrainingState(64)
    losses = [2.0 * math.exp(-0.01 * i) for i in range(100)]
    _run(state, losses, lr=0.05)
    f = dict(zip(FEATURE_NAMES, encode_features(state, PhaseState(Phase.FULL, 7), 75)))
    assert f["loss"] == pytest.approx(losses[-1])
    assert f["log_loss"] == pytest.approx(math.log(losses[-1]))
    assert f["trend_window"] == pytest.approx(-0.01, rel=1e-6)
    assert f["trend_short"] == pytest.approx(-0.01, rel=1e-6)
    assert f["lag8_change"] == pytest.approx(-0.08, rel=1e-6)
    assert f["grad_norm"] == pytest.approx(2.0)
    assert f["update_norm"] == pytest.approx(0.01)
    assert f["cos_grad_update"] == pytest.approx(-0.5)
    assert f["lr"] == pytest.approx(0.05) and f["lr_ratio"] == pytest.approx(1.0)
    assert (f["phase_warmup"], f["phase_full"], f["phase_predict"], f["phase_correct"]) == (0, 1, 0, 0)
    assert f["log_steps_in_phase"] == pytest.approx(math.log(8))
    assert f["up_fraction"] == 0.0 and f["oscillation"] == 0.0
    assert f["ema_gap"] < 0  # still falling: the fast EMA is below the slow one
    assert f["bias"] == 1.0 and f["warmup_done"] == 1.0


def test_encoder_on_empty_state_is_finite():
    out = encode_features(TrainingState(), PhaseState(Phase.WARMUP), 75)
    assert out.shape == (64,) and out.dtype == np.float64 and np.all(np.isfinite(out))


@settings(max_examples=80, deadline=None)
@given(
    losses=st.lists(positive, min_size=0, max_size=80),
    grad=positive, update=positive, dot=finite, gmax=positive,
    lr=st.floats(min_value=0.0, max_value=1e308), steps_in_phase=st.integers(0, 10**9),
    phase=st.sampled_from(list(Phase)), errs=st.lists(st.tuples(positive, positive), max_size=5),
)
def test_features_finite_for_any_finite_input(losses, grad, update, dot, gmax, lr, steps_in_phase, phase, errs):
    state = TrainingState(16)
    for i, loss in enumerate(losses):
        # Statistics are measured on some steps only; the others record the loss alone.
        state.record_real(loss, warmup=i < 3, measured=Measured(grad, update, dot, gmax, 10, lr) if i % 3 else None)
        if i % 7 == 3:
            state.record_predicted()
            state.record_skip()
    for predicted, actual in errs:
        state.record_prediction_error(predicted, actual)
    out = encode_features(state, PhaseState(phase, steps_in_phase, 3), 75)
    assert out.shape == (FEATURE_DIM,)
    assert np.all(np.isfinite(out))


def test_state_dict_round_trip():
    a = TrainingState(16)
    _run(a, [1.0, 0.8, 0.7, 0.75, 0.6])
    a.record_prediction_error(0.5, 0.6)
    b = TrainingState(16)
    b.load_state_dict(a.state_dict())
    ps = PhaseState(Phase.FULL, 2)
    assert np.array_equal(encode_features(a, ps, 75), encode_features(b, ps, 75))
