"""`hybrid-train`: every argument checked before any work, one-line errors, exit codes, help and version."""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from hybrid_core import BackendError, HybridError
from hybrid_core._version import __version__
from hybrid_core.apps import cli
from hybrid_core.apps._cliargs import BENCH_TASKS, DEMO_BACKENDS, DYNAMICS_TASKS, KERNEL_BACKENDS, build_parser

SCRIPT = pathlib.Path(sys.executable).with_name("hybrid-train")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hybrid_core.apps.cli"]


def _fails(capsys, argv, code=2):
    """Run `main` expecting exit ``code``; the one stderr line, and that nothing went to stdout."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def test_an_unwritable_output_fails_in_under_a_second_before_training_with_one_line():
    start = time.perf_counter()
    run = subprocess.run([*COMMAND, "demo", "--json", "/nonexistent/x.json"], capture_output=True, text=True,
                         timeout=60)
    seconds = time.perf_counter() - start
    assert run.returncode == 2
    assert seconds < 1.0, seconds
    assert run.stdout == ""  # not even the header: nothing started
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("hybrid-train demo: error: argument --json: cannot write /nonexistent/x.json: "
                                 "the directory /nonexistent does not exist; create it first")


def test_a_bad_number_names_the_argument_and_the_rule(capsys):
    err = _fails(capsys, ["demo", "--steps", "abc"])
    assert "argument --steps: 'abc' is not a whole number >= 1" in err and "_positive_int" not in err
    assert "'0' is not a whole number >= 1" in _fails(capsys, ["demo", "--steps", "0"])
    assert "'-1' is not a whole number >= 0" in _fails(capsys, ["demo", "--seed", "-1"])
    for lr in ("-1", "0", "nan", "inf", "x"):
        assert f"argument --lr: '{lr}' is not a finite number > 0" in _fails(capsys, ["demo", "--lr", lr])
    assert "'1x' is not a parameter count" in _fails(capsys, ["bench-kernels", "--sizes", "1x"])


@pytest.mark.parametrize("argv", [
    ["demo", "--json", "{}"], ["demo", "--jsonl", "{}"], ["bench", "--out", "{}"], ["bench", "--plot", "{}"],
    ["bench-kernels", "--json", "{}"], ["dynamics-eval", "--out", "{}"], ["plot", "RUN", "-o", "{}"],
])
def test_every_output_path_is_checked_while_parsing(argv, tmp_path, capsys):
    run = tmp_path / "run.jsonl"
    run.write_text("")
    fill = lambda target: [str(run) if a == "RUN" else a.replace("{}", str(target)) for a in argv]  # noqa: E731
    assert "does not exist; create it first" in _fails(capsys, fill(tmp_path / "missing" / "x"))
    assert "it is a directory" in _fails(capsys, fill(tmp_path))
    with pytest.raises(SystemExit):  # a good path passes this check (and fails later on the other arguments)
        build_parser().parse_args([*fill(tmp_path / "ok.json"), "--definitely-unknown"])
    assert "--definitely-unknown" in capsys.readouterr().err


def test_choices_and_pairs_are_checked_before_any_work(capsys, tmp_path):
    err = _fails(capsys, ["bench", "--task", "lm-stdlib", "--backend", "numpy"])
    assert "task lm-stdlib runs on torch, not numpy" in err
    assert "invalid choice: 'nope'" in _fails(capsys, ["bench", "--task", "nope"])
    assert "invalid choice: 'cuda'" in _fails(capsys, ["demo", "--backend", "cuda"])
    same = str(tmp_path / "a.json")
    assert "two outputs would write" in _fails(capsys, ["demo", "--json", same, "--jsonl", same])
    (tmp_path / "run.jsonl").write_text("")
    assert "names a column of --validation" in _fails(capsys, ["plot", str(tmp_path / "run.jsonl"), "--metric", "x"])
    assert "no such file" in _fails(capsys, ["plot", "missing.jsonl"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"hybrid-train {__version__}\n"


def _subparsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers().items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings or action.nargs == "*":
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, (name, action.dest, shown)
        assert "default" in text or name == "conformance"


def test_help_lists_the_choices(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the names
    subs = _subparsers()
    bench = " ".join(subs["bench"].format_help().split())
    for task, backends in BENCH_TASKS.items():
        assert task in bench and f"{task} {', '.join(backends)}" in bench
    assert "{digits-mlp,lm-stdlib,jax-mlp,fastgrnn-router,lm-finetune}" in bench
    assert "--backend {jax,numpy,torch}" in bench
    assert "{numpy,array_api_strict,torch,jax}" in subs["demo"].format_help()
    assert "(default: 600)" in subs["demo"].format_help()


def test_the_parsers_static_lists_match_the_apps():
    from hybrid_core.apps.bench import TASKS
    from hybrid_core.apps.demo import BACKENDS
    from hybrid_core.apps.dynamics_eval import TASK_BACKENDS
    from hybrid_core.apps.kernels_bench import BACKENDS as KERNELS

    assert DEMO_BACKENDS == BACKENDS
    assert BENCH_TASKS == {name: task.backends for name, task in TASKS.items()}
    assert KERNEL_BACKENDS == KERNELS
    assert DYNAMICS_TASKS == (*TASK_BACKENDS, "all")


def test_failures_are_one_line_with_a_hint_and_exit_code_1(monkeypatch, capsys):
    def broken(args):
        raise BackendError("torch is not installed", "pip install torch")

    monkeypatch.setitem(cli.COMMANDS, "demo", broken)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == "hybrid-train demo: error: torch is not installed (hint: pip install torch)\n"

    def disk_full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.COMMANDS, "demo", disk_full)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "hint:" in err


def test_a_demo_backend_that_is_not_installed_fails_before_the_header(monkeypatch, capsys):
    import hybrid_core.apps.demo as demo

    def missing(name):
        raise BackendError(f"{name} is not installed", "pip install it")

    monkeypatch.setattr(demo, "load_backend", missing)
    assert cli.main(["demo", "--backend", "jax"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and issubclass(BackendError, HybridError)


def test_the_demo_writes_what_it_was_asked_to(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "30", "--quiet", "--json", str(tmp_path / "t.json"),
                     "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hybrid-train demo: reference MLP")
    assert json.loads((tmp_path / "t.json").read_text())["summary"]["steps"] == 30
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30)) and all("lr" in r and "grad_norm" in r for r in rows)
    assert os.path.getsize(tmp_path / "t.json") > 0


def test_fastgrnn_compress_prints_the_table_and_writes_the_export(tmp_path, capsys):
    code = cli.main(["fastgrnn-compress", "--epochs", "2", "--iht-epochs", "1", "--finetune-epochs", "1",
                     "--hidden", "16", "--u-rank", "4", "--out", str(tmp_path / "run"),
                     "--json", str(tmp_path / "t.json"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    for stage in ("float low-rank", "int8 low-rank", "sparse (IHT)", "sparse fine-tuned", "int8 sparse"):
        assert f"| {stage} |" in out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["compress"]["w_density"] == 0.5 and [r["stage"] for r in doc["stages"]][-1] == "int8 sparse"
    assert doc["stages"][-1]["file_bytes"] == (tmp_path / "run" / "router.fgq").stat().st_size


def test_fastgrnn_compress_rejects_a_density_out_of_range(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fastgrnn-compress", "--w-density", "0"])
    assert info.value.code == 2 and "(0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--nproc", "1"], ["--steps", "10", "--chunk", "3"], ["--seeds", "0"]])
def test_bench_ddp_refuses_bad_arguments_before_launching_anything(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench-ddp", *argv])
    assert info.value.code == 2
    assert "bench-ddp" in capsys.readouterr().err
