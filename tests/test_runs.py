"""Checkpoint directories belong to runs: run ids, pruning, non-regular files, policy validation."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from _run_writer import batch, make_trainer
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import CheckpointError, CheckpointPolicy, ConfigError, HybridTrainer
from hybrid_core._codec import read_file
from hybrid_core._persist import write_checkpoint
from hybrid_core.optim import Adam

HERE = Path(__file__).parent


def checkpoint_path(folder, step, run):
    return Path(folder) / f"step-{step:09d}-{run}.ckpt"


def _fit(trainer, steps, policy):
    return trainer.fit(batch, steps, progress=False, checkpoint=policy)


def _names(folder):
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(".tmp-"))


def _params(model):
    return [p.copy() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _model_opt(seed):
    model = make_trainer(5, seed=seed)[1]
    return model, Adam(model, lr=0.01)  # the runs' starting rate


def _write_pre_run_id_checkpoint(trainer, path):
    """A checkpoint as written before runs had ids: no run record."""
    trainer.flush()
    write_checkpoint(path, trainer.config.to_dict(), trainer.parts(),
                     {"dynamics_type": type(trainer.dynamics).__name__})


# -- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    ({"keep": 0}, "keep"), ({"every": 0}, "every"), ({"keep": -1}, "keep"), ({"every": -5}, "every"),
    ({"every": 2.5}, "every"), ({"keep": "3"}, "keep"), ({"every": True}, "every"), ({"keep": None}, "keep"),
    ({"resume": "yes"}, "resume"), ({"run_id": ""}, "run_id"), ({"run_id": "a/b"}, "run_id"),
    ({"run_id": "x" * 65}, "run_id"), ({"run_id": 7}, "run_id"), ({"run_id": "abc\n"}, "run_id"),
    ({"run_id": "é"}, "run_id"), ({"directory": ""}, "directory"),
    ({"directory": None}, "directory"), ({"directory": b"ckpts"}, "directory"),
])
def test_the_policy_refuses_nonsense_when_it_is_built(changes, field, tmp_path):
    args = {"directory": tmp_path, **changes}
    with pytest.raises(ConfigError, match=field) as info:
        CheckpointPolicy(**args)
    assert info.value.recovery and len(info.value.problems) == 1
    assert list(tmp_path.iterdir()) == []


@given(every=st.one_of(st.integers(-3, 5), st.booleans(), st.floats(-2, 5), st.none(), st.text(max_size=2)),
       keep=st.one_of(st.integers(-3, 5), st.booleans(), st.floats(-2, 5), st.none()))
def test_the_policy_accepts_exactly_the_integers_from_one(every, keep):
    def valid(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if valid(every) and valid(keep):
        policy = CheckpointPolicy("ckpts", every=every, keep=keep)
        assert (policy.every, policy.keep) == (every, keep)
    else:
        with pytest.raises(ConfigError):
            CheckpointPolicy("ckpts", every=every, keep=keep)


def test_every_bad_field_is_listed_in_one_error():
    with pytest.raises(ConfigError) as info:
        CheckpointPolicy("", every=0, keep=-1, resume=None, run_id="x y")
    assert [p.split("=")[0] for p in info.value.problems] == ["directory", "every", "keep", "resume", "run_id"]


def test_numpy_integers_are_accepted_as_plain_ints():
    policy = CheckpointPolicy("ckpts", every=np.int64(5), keep=np.int32(2), run_id="exp_1-b")
    assert (policy.every, policy.keep) == (5, 2) and type(policy.every) is int


# -- run identity ----------------------------------------------------------------------------------


def test_a_run_id_is_made_per_trainer_written_into_checkpoints_and_kept_by_load(tmp_path):
    first, _ = make_trainer(5)
    second, _ = make_trainer(5)
    assert first.run_id != second.run_id and len(first.run_id) == 12
    _fit(first, 10, CheckpointPolicy(tmp_path, every=5, keep=5))
    assert _names(tmp_path) == [f"step-000000005-{first.run_id}.ckpt", f"step-000000010-{first.run_id}.ckpt"]
    loaded = HybridTrainer.load(checkpoint_path(tmp_path, 10, first.run_id), *_model_opt(3))
    assert loaded.run_id == first.run_id  # kept across save/load
    loaded.save(tmp_path / "again.ckpt")
    assert HybridTrainer.load(tmp_path / "again.ckpt", *_model_opt(4)).run_id == first.run_id
    with pytest.raises(ConfigError, match="run_id"):
        loaded.run_id = "no spaces"
    assert loaded.run_id == first.run_id


def test_a_new_run_beside_another_runs_later_files_keeps_its_own_and_leaves_theirs(tmp_path):
    old, _ = make_trainer(5)
    _fit(old, 60, None)
    old.run_id = "other"
    old.save(checkpoint_path(tmp_path, 500, "other"))  # another run, far ahead
    _write_pre_run_id_checkpoint(old, tmp_path / "step-000000900.ckpt")  # written before run ids
    theirs = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    straight, straight_model = make_trainer(5)
    straight.fit(batch, 30, progress=False)
    new, model = make_trainer(5)
    new.run_id = "new"
    _fit(new, 30, CheckpointPolicy(tmp_path, every=10, keep=2, resume=False))  # must not prune its own files
    assert _names(tmp_path) == sorted(["step-000000020-new.ckpt", "step-000000030-new.ckpt", *theirs])
    newer, newer_model = make_trainer(5)
    with pytest.warns(UserWarning, match=r"other runs \(\(no run id\), new, other\)"):
        _fit(newer, 30, CheckpointPolicy(tmp_path, every=10, keep=2))  # resume=True: still none of theirs
    assert newer.steps_done == 30 and len(_names(tmp_path)) == 6
    assert all((tmp_path / name).read_bytes() == data for name, data in theirs.items())
    assert _same(_params(model), _params(straight_model)) and _same(_params(newer_model), _params(straight_model))


def test_two_runs_writing_one_directory_never_resume_each_other(tmp_path, capsys):
    policy = CheckpointPolicy(tmp_path, every=5, keep=2)
    a, model_a = make_trainer(5, seed=1)
    b, model_b = make_trainer(5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "other runs' files here": expected
        for _ in range(4):  # interleaved: each call would resume the other's newer files if it could
            _fit(a, 10, policy)
            _fit(b, 15, policy)
    assert (a.steps_done, b.steps_done) == (40, 60)
    assert "skipping" not in capsys.readouterr().err  # the other run's files were not even read
    assert _names(tmp_path) == sorted([f"step-000000035-{a.run_id}.ckpt", f"step-000000040-{a.run_id}.ckpt",
                                       f"step-000000055-{b.run_id}.ckpt", f"step-000000060-{b.run_id}.ckpt"])
    straight, straight_model = make_trainer(5, seed=1)
    straight.fit(batch, 40, progress=False)
    assert _same(_params(model_a), _params(straight_model))  # run a never took b's state
    for run, model, steps in ((a.run_id, model_a, 40), (b.run_id, model_b, 60)):  # a new process names the run
        fresh, fresh_model = make_trainer(5, seed=9)
        _fit(fresh, 0, CheckpointPolicy(tmp_path, every=5, keep=2, run_id=run))
        assert fresh.run_id == run and fresh.steps_done == steps and _same(_params(fresh_model), _params(model))


def test_a_file_whose_content_belongs_to_another_run_is_skipped(tmp_path, capsys):
    a, _ = make_trainer(5)
    _fit(a, 10, CheckpointPolicy(tmp_path, every=5, keep=3, run_id="alpha"))
    b, _ = make_trainer(5)
    _fit(b, 20, None)
    b.run_id = "beta"
    b.save(checkpoint_path(tmp_path, 20, "beta"))
    checkpoint_path(tmp_path, 20, "beta").rename(checkpoint_path(tmp_path, 20, "alpha"))  # renamed by hand
    fresh, _ = make_trainer(5)
    _fit(fresh, 0, CheckpointPolicy(tmp_path, every=5, keep=3, run_id="alpha"))
    assert fresh.steps_done == 10  # not b's state at 20
    assert "written by run beta, not by run alpha" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not by run gamma"):
        fresh.restore(checkpoint_path(tmp_path, 10, "alpha"), run_id="gamma")


def test_a_checkpoint_without_a_run_id_loads_explicitly_and_is_never_resumed_or_pruned(tmp_path):
    old, old_model = make_trainer(5)
    _fit(old, 20, None)
    path = tmp_path / "step-000000020.ckpt"
    _write_pre_run_id_checkpoint(old, path)
    data = path.read_bytes()
    new, _ = make_trainer(5)
    with pytest.warns(UserWarning, match="no run id"):
        _fit(new, 10, CheckpointPolicy(tmp_path, every=5, keep=1, run_id="fresh"))
    assert new.steps_done == 10 and path.read_bytes() == data
    model = make_trainer(5, seed=7)[1]
    opt = Adam(model, lr=0.05)  # the starting rate of an unknown run cannot be compared
    loaded = HybridTrainer.load(path, model, opt)  # explicit: loads
    assert loaded.steps_done == 20 and _same(_params(model), _params(old_model))
    assert opt.lr == old.optimizer.lr  # the rate stored in the optimizer's state, as before run records
    assert loaded.run_id != old.run_id and len(loaded.run_id) == 12  # an unknown run continues under a new id
    with pytest.raises(ConfigError, match="warmup_steps"):  # its config is checked as any file's
        HybridTrainer.load(path, *_model_opt(8), config=old.config.replace(warmup_steps=6))


def test_resume_catches_up_and_never_rolls_a_trainer_back(tmp_path):
    policy = CheckpointPolicy(tmp_path, every=10, keep=3)
    trainer, model = make_trainer(5)
    _fit(trainer, 25, policy)  # files at 10 and 20; the trainer is at 25
    at_25 = _params(model)
    _fit(trainer, 0, policy)  # its own files are behind it: nothing to restore
    assert trainer.steps_done == 25 and _same(_params(model), at_25)


def test_resume_false_refuses_to_overwrite_a_run_that_is_ahead(tmp_path):
    first, _ = make_trainer(5)
    _fit(first, 20, CheckpointPolicy(tmp_path, every=10, keep=2, run_id="exp"))
    files = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    again, model = make_trainer(5)
    before = _params(model)
    with pytest.raises(ConfigError, match="resume=False, but run exp already has checkpoints"):
        _fit(again, 20, CheckpointPolicy(tmp_path, every=10, keep=2, resume=False, run_id="exp"))
    assert again.steps_done == 0 and _same(_params(model), before)
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == files


def test_files_of_the_run_beyond_a_damaged_newest_are_superseded_when_it_writes(tmp_path, capsys):
    first, _ = make_trainer(5)
    _fit(first, 30, CheckpointPolicy(tmp_path, every=10, keep=3, run_id="r"))  # 10, 20, 30
    for step in (20, 30):  # damage the two newest: resume falls back to 10
        p = checkpoint_path(tmp_path, step, "r")
        p.write_bytes(p.read_bytes()[:-5])
    resumed, model = make_trainer(5, seed=3)
    _fit(resumed, 10, CheckpointPolicy(tmp_path, every=10, keep=1, run_id="r"))
    assert "skipping checkpoint" in capsys.readouterr().err
    # it wrote 20 with keep=1: the damaged 30 of the timeline it left must not outrank (and prune) it
    assert _names(tmp_path) == ["step-000000020-r.ckpt"]
    again = HybridTrainer.load(checkpoint_path(tmp_path, 20, "r"), *_model_opt(4))
    assert again.steps_done == 20 and _same(_params(again.model), _params(model))


# -- files that are not regular files ---------------------------------------------------------------


def _in_thread(fn, timeout=30.0):
    """Run ``fn`` in a thread; (finished, result or exception)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), out


