"""Save and load failures are `CheckpointError`s; a resume with other settings is refused, never applied."""

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
from _run_writer import CONFIG, batch, make_trainer

import hybrid_core._codec as codec
from hybrid_core import CheckpointError, CheckpointPolicy, ConfigError, HybridTrainer
from hybrid_core._codec import read_file
from hybrid_core.optim import Adam


def checkpoint_path(folder, step, run):
    return Path(folder) / f"step-{step:09d}-{run}.ckpt"


def _snapshot(trainer):
    opt = trainer.optimizer.state_dict()
    return ([np.array(p, copy=True) for p in trainer.model.parameters()], trainer.steps_done,
            getattr(trainer, "run_id", None),
            opt["step"], [np.array(a, copy=True) for a in (opt["exp_avg"] or []) + (opt["exp_avg_sq"] or [])],
            trainer.optimizer.lr)


def _same(a, b):
    arrays = all(np.array_equal(x, y) for x, y in zip(a[0] + a[4], b[0] + b[4]))
    return arrays and len(a[0]) == len(b[0]) and a[1:4] == b[1:4] and a[5] == b[5]


def _temps(folder):
    return sorted(p.name for p in Path(folder).glob(".tmp-*"))


class _FullDisk:
    """A file object whose writes fail with ENOSPC after ``room`` bytes (part of the data is written first)."""

    def __init__(self, file, room):
        self._file, self._room = file, room

    def write(self, data):
        if len(data) > self._room:
            self._file.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _fill_disk_after(monkeypatch, saves_that_succeed=0, room=1000):
    """From the ``saves_that_succeed + 1``-th checkpoint written on, the disk is full."""
    real = os.fdopen
    count = {"writes": 0}

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return file
        count["writes"] += 1
        return file if count["writes"] <= saves_that_succeed else _FullDisk(file, room)

    monkeypatch.setattr(codec.os, "fdopen", fdopen)


def _deny_temp_files(monkeypatch, folder):
    if os.geteuid() != 0:  # a real read-only directory
        os.chmod(folder, 0o500)
        return lambda: os.chmod(folder, 0o700)

    def mkstemp(*args, **kwargs):  # root ignores permission bits: the error the kernel would give
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    monkeypatch.setattr(codec.tempfile, "mkstemp", mkstemp)
    return monkeypatch.undo


@pytest.mark.parametrize("failure", ["permission", "a directory at the path", "disk full"])
def test_a_failed_save_is_a_checkpoint_error_naming_the_path_and_changes_nothing(tmp_path, monkeypatch, failure):
    trainer, _ = make_trainer(5)
    trainer.fit(batch, 10, progress=False)
    target = tmp_path / "run.ckpt"
    trainer.save(target)
    previous = target.read_bytes()
    trainer.fit(batch, 5, progress=False)
    before = _snapshot(trainer)
    expected = {"permission": PermissionError, "a directory at the path": IsADirectoryError, "disk full": OSError}
    undo = lambda: None  # noqa: E731
    if failure == "permission":
        undo = _deny_temp_files(monkeypatch, tmp_path)
    elif failure == "a directory at the path":
        target = tmp_path / "taken.ckpt"
        target.mkdir()
        (target / "inside").write_text("kept")
    else:
        _fill_disk_after(monkeypatch)
    try:
        with pytest.raises(CheckpointError) as info:
            trainer.save(target)
    finally:
        undo()
    monkeypatch.undo()
    assert str(target) in info.value.message and info.value.recovery
    assert isinstance(info.value.__cause__, expected[failure])
    if failure == "disk full":
        assert info.value.__cause__.errno == errno.ENOSPC
    if failure == "a directory at the path":
        assert (target / "inside").read_text() == "kept"
    else:
        assert target.read_bytes() == previous  # the previous checkpoint is intact
    assert _temps(tmp_path) == []
    assert _same(before, _snapshot(trainer))  # the trainer too: it can save elsewhere and go on
    trainer.save(tmp_path / "later.ckpt")
    model = make_trainer(5, seed=2)[1]
    assert HybridTrainer.load(tmp_path / "later.ckpt", model, Adam(model, lr=0.01)).steps_done == 15


