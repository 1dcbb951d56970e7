"""`hybrid-train dynamics-eval`: recorded trajectories are the trainer's, scores are well formed, the CLI runs."""

import json
import math

import numpy as np
import pytest

from hybrid_core import FEATURE_DIM, FEATURE_NAMES, ConfigError, HybridConfig, HybridTrainer, TrendDynamics
from hybrid_core.apps.bench._tasks import get_task
from hybrid_core.apps.cli import main
from hybrid_core.apps.dynamics_eval import record_trajectory, run_dynamics_eval

STEPS = 200


class _Spy:
    """A dynamics model that stores the features a default trainer feeds its dynamics model."""

    def __init__(self):
        self.features, self.losses = [], []

    def observe(self, features, outcome):
        self.features.append(np.array(features))
        self.losses.append(outcome.loss)

    def predict(self, features, horizon):
        raise AssertionError("never reached: confidence is 0")

    def confidence(self):
        return 0.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_recorded_features_are_what_a_trainer_at_the_given_rate_feeds_its_dynamics():
    steps = 120
    trajectory = record_trajectory("digits-mlp", steps, seed=2, progress=False)
    assert trajectory.features.shape == (steps, FEATURE_DIM) and trajectory.losses.shape == (steps,)
    setup = get_task("digits-mlp").setup("numpy", 2, get_task("digits-mlp").lr)
    spy = _Spy()
    trainer = HybridTrainer(setup.model, setup.optimizer, HybridConfig(lr_recommend=False), dynamics=spy)
    for i in range(steps):
        trainer.step(setup.batch(i))
    np.testing.assert_array_equal(trajectory.features, np.stack(spy.features))
    np.testing.assert_array_equal(trajectory.losses, np.array(spy.losses))
    # Row t is taken before step t: its log-loss slot holds the loss of step t - 1.
    log_loss = trajectory.features[1:, FEATURE_NAMES.index("log_loss")]
    np.testing.assert_allclose(log_loss, np.log(trajectory.losses[:-1]), rtol=1e-12)
    assert trajectory.losses[-1] < 0.7 * trajectory.losses[0]  # it really trained


def test_recording_never_predicts_even_after_a_long_full_phase():
    trajectory = record_trajectory("digits-mlp", 260, seed=0, progress=False)
    predict = trajectory.features[:, FEATURE_NAMES.index("phase_predict")]
    full = trajectory.features[:, FEATURE_NAMES.index("phase_full")]
    assert not predict.any() and full[:100].sum() == 0 and full[100:].all()


def test_run_scores_both_models_with_well_formed_figures():
    doc = run_dynamics_eval(["digits-mlp"], STEPS, seed=0, progress=False)
    json.dumps(doc, allow_nan=False)  # strict JSON: undefined scores are null, not NaN
    assert doc["schema"] == "hybrid-dynamics-eval/1" and doc["machine"]["numpy"] == np.__version__
    assert [t["steps"] for t in doc["trajectories"]] == [STEPS]
    assert [(r["task"], r["dynamics"]) for r in doc["rows"]] == [("digits-mlp", "RSSMDynamics"),
                                                                ("digits-mlp", "TrendDynamics")]
    for row in doc["rows"]:
        assert set(row) == {"task", "dynamics", "r2", "skill", "coverage", "count", "observe_ms",
                            "predict_ms_longest", "predict10_ms", "predict10_ms_min", "predictions"}
        assert set(row["r2"]) == set(row["coverage"]) == {"1", "10", "50"}
        for h in ("1", "10", "50"):
            assert row["count"][h] > 0
            assert math.isfinite(row["r2"][h]) and math.isfinite(row["skill"][h])
            assert 0.0 <= row["coverage"][h] <= 1.0
        assert row["count"]["1"] > row["count"]["50"]  # long horizons stop fitting near the end
        assert row["predictions"] == (STEPS - 100) // 5
        assert row["observe_ms"] > 0.0 and row["predict_ms_longest"] > 0.0
        assert row["predict10_ms"] >= row["predict10_ms_min"] > 0.0
    trend = doc["rows"][1]
    # The loss falls steeply over these steps: a trend that follows it explains most of the variance.
    assert trend["r2"]["1"] > 0.5


def test_scores_are_null_where_no_forecast_fits():
    doc = run_dynamics_eval(["digits-mlp"], 130, seed=0, progress=False,
                            dynamics={"TrendDynamics": lambda seed: TrendDynamics()})
    row = doc["rows"][0]
    assert row["count"]["50"] == 0 and row["r2"]["50"] is None and row["coverage"]["50"] is None
    assert row["count"]["10"] > 0 and math.isfinite(row["r2"]["10"])


def test_cli_runs_with_a_tiny_budget_and_writes_json(tmp_path, capsys):
    out = tmp_path / "dyn.json"
    code = main(["dynamics-eval", "--task", "digits-mlp", "--steps", "150", "--seed", "1", "--out", str(out),
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "RSSMDynamics" in printed and "TrendDynamics" in printed and "predict(h=10) ms" in printed
    doc = json.loads(out.read_text())
    assert doc["seed"] == 1 and doc["trajectories"][0]["steps"] == 150 and len(doc["rows"]) == 2
    assert doc["command"] == "hybrid-train dynamics-eval --task digits-mlp --seed 1 --steps 150"


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit) as info:
        main(["dynamics-eval", "--task", "imagenet"])
    assert info.value.code == 2
    assert main(["dynamics-eval", "--task", "digits-mlp", "--steps", "1", "--quiet"]) == 2
    with pytest.raises(ConfigError):
        record_trajectory("lm-imaginary", 10)

