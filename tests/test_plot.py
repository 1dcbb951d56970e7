"""`hybrid-train plot`: a PNG of loss against step and wall-clock, phases shaded, the validation curve."""

import itertools
import json
import sys

import numpy as np
import pytest

from hybrid_core import ConfigError, HybridConfig, HybridTrainer
from hybrid_core.apps import cli
from hybrid_core.apps.data import split_digits
from hybrid_core.apps.plot import DPI, FIGSIZE, PHASE_COLORS, load_run, plot_run
from hybrid_core.callbacks import JSONLLogger, ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

mpimg = pytest.importorskip("matplotlib.image")

SPLIT = split_digits(seed=0)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A 300-step run's records (every phase) and its validation rows."""
    folder = tmp_path_factory.mktemp("run")
    model = MLP([64, 16, 10], dtype=np.float64, seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=3e-3),
                            HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10))

    def batch(step):
        idx = np.random.default_rng(step).choice(len(SPLIT.y_train), size=32, replace=False)
        return SPLIT.x_train[idx], SPLIT.y_train[idx]

    val = ValidationLogger(lambda: {"loss": float(model.loss((SPLIT.x_val, SPLIT.y_val)))}, every=50,
                           path=folder / "val.jsonl")
    trainer.fit(batch, 300, progress=False, callbacks=[val, JSONLLogger(folder / "run.jsonl")])
    return folder / "run.jsonl", folder / "val.jsonl"


def _shade(color):
    """The RGB of ``color`` at the shading's alpha over white, 0-1."""
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return 0.25 * rgb + 0.75


def _has_color(image, rgb, tol=3 / 255, least=50):
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).sum() >= least)


def _has_band(image, rgb, tol=3 / 255):
    """A column of the image with ``rgb`` over 100 pixels: a shaded span, not the legend's little patch."""
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).sum(axis=0).max() > 100)


def test_cli_plot_writes_a_png_of_the_run_with_phases_shaded_and_the_validation_curve(run_files, tmp_path, capsys):
    run, val = run_files
    out = tmp_path / "run.png"
    assert cli.main(["plot", str(run), "-o", str(out), "--validation", str(val)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(out)
    assert image.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI) == (400, 1100)
    for phase in ("warmup", "full", "predict", "correct"):
        assert _has_band(image, _shade(PHASE_COLORS[phase])), phase
    assert _has_color(image, np.array([0xd6, 0x28, 0x28]) / 255)  # the validation curve


def test_plot_run_reports_what_it_drew(run_files, tmp_path):
    run, val = run_files
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    drawn = plot_run(run, tmp_path / "a.png", validation=val)
    changes = sum(1 for a, b in itertools.pairwise(rows) if a["phase"] != b["phase"])
    assert drawn == {"steps": 300, "losses": sum(r["loss"] is not None for r in rows), "spans": changes + 1,
                     "phases": ["warmup", "full", "predict", "correct"], "validation_points": 6}
    loaded = load_run(run)
    assert loaded.steps[0] == 1 and loaded.steps[-1] == 300
    np.testing.assert_allclose(loaded.seconds[-1], sum(r["wall_seconds"] for r in rows))


def test_without_predicted_steps_there_is_no_predict_shading(run_files, tmp_path):
    run, _ = run_files
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps({**r, "phase": "full"}) + "\n" for r in rows))
    plot_run(full, tmp_path / "full.png")
    image = mpimg.imread(tmp_path / "full.png")
    assert _has_band(image, _shade(PHASE_COLORS["full"]))
    assert not _has_color(image, _shade(PHASE_COLORS["predict"]), least=5)  # not even in the legend


def test_bad_input_is_a_one_line_usage_error(run_files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "phase": "full", "loss": 1.0}\n{"step": 1,\n')
    assert cli.main(["plot", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2: not JSON" in err and "hint:" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ConfigError, match="not a step record"):
        plot_run(run_files[1], tmp_path / "y.png")  # validation rows are not step records
    with pytest.raises(ConfigError, match="'accuracy'"):
        plot_run(run_files[0], tmp_path / "y.png", validation=run_files[1], metric="accuracy")


def test_missing_matplotlib_is_a_one_line_failure_with_the_install_hint(run_files, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(run_files[0]), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs matplotlib" in err and "hybrid-predict-trainer[plot]" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--plot", str(tmp_path / "x.png"), "--steps", "0"])  # usage is checked first
    assert cli.main(["bench", "--plot", str(tmp_path / "x.png"), "--quiet"]) == 1  # then matplotlib, before work
    out, err = capsys.readouterr()
    assert "needs matplotlib" in err and "digits-mlp" not in out