def test_a_failed_automatic_checkpoint_ends_fit_cleanly_and_the_run_goes_on_exactly(tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    policy = CheckpointPolicy(folder, every=10, keep=3)
    trainer, model = make_trainer(5)
    trainer.run_id = "r"
    _fill_disk_after(monkeypatch, saves_that_succeed=2)
    with pytest.raises(CheckpointError, match=r"step-000000030-r\.ckpt") as info:
        trainer.fit(batch, 50, progress=False, checkpoint=policy)
    monkeypatch.undo()
    assert info.value.__cause__.errno == errno.ENOSPC
    assert trainer.steps_done == 30  # stopped at the failed save, nothing half-done
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000010-r.ckpt", "step-000000020-r.ckpt"]
    assert [read_file(checkpoint_path(folder, s, "r"))["run"]["id"] for s in (10, 20)] == ["r", "r"]
    trainer.fit(batch, 20, progress=False, checkpoint=policy)  # space again: the run continues from step 30
    straight, straight_model = make_trainer(5)
    straight.fit(batch, 50, progress=False, checkpoint=CheckpointPolicy(tmp_path / "straight", every=10, keep=3))
    assert trainer.steps_done == 50
    assert all(np.array_equal(a, b) for a, b in zip(model.parameters(), straight_model.parameters()))
    assert sorted(p.name for p in folder.iterdir()) == [f"step-0000000{s}-r.ckpt" for s in (20, 40, 50)]  # no 30


def test_a_checkpoint_directory_that_cannot_be_used_is_a_checkpoint_error(tmp_path):
    taken = tmp_path / "ckpts"
    taken.write_text("a file, not a directory")
    for resume in (True, False):
        trainer, _ = make_trainer(5)
        before = _snapshot(trainer)
        with pytest.raises(CheckpointError, match=re.escape(str(taken))):
            trainer.fit(batch, 20, progress=False, checkpoint=CheckpointPolicy(taken, every=10, resume=resume))
        assert taken.read_text() == "a file, not a directory"
        assert _same(before, _snapshot(trainer))  # refused before the first step


def test_a_checkpoint_directory_that_cannot_be_created_is_a_checkpoint_error(tmp_path, monkeypatch):
    def makedirs(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(args[0]))

    monkeypatch.setattr(os, "makedirs", makedirs)
    trainer, _ = make_trainer(5)
    with pytest.raises(CheckpointError, match="cannot create the checkpoint directory") as info:
        trainer.fit(batch, 20, progress=False, checkpoint=CheckpointPolicy(tmp_path / "new", every=10))
    assert str(tmp_path / "new") in info.value.message and isinstance(info.value.__cause__, PermissionError)
    assert trainer.steps_done == 10  # the steps before the first save were taken; nothing else happened


def test_an_os_error_while_reading_is_a_checkpoint_error_and_changes_nothing(tmp_path, monkeypatch):
    """(A regression guard: reads already turned `OSError` into `CheckpointError` before run ids.)"""
    trainer, _ = make_trainer(5)
    trainer.fit(batch, 10, progress=False)
    trainer.save(tmp_path / "t.ckpt")
    trainer.fit(batch, 5, progress=False)
    before = _snapshot(trainer)
    real = os.fdopen

    class Failing:
        def __init__(self, file):
            self._file = file

        def read(self, n=-1):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(codec.os, "fdopen", lambda fd, mode="r", *a, **k: Failing(real(fd, mode, *a, **k)))
    with pytest.raises(CheckpointError, match=r"t\.ckpt: cannot read") as info:
        trainer.restore(tmp_path / "t.ckpt")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    assert _same(before, _snapshot(trainer))


# -- the caller's settings on resume ----------------------------------------------------------------


def _model_opt(seed, lr=0.01):
    model = make_trainer(5, seed=seed)[1]
    return model, Adam(model, lr=lr)


def _saved(tmp_path):
    trainer, _ = make_trainer(5)
    trainer.fit(batch, 20, progress=False)
    trainer.save(tmp_path / "t.ckpt")
    return trainer, tmp_path / "t.ckpt"


def test_load_takes_a_config_and_refuses_one_that_differs_before_touching_anything(tmp_path):
    _, path = _saved(tmp_path)
    model, opt = _model_opt(3)
    probe = HybridTrainer(model, opt, CONFIG)
    before = _snapshot(probe)
    other = CONFIG.replace(warmup_steps=7, bandit_alpha=CONFIG.bandit_alpha * 2)
    with pytest.raises(ConfigError) as info:
        HybridTrainer.load(path, model, opt, config=other)
    text = str(info.value)
    assert "warmup_steps: the checkpoint has 5, this run 7" in text and "bandit_alpha" in text
    assert len(info.value.problems) == 2 and str(path) in info.value.recovery
    assert _same(before, _snapshot(probe))  # model and optimizer untouched
    with pytest.raises(ConfigError, match="config must be a HybridConfig"):
        HybridTrainer.load(path, model, opt, config=CONFIG.to_dict())
    loaded = HybridTrainer.load(path, model, opt, config=CONFIG)  # equal: accepted, the caller's object kept
    assert loaded.config is CONFIG and loaded.steps_done == 20
    assert HybridTrainer.load(path, *_model_opt(4)).config == CONFIG  # None: the saved config


def test_a_different_learning_rate_on_load_is_an_error_and_the_explicit_way_works(tmp_path):
    saved, path = _saved(tmp_path)
    model, opt = _model_opt(3, lr=0.02)
    before = [np.array(p, copy=True) for p in model.parameters()]
    message = r"learning rate: the checkpoint's run started with 0\.01, this one with 0\.02"
    with pytest.raises(ConfigError, match=message):
        HybridTrainer.load(path, model, opt)
    assert opt.lr == 0.02 and opt.state_dict()["step"] == 0  # not replaced by the saved rate
    assert all(np.array_equal(a, b) for a, b in zip(before, model.parameters()))
    model, opt = _model_opt(3)  # the run's starting rate, then the new one set explicitly
    loaded = HybridTrainer.load(path, model, opt)
    assert opt.lr == saved.optimizer.lr  # the rate in force at the save (the recommendation may have moved it)
    opt.lr = 0.02
    assert loaded.optimizer.lr == 0.02 and loaded.run_lr == 0.01


def test_fit_resume_with_other_settings_is_refused_and_replaces_nothing(tmp_path):
    policy = CheckpointPolicy(tmp_path, every=10, keep=2)
    first, _ = make_trainer(5)
    first.run_id = "r"
    first.fit(batch, 20, progress=False, checkpoint=policy)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    alpha = CONFIG.bandit_alpha * 2
    for config, lr, problem in ((CONFIG.replace(bandit_alpha=alpha), 0.01, "bandit_alpha"),
                                (CONFIG, 0.005, "learning rate")):
        model, opt = _model_opt(3, lr=lr)
        trainer = HybridTrainer(model, opt, config)
        trainer.run_id = "r"  # this process continues run r
        before = _snapshot(trainer)
        with pytest.raises(ConfigError, match=problem):
            trainer.fit(batch, 10, progress=False, checkpoint=policy)
        assert _same(before, _snapshot(trainer)) and trainer.bandit.alpha == config.bandit_alpha
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    model, opt = _model_opt(3)
    same = HybridTrainer(model, opt, CONFIG)
    same.run_id = "r"
    same.fit(batch, 10, progress=False, checkpoint=policy)  # the same settings: resumes and goes on
    assert same.steps_done == 30 and same.run_id == "r"


def test_an_old_checkpoint_that_cannot_be_removed_is_a_checkpoint_error(tmp_path, monkeypatch):
    trainer, _ = make_trainer(5)
    trainer.run_id = "r"
    policy = CheckpointPolicy(tmp_path, every=10, keep=1)
    trainer.fit(batch, 10, progress=False, checkpoint=policy)

    def unlink(self, missing_ok=False):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(CheckpointError, match="cannot remove an old checkpoint of run r") as info:
        trainer.fit(batch, 10, progress=False, checkpoint=policy)
    monkeypatch.undo()
    assert str(checkpoint_path(tmp_path, 10, "r")) in info.value.message
    assert trainer.steps_done == 20 and read_file(checkpoint_path(tmp_path, 20, "r"))["run"]["id"] == "r"


def test_the_starting_rate_is_compared_only_when_it_is_a_readable_number():
    from hybrid_core._runinfo import require_same_start, start_lr

    class Scheduled:
        lr_on_device = True

        @property
        def lr(self):
            raise AssertionError("a device read")

    class Broken:
        @property
        def lr(self):
            raise ConfigError("this transformation's learning rate is fixed inside it")

    class Plain:
        lr = 0.5

    assert start_lr(Scheduled()) is None and start_lr(Broken()) is None and start_lr(Plain()) == 0.5
    plain_nan = Plain()
    plain_nan.lr = float("nan")
    assert start_lr(plain_nan) is None
    require_same_start("x.ckpt", CONFIG, CONFIG, None, 0.5)  # unknown on one side: not compared
    require_same_start("x.ckpt", CONFIG, CONFIG, 0.5, None)
    with pytest.raises(ConfigError, match="learning rate"):
        require_same_start("x.ckpt", CONFIG, CONFIG, 0.5, 0.25)
