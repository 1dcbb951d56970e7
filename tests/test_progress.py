"""The progress display: plain lines in a log, a tqdm bar on a terminal, the notebook detected; what `fit` shows."""

import contextlib
import io
import os
import re
import subprocess
import sys
import types

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_core import HybridConfig, HybridTrainer
from hybrid_core._progress import Progress, progress_mode
from hybrid_core.apps.data import split_digits
from hybrid_core.callbacks import ValidationLogger
from hybrid_core.models import MLP
from hybrid_core.optim import Adam

SPLIT = split_digits(seed=0)
LINE = re.compile(r"^train: +(\d+)% (\d+)/300 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+it/s, phase=(\w+), loss=[\d.e+-]+, "
                  r"lr=[\d.e+-]+, backward_skipped=(\d+)(, val=[\d.e+-]+)?\]$")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _fit(steps=300, callbacks_of=lambda trainer: [], **fit_kwargs):
    model = MLP([64, 16, 10], dtype=np.float64, seed=0)
    trainer = HybridTrainer(model, Adam(model, lr=3e-3),
                            HybridConfig(warmup_steps=50, min_full_steps=30, max_predict_steps=30, check_interval=10))

    def batch(step):
        idx = np.random.default_rng(step).choice(len(SPLIT.y_train), size=32, replace=False)
        return SPLIT.x_train[idx], SPLIT.y_train[idx]

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = trainer.fit(batch, steps, callbacks=callbacks_of(trainer), **fit_kwargs)
    return err.getvalue(), summary


def test_fit_in_a_log_prints_one_plain_line_per_tenth_with_rate_eta_loss_lr_phase_and_skips():
    text, summary = _fit(callbacks_of=lambda t: [
        ValidationLogger(lambda: float(t.model.loss((SPLIT.x_val, SPLIT.y_val))), every=100)])
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 10, text
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    assert [int(m.group(2)) for m in parsed] == list(range(30, 301, 30))
    assert [int(m.group(1)) for m in parsed] == list(range(10, 101, 10))
    assert {m.group(3) for m in parsed} >= {"warmup", "full"}
    assert int(parsed[-1].group(4)) == summary["backward_passes_skipped"] > 0
    assert parsed[0].group(5) is None and parsed[-1].group(5)  # the validation metric once there is one


def test_progress_is_on_by_default_and_off_with_false():
    assert _fit(steps=30)[0].count("\n") == 10
    assert _fit(steps=30, progress=False)[0] == ""


def test_the_command_line_shows_plain_lines_when_stderr_is_a_pipe():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "hybrid_core.apps.cli", "demo", "--steps", "40"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    train = [line for line in run.stderr.splitlines() if line.startswith("train:")]
    assert "\r" not in run.stderr and len(train) == 10
    assert train[-1].startswith("train: 100% 40/40 [") and "it/s" in train[-1] and "lr=" in train[-1]
    assert any(line.startswith("plain, same steps: 100% 40/40") for line in run.stderr.splitlines())


def test_a_terminal_gets_a_tqdm_bar_redrawn_in_place():
    stream = _Terminal()
    show = Progress(50, "train", stream, min_interval=0.0)
    assert show.mode == "bar"
    for i in range(1, 51):
        show.update(i, f"loss={i}")
    show.close()
    out = stream.getvalue()
    assert "\r" in out and out.count("\n") == 1 and "50/50" in out and "loss=50" in out and "it/s" in out


def test_a_jupyter_kernel_is_detected_as_a_notebook(monkeypatch):
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert progress_mode(io.StringIO()) == "notebook"
    assert progress_mode(_Terminal()) == "bar"
    shell.config = {}  # a terminal IPython is not a notebook
    assert progress_mode(io.StringIO()) == "lines"


def test_the_extra_text_is_made_only_when_a_line_is_drawn():
    calls = []

    def extra():
        calls.append(1)
        return "x"

    stream = io.StringIO()
    show = Progress(1000, "t", stream)
    for i in range(1, 1001):
        show.update(i, extra)
    assert len(calls) == 10 == stream.getvalue().count("\n")


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 500), stop=st.floats(0, 1), extra_close=st.booleans())
def test_lines_mode_draws_each_tenth_once_in_order_and_ends_with_the_last_count(total, stop, extra_close):
    stream = io.StringIO()
    show = Progress(total, "p", stream, log_every=float("inf"))
    done = int(stop * total)
    for i in range(1, done + 1):
        show.update(i)
    show.close("end" if extra_close else None)
    counts = [int(re.match(r"p: +\d+% (\d+)/", line).group(1)) for line in stream.getvalue().splitlines()]
    firsts = {}
    for i in range(1, done + 1):
        firsts.setdefault(10 * i // total, i)  # the first count of each tenth
    firsts.pop(0, None)
    assert counts == sorted({*firsts.values(), *([done] if done else [])})


def test_without_a_total_a_line_comes_every_log_every_seconds():
    stream = io.StringIO()
    show = Progress(None, "p", stream, log_every=0.0)
    for i in range(1, 6):
        show.update(i, "x=1")
    show.close()
    lines = stream.getvalue().splitlines()
    pattern = re.compile(r"p: (\d+) \[\d\d:\d\d, +[\d.?]+it/s, x=1\]$")
    assert [int(pattern.match(line).group(1)) for line in lines] == [1, 2, 3, 4, 5]
    quiet = io.StringIO()
    show = Progress(None, "p", quiet, log_every=3600.0)
    for i in range(1, 6):
        show.update(i)
    assert quiet.getvalue() == ""
    show.close()
    assert quiet.getvalue().startswith("p: 5 [")
