"""Every ```python block of README.md and docs/*.md runs, and CI runs the README's test command.

Blocks of one file run in order in one shared namespace (a later block may use what an
earlier one defined), in a temporary working directory, with the environment restored
afterwards. A block fenced ```python no-run: REASON is skipped; that is only for code that
cannot run here by nature (a GPU), and the reason is required. Other spellings of Python
fences (```py, ```python3, ...) are refused, so no block escapes the test by its tag.
"""

import importlib.util
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.M | re.S)
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython"}


def _python_blocks(path):
    """(first line number of the code, info string after 'python', code) for each ```python block."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        language = info.split(maxsplit=1)[0] if info else ""
        assert language not in PYTHON_ALIASES, (
            f"{path.name}: a ```{info} block; tag Python code ```python so the doc test runs it")
        if language == "python":
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((line, info[len("python"):].strip(), match.group(2)))
    return blocks


def _run_file(path):
    namespace = {"__name__": "__doc_snippet__"}
    ran = 0
    for line, options, code in _python_blocks(path):
        if options.startswith("no-run"):
            reason = options[len("no-run"):].lstrip(" :")
            assert reason, f"{path.name}:{line}: ```python no-run needs a reason (```python no-run: needs a GPU)"
            continue
        assert not options, f"{path.name}:{line}: unknown options {options!r} on a ```python fence"
        # Leading newlines keep the traceback's line numbers equal to the Markdown file's.
        exec(compile("\n" * (line - 1) + code, str(path.relative_to(ROOT)), "exec"), namespace)
        ran += 1
    return ran


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    text = path.read_text(encoding="utf-8")
    if "torch" in text and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    try:
        _run_file(path)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "jax", "optax", "cupy", "triton", "equinox", "flax",
                                                        "lightning", "accelerate", "transformers"}:
            pytest.skip(f"{path.name} needs {exc.name}, which is not installed")
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_readme_has_python_blocks():
    assert _python_blocks(ROOT / "README.md")


def test_the_fence_parser_finds_tags_and_refuses_aliases(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python no-run: needs a GPU\nimport cupy\n```\n")
    assert _python_blocks(doc) == [(3, "", "x = 1\n"), (9, "no-run: needs a GPU", "import cupy\n")]
    doc.write_text("```py\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="tag Python code"):
        _python_blocks(doc)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]
    assert len(commands) == 2
    demo, test = commands
    assert demo.endswith("hybrid-train demo") and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    inner = test.split("&& ", 2)[2]  # after creating and activating the venv
    assert inner in ci
