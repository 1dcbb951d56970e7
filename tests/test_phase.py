"""The phase machine: pure, total, WARMUP first, every phase bounded."""

from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import HybridConfig, Phase, PhaseState, Signals, initial_phase_state, next_phase
from hybrid_core._phase import phase_bound

signals_st = st.builds(
    Signals,
    confidence=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.95)),
    horizon=st.integers(-5, 500),
    check_failed=st.booleans(),
    diverging=st.booleans(),
)
config_st = st.builds(
    lambda w, mn, extra, mp, probe, corr, thr: HybridConfig(
        warmup_steps=w, min_full_steps=mn, max_full_steps=mn + extra, max_predict_steps=mp,
        probe_steps=min(probe, mp), correct_steps=corr, confidence_threshold=thr,
    ),
    st.integers(1, 30), st.integers(1, 30), st.integers(0, 60), st.integers(1, 40),
    st.integers(1, 10), st.integers(1, 20), st.floats(0.0, 1.0),
)
state_st = st.builds(
    PhaseState,
    phase=st.sampled_from(list(Phase)),
    steps_in_phase=st.integers(0, 200),
    horizon=st.integers(-3, 500),
    probe=st.booleans(),
)


def test_starts_in_warmup():
    assert initial_phase_state() == PhaseState(Phase.WARMUP, 0, 0, False)


def test_walks_the_full_cycle():
    cfg = HybridConfig(warmup_steps=2, min_full_steps=2, max_predict_steps=3, probe_steps=1, correct_steps=2)
    sig = Signals(confidence=0.9, horizon=3)
    s = initial_phase_state()
    seen = []
    for _ in range(12):
        seen.append(s.phase)
        s = next_phase(s, cfg, sig)
    assert seen == [Phase.WARMUP] * 2 + [Phase.FULL] * 2 + [Phase.PREDICT] * 3 + [Phase.CORRECT] * 2 + [
        Phase.FULL] * 2 + [Phase.PREDICT]


def test_low_confidence_stays_full_until_bound_then_probes():
    cfg = HybridConfig(warmup_steps=1, min_full_steps=2, max_full_steps=5, probe_steps=2)
    s = PhaseState(Phase.FULL)
    for _ in range(4):
        s = next_phase(s, cfg, Signals(confidence=0.1, horizon=10))
        assert s.phase is Phase.FULL
    s = next_phase(s, cfg, Signals(confidence=0.1, horizon=10))
    assert s == PhaseState(Phase.PREDICT, 0, 2, True)


def test_failed_check_or_divergence_ends_predict():
    cfg = HybridConfig()
    s = PhaseState(Phase.PREDICT, 3, 50)
    assert next_phase(s, cfg, Signals(check_failed=True)).phase is Phase.CORRECT
    assert next_phase(s, cfg, Signals(diverging=True)).phase is Phase.CORRECT
    assert next_phase(s, cfg, Signals()).phase is Phase.PREDICT


def test_diverging_blocks_predict():
    cfg = HybridConfig(min_full_steps=1)
    s = PhaseState(Phase.FULL, 10)
    assert next_phase(s, cfg, Signals(confidence=1.0, horizon=5, diverging=True)).phase is Phase.FULL


@given(state_st, config_st, signals_st)
def test_deterministic_and_total(state, cfg, sig):
    a = next_phase(state, cfg, sig)
    b = next_phase(state, cfg, sig)
    assert a == b
    assert isinstance(a.phase, Phase)
    assert a.steps_in_phase >= 0
    if a.phase is Phase.PREDICT:
        assert 1 <= a.horizon <= cfg.max_predict_steps


@given(state_st, config_st, signals_st)
def test_never_returns_to_warmup(state, cfg, sig):
    if state.phase is not Phase.WARMUP:
        assert next_phase(state, cfg, sig).phase is not Phase.WARMUP


@settings(max_examples=60)
@given(config_st, st.lists(signals_st, min_size=1, max_size=400))
def test_no_phase_outlasts_its_bound(cfg, signal_seq):
    s = initial_phase_state()
    run = 0
    for i in range(600):
        sig = signal_seq[i % len(signal_seq)]
        nxt = next_phase(s, cfg, sig)
        run = run + 1 if nxt.phase is s.phase and nxt.steps_in_phase > 0 else 0
        bound = phase_bound(nxt, cfg)
        if nxt.phase is Phase.PREDICT:
            bound = min(bound, max(nxt.horizon, 1))
        assert run < bound, (nxt, run, bound)
        s = nxt
