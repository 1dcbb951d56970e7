"""MetricsCollector: bounded records, exact totals, JSON Lines export."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_core import MetricsCollector, Phase, StepRecord


def _rec(i, phase, backward=None):
    return StepRecord(i, phase.value, 1.0, None, phase.backward if backward is None else backward, 0.01, 0.5)


def test_summary_counts_and_bounded_records(tmp_path):
    m = MetricsCollector(max_records=3)
    phases = [Phase.WARMUP, Phase.FULL, Phase.PREDICT, Phase.PREDICT, Phase.CORRECT]
    for i, p in enumerate(phases):
        m.record(_rec(i, p))
    m.count("checks", 2)
    s = m.summary()
    assert s["steps"] == 5 and s["backward_passes"] == 3 and s["backward_passes_skipped"] == 2
    assert s["steps_per_phase"] == {"warmup": 1, "full": 1, "predict": 2, "correct": 1}
    assert s["wall_seconds"] == pytest.approx(0.05)
    assert s["events"] == {"checks": 2} and s["records_kept"] == 3
    path = tmp_path / "m.jsonl"
    assert m.to_jsonl(path) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4] and rows[0]["phase"] == "predict"


def test_rejects_bad_capacity():
    with pytest.raises(ValueError):
        MetricsCollector(max_records=-1)


@given(st.lists(st.sampled_from(list(Phase)), max_size=200), st.integers(0, 50))
def test_metrics_consistent(phases, cap):
    m = MetricsCollector(max_records=cap)
    for i, p in enumerate(phases):
        m.record(_rec(i, p))
    s = m.summary()
    assert sum(s["steps_per_phase"].values()) == s["steps"] == len(phases)
    assert s["backward_passes"] == s["steps"] - s["steps_per_phase"]["predict"]
    assert s["records_kept"] == min(cap, len(phases))
    copy = MetricsCollector(cap)
    copy.load_state_dict(m.state_dict())
    assert copy.summary() == s and copy.records == m.records
