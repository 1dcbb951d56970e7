"""HybridConfig: validation of every field, all problems reported at once."""

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_core import ConfigError, HybridConfig, HybridError

# One invalid value per field, and a fragment of its allowed range that the message must show.
INVALID = {
    "warmup_steps": (0, "[1,"),
    "min_full_steps": (-3, "[1,"),
    "max_full_steps": (1.5, "integer"),
    "max_predict_steps": (0, "[1,"),
    "probe_steps": (0, "[1,"),
    "check_interval": (-1, "[0,"),
    "correct_steps": (0, "[1,"),
    "confidence_threshold": (1.5, "[0.0, 1.0]"),
    "divergence_sigma": (0.0, "(0.0,"),
    "direction": ("sideways", "'extrapolate'"),
    "on_nonfinite": ("ignore", "'raise', 'skip'"),
    "max_consecutive_skips": (0, "[1,"),
    "linefit_snapshots": (1, "[2,"),
    "linefit_spacing": (0, "[1,"),
    "horizon_arms": ((5, 10), "including 0"),
    "bandit_alpha": (-1.0, "[0.0,"),
    "use_bandit": (1, "True or False"),
    "horizon_ladder": ("yes", "True or False"),
    "correction_fractions": ((0.5, 2.0), "[0, 1]"),
    "explode_ratio": (1.0, "(1.0,"),
    "forward_cost": (1.5, "[0.0, 1.0]"),
    "predict_step_cost": (-0.1, "[0.0, 1.0]"),
    "history_size": (8, "[16,"),
    "metrics_max_records": (-1, "[0,"),
    "seed": (-5, "[0,"),
    "read_every": (0, "[1,"),
    "idle_after": (-1, "[0,"),
    "idle_steps": (0, "[1,"),
    "readout": (("lawa", "swa"), "distinct names from lawa, ema"),
    "lawa_snapshots": (0, "[1,"),
    "readout_spacing": (0, "[1,"),
    "ema_decay": (1.0, "must be < 1"),
    "readout_check_every": (-1, "[0,"),
    "lr_recommend": ("on", "True or False"),
    "lr_search_steps": (-1, "[0,"),
    "layer_freeze": ("always", "'off', 'autofreeze'"),
    "freeze_every": (0, "[1,"),
}


def test_every_field_has_an_invalid_case():
    assert set(INVALID) == {f.name for f in dataclasses.fields(HybridConfig)}


def test_defaults_are_valid_and_frozen():
    cfg = HybridConfig()
    assert cfg.warmup_steps == 100 and cfg.confidence_threshold == 0.6
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.warmup_steps = 3  # type: ignore[misc]


def test_issue_example_names_both_fields():
    with pytest.raises(ConfigError) as info:
        HybridConfig(warmup_steps=-1, confidence_threshold=2.0)
    msg = str(info.value)
    assert "warmup_steps" in msg and "confidence_threshold" in msg
    assert len(info.value.problems) == 2
    assert isinstance(info.value, HybridError) and info.value.recovery


@pytest.mark.parametrize("field", sorted(INVALID))
def test_each_invalid_field_is_rejected_with_its_range(field):
    value, allowed = INVALID[field]
    with pytest.raises(ConfigError) as info:
        HybridConfig(**{field: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{field}=")
    assert allowed in info.value.problems[0]


def test_all_invalid_fields_reported_together():
    with pytest.raises(ConfigError) as info:
        HybridConfig(**{k: v for k, (v, _) in INVALID.items()})
    named = {p.split("=")[0] for p in info.value.problems}
    assert named == set(INVALID)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "0.5", None])
def test_non_numbers_rejected(value):
    with pytest.raises(ConfigError, match="confidence_threshold"):
        HybridConfig(confidence_threshold=value)


def test_cross_field_bounds():
    with pytest.raises(ConfigError, match="max_full_steps"):
        HybridConfig(min_full_steps=100, max_full_steps=50)
    with pytest.raises(ConfigError, match="probe_steps"):
        HybridConfig(max_predict_steps=3, probe_steps=5)


def test_replace_validates_and_rejects_unknown_fields():
    cfg = HybridConfig().replace(warmup_steps=7)
    assert cfg.warmup_steps == 7 and cfg.to_dict()["warmup_steps"] == 7
    with pytest.raises(ConfigError, match="warmup_steps"):
        cfg.replace(warmup_steps=0)
    with pytest.raises(ConfigError, match="bogus"):
        cfg.replace(bogus=1)


@given(
    warmup=st.integers(-10, 10_000),
    threshold=st.floats(allow_nan=True, allow_infinity=True),
    check=st.integers(-5, 200),
)
def test_validation_accepts_exactly_the_documented_ranges(warmup, threshold, check):
    ok = warmup >= 1 and math.isfinite(threshold) and 0.0 <= threshold <= 1.0 and check >= 0
    try:
        HybridConfig(warmup_steps=warmup, confidence_threshold=threshold, check_interval=check)
    except ConfigError as err:
        assert not ok
        bad = {p.split("=")[0] for p in err.problems}
        assert ("warmup_steps" in bad) == (warmup < 1)
        assert ("check_interval" in bad) == (check < 0)
    else:
        assert ok