def _release(fifo):
    """Unblock a reader stuck on ``fifo`` (opening the write end lets its open return)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_directory_named_like_a_checkpoint_is_refused_or_skipped_never_read(tmp_path):
    fifo, folder = tmp_path / "step-000000095.ckpt", tmp_path / "step-000000080.ckpt"
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "step-000000099.ckpt").symlink_to(fifo)  # a symlink counts as what it points to
    (tmp_path / "step-000000098.ckpt").symlink_to(tmp_path / "gone")  # a dangling one: skipped too
    try:
        for path in (fifo, folder):  # loading one by name: refused, not blocked
            finished, out = _in_thread(lambda p=path: HybridTrainer.load(p, *_model_opt(0)))
            assert finished, "load blocked on a FIFO"
            assert isinstance(out.get("error"), CheckpointError), out
            assert "not a regular file" in out["error"].message and str(path) in out["error"].message
        trainer, _ = make_trainer(5)
        with pytest.warns(UserWarning, match="not a regular file|cannot stat it") as caught:  # in a directory: skipped
            finished, out = _in_thread(lambda: _fit(trainer, 10, CheckpointPolicy(tmp_path, every=5, keep=1)))
        assert finished, "resume blocked on a FIFO"
        assert "error" not in out, out.get("error")
    finally:
        _release(fifo)
    text = " ".join(str(w.message) for w in caught)
    assert "(a FIFO)" in text and "(a directory)" in text
    assert "step-000000099.ckpt" in text  # the symlink to the FIFO, skipped as well
    assert "step-000000098.ckpt: cannot stat it" in text
    assert trainer.steps_done == 10 and fifo.is_fifo() and folder.is_dir()  # trained; neither was removed


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_as_the_runs_newest_checkpoint_is_skipped_and_an_older_file_resumed(tmp_path):
    trainer, model = make_trainer(5)
    policy = CheckpointPolicy(tmp_path, every=10, keep=2, run_id="r")
    _fit(trainer, 10, policy)
    saved = _params(model)
    fifo = checkpoint_path(tmp_path, 90, "r")
    os.mkfifo(fifo)
    checkpoint_path(tmp_path, 80, "r").mkdir()
    fresh, fresh_model = make_trainer(5, seed=3)
    try:
        with pytest.warns(UserWarning, match="not a regular file"):
            finished, out = _in_thread(lambda: _fit(fresh, 0, policy))
    finally:
        _release(fifo)
    assert finished and "error" not in out, out
    assert fresh.steps_done == 10 and _same(_params(fresh_model), saved)  # the regular file at 10
    with pytest.warns(UserWarning, match="not a regular file"):  # said again at each listing
        _fit(fresh, 10, policy)  # writes 20 with keep=2: the FIFO and the directory are not the run's files
    assert fifo.is_fifo() and checkpoint_path(tmp_path, 80, "r").is_dir()


# -- pruning, as a property --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 30)), min_size=1, max_size=25),
       keep=st.integers(1, 4), legacy=st.lists(st.integers(1, 40), max_size=3))
def test_pruning_touches_only_the_writing_runs_files(writes, keep, legacy):
    from hybrid_core._rundir import prune_run, scan_directory

    with tempfile.TemporaryDirectory() as folder:
        for step in legacy:
            (Path(folder) / f"step-{step:09d}.ckpt").write_bytes(b"old")
        for run, step in writes:
            before = {p.name for p in Path(folder).iterdir()}
            checkpoint_path(folder, step, run).write_bytes(run.encode())
            removed = prune_run(folder, run, step, keep)
            after = {p.name for p in Path(folder).iterdir()}
            mine_after = sorted(f.step for f in scan_directory(folder) if f.run_id == run)
            assert checkpoint_path(folder, step, run).name in after  # the file just written stays
            assert mine_after[-1] == step and len(mine_after) <= keep  # nothing of the run beyond it
            assert all(p.name.endswith(f"-{run}.ckpt") for p in removed)
            others_before = {n for n in before if not n.endswith(f"-{run}.ckpt")}
            assert others_before <= after  # other runs' and id-less files untouched
            mine_before = sorted(int(n[5:14]) for n in before if n.endswith(f"-{run}.ckpt"))
            expected = sorted({s for s in mine_before if s < step} | {step})[-keep:]
            assert mine_after == expected



# -- SIGKILL during a save while another run writes the same directory ------------------------------


def _spawn(folder, run_id, every, keep, hidden):
    return subprocess.Popen([sys.executable, str(HERE / "_run_writer.py"), str(folder), run_id, str(every), str(keep),
                             str(hidden), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)


def _ready(proc, timeout=60.0):
    """The step count the child printed with ``ready`` (it resumed, then trained and saved once)."""
    finished, out = _in_thread(proc.stdout.readline, timeout)
    assert finished, "the child did not start in time"
    line = out.get("value", "")
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return int(line.split()[1])


def _own(folder, run):
    from hybrid_core._rundir import scan_directory

    return [f for f in scan_directory(folder) if f.run_id == run]


def _resume_in_parent(folder, run, hidden):
    trainer, _ = make_trainer(hidden, seed=11)
    _fit(trainer, 0, CheckpointPolicy(folder, every=1, keep=2, run_id=run))
    return trainer.steps_done


@pytest.mark.slow
def test_sigkill_during_a_save_while_another_run_writes_the_same_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    big = 30_000  # the victim's saves take long enough (several MB) to be caught in the middle
    procs = []
    try:
        other = _spawn(shared, "other", every=3, keep=2, hidden=5)
        procs.append(other)
        _ready(other)
        first_other = _own(shared, "other")[0].step
        small = max(f.path.stat().st_size for f in _own(shared, "other"))
        caught_mid_write, previous_newest = 0, None
        for _attempt in range(8):
            victim = _spawn(shared, "victim", every=1, keep=2, hidden=big)
            procs.append(victim)
            started = _ready(victim)
            if previous_newest is not None:
                assert started == previous_newest + 1  # resumed from the newest complete file, in a new process
            temps_before = set(shared.glob(".tmp-*"))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait for a victim's temporary file: a save in progress
                if any(_size(p) > 10 * small for p in set(shared.glob(".tmp-*")) - temps_before):
                    break
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            caught_mid_write += bool(set(shared.glob(".tmp-*")) - temps_before)  # killed before its rename
            for f in shared.glob("step-*.ckpt"):  # every file named like a checkpoint is complete
                _complete(f)
            victims = _own(shared, "victim")
            assert victims and len(victims) <= 3 and _own(shared, "other")  # keep=2 (+1 if killed before pruning)
            previous_newest = victims[0].step
            assert _resume_in_parent(shared, "victim", big) == previous_newest
            if caught_mid_write >= 2:
                break
        assert caught_mid_write >= 1, "no kill landed inside a save"
        os.kill(other.pid, signal.SIGKILL)
        other.wait(timeout=30)
        others = _own(shared, "other")
        assert 1 <= len(others) <= 3 and others[0].step > first_other  # it kept writing all along
        for f in others:
            read_file(f.path)
        assert _resume_in_parent(shared, "other", 5) == others[0].step
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()


def _complete(path):
    """Read ``path`` whole (checksum verified); a file of the still running run may be pruned meanwhile."""
    try:
        assert isinstance(read_file(path), dict)
    except CheckpointError as err:
        if path.exists() or "-other." not in path.name or not isinstance(err.__cause__, FileNotFoundError):
            raise


def _size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0
