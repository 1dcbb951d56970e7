"""The FastGRNN router pipeline: data, training through HybridTrainer, accuracy on real data, save/load."""

import json

import numpy as np
import pytest

from hybrid_core import BatchError, CheckpointError, ConfigError, HybridTrainer
from hybrid_core.apps.data import load_digits, sequential_digits
from hybrid_core.apps.router import (
    ROUTING_FEATURES,
    RouterConfig,
    ZScore,
    load_router,
    routing_logs,
    save_router,
    train_router,
)
from hybrid_core.models import FastGRNN
from hybrid_core.optim import Adam


@pytest.fixture
def one_torch_thread():
    """Torch on one intra-op thread: these tiny ops lose more to thread hand-offs than they gain."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("router")
    x, y = routing_logs(1500, seed=3)
    config = RouterConfig(hidden_size=16, u_rank=4, epochs=25, patience=2, lr=0.02, teacher_epochs=10)
    return x, y, out, train_router(x, y, config, out_dir=out)


def test_routing_logs_are_seeded_balanced_and_documented():
    x, y = routing_logs(2000, steps=10, seed=7)
    assert x.shape == (2000, 10, len(ROUTING_FEATURES)) and y.shape == (2000,) and y.dtype == np.int64
    assert set(np.unique(y)) == {0, 1} and 0.35 < y.mean() < 0.65
    x2, y2 = routing_logs(2000, steps=10, seed=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(routing_logs(2000, steps=10, seed=8)[0], x)
    premium = x[:, :, ROUTING_FEATURES.index("premium")]
    assert np.all(premium == premium[:, :1]) and set(np.unique(premium)) == {0.0, 1.0}
    load = x[:, :, ROUTING_FEATURES.index("queue_load")]
    assert load.min() >= 0 and load.max() <= 1
    with pytest.raises(ConfigError) as info:
        routing_logs(0, steps=3, seed=-1, label_noise=0.9)
    assert len(info.value.problems) == 4


def test_routing_labels_need_memory_of_earlier_requests():
    linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is not installed")
    x, y = routing_logs(4000, seed=1)
    train, test = slice(0, 3000), slice(3000, None)

    def score(features):
        model = linear.LogisticRegression(max_iter=2000).fit(features[train], y[train])
        return model.score(features[test], y[test])

    last_only = score(x[:, -1, :])
    whole_window = score(x.reshape(len(x), -1))
    assert whole_window > last_only + 0.02, (last_only, whole_window)


def test_sequential_digits_are_rows_as_time_steps():
    x, y = sequential_digits()
    pixels, digits = load_digits()
    assert x.shape == (1797, 8, 8) and y.shape == (1797,)
    np.testing.assert_array_equal(x[5, 2], pixels[5, 16:24] / 16.0)
    np.testing.assert_array_equal(y, (digits >= 5).astype(np.int64))
    assert 0.45 < y.mean() < 0.55


def test_train_router_runs_the_whole_kit(synthetic_run):
    x, y, out, result = synthetic_run
    history = result.history
    assert result.stopped_epoch is not None and result.stopped_epoch < 25  # early stopping ended it
    assert result.best_epoch == result.stopped_epoch - 2
    assert [h["epoch"] for h in history] == list(range(1, result.stopped_epoch + 1))
    assert history[1]["lr"] == pytest.approx(0.02 * 0.95)  # decayed once per epoch
    best = min(h["val_loss"] for h in history)
    assert result.val_loss == pytest.approx(best, rel=1e-12)  # the best epoch's weights are back
    assert result.val_accuracy > 0.85 and result.teacher_val_accuracy > 0.85
    phases = result.trainer["steps_per_phase"]
    assert phases["warmup"] > 0 and phases["full"] > 0
    rows = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [h["val_loss"] for h in history]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["patience"] == 2 and summary["best_epoch"] == result.best_epoch
    assert summary["config"]["hybrid"]["warmup_steps"] == 50
    train = np.setdiff1d(np.arange(len(y)), result.val_indices)
    assert len(result.val_indices) == 300
    np.testing.assert_allclose(result.router.normalizer.mean, ZScore.fit(x[train]).mean, rtol=1e-12)
    assert result.router.accuracy(x[result.val_indices], y[result.val_indices]) == result.val_accuracy


def test_distillation_changes_the_training(synthetic_run):
    x, y, _, result = synthetic_run
    config = RouterConfig(hidden_size=16, u_rank=4, epochs=2, patience=2, lr=0.02, distill_alpha=0.0)
    plain = train_router(x, y, config)
    assert plain.teacher_val_accuracy is None
    assert plain.history[0]["train_loss"] < result.history[0]["train_loss"]  # the soft term adds T²·H(q)


def test_save_load_round_trip_gives_identical_predictions(synthetic_run, tmp_path):
    x, _, out, result = synthetic_run
    loaded = load_router(out / "router.ckpt")
    for a, b in zip(loaded.model.parameters(), result.router.model.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    np.testing.assert_array_equal(loaded.normalizer.mean, result.router.normalizer.mean)
    np.testing.assert_array_equal(loaded.normalizer.std, result.router.normalizer.std)
    np.testing.assert_array_equal(loaded.logits(x), result.router.logits(x))
    assert loaded.model.settings == result.router.model.settings
    save_router(loaded, tmp_path / "again.ckpt")
    assert (tmp_path / "again.ckpt").read_bytes() == (out / "router.ckpt").read_bytes()


def test_a_router_saved_from_numpy_loads_onto_torch(synthetic_run, one_torch_thread):
    x, _, out, result = synthetic_run
    loaded = load_router(out / "router.ckpt", xp=one_torch_thread)
    assert loaded.model.dtype == one_torch_thread.float32
    np.testing.assert_allclose(loaded.logits(x), result.router.logits(x), rtol=1e-4, atol=1e-5)


def test_corrupted_truncated_or_foreign_files_raise_checkpoint_error(synthetic_run, tmp_path):
    _, _, out, _ = synthetic_run
    good = (out / "router.ckpt").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    cases = {"flipped.ckpt": bytes(flipped), "truncated.ckpt": good[:-10], "empty.ckpt": b"",
             "text.ckpt": b"not a checkpoint at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError):
            load_router(tmp_path / name)
    model = FastGRNN(2, 3)
    HybridTrainer(model, Adam(model)).save(tmp_path / "trainer.ckpt")
    with pytest.raises(CheckpointError, match="not a saved router"):
        load_router(tmp_path / "trainer.ckpt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_router(tmp_path / "missing.ckpt")


def test_bad_settings_and_data_are_rejected():
    with pytest.raises(ConfigError) as info:
        RouterConfig(hidden_size=0, lr=-1.0, val_fraction=1.0, distill_alpha=2.0, seed=-1)
    assert len(info.value.problems) == 5
    x, y = routing_logs(50, seed=0)
    with pytest.raises(BatchError, match="0, 1"):
        train_router(x, y + 1)
    with pytest.raises(BatchError, match="shape"):
        train_router(x[:, :, 0], y)
    with pytest.raises(ConfigError, match="val_fraction"):
        train_router(x[:3], y[:3], RouterConfig(val_fraction=0.1))


def _digits_run(xp=None):
    x, y = sequential_digits()
    result = train_router(x, y, xp=xp)
    assert result.router.model.settings["distill_alpha"] > 0 and result.teacher_val_accuracy > 0.95
    assert result.stopped_epoch is not None  # early stopping ended the run
    return result


def test_digits_reach_95_percent_on_numpy():
    result = _digits_run()
    assert result.val_accuracy >= 0.95, result.history


def test_digits_reach_95_percent_on_torch(one_torch_thread):
    result = _digits_run(one_torch_thread)
    assert result.val_accuracy >= 0.95, result.history
    assert result.router.model.parameters()[0].__class__ is one_torch_thread.Tensor
