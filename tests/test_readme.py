"""Every ```python block of README.md runs as pasted: each in a fresh namespace, in a
temporary working directory, with RuntimeWarnings as errors. A traceback points at the
README's own line numbers. ```bash blocks are not run (one check: the first commands are
the ones .ci/run relies on)."""
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def fenced_blocks(text):
    """``(language, first line number of the code, code)`` for each top-level fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if lang is None:
            m = re.match(r"```(\w*)\s*$", line)
            if m:
                lang, start, body = m.group(1), number + 1, []
        elif line.rstrip() == "```":
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON = [(start, code) for lang, start, code in BLOCKS if lang == "python"]


def _needs(code, module):
    return re.search(rf"^\s*(import|from)\s+{module}\b", code, re.MULTILINE) is not None


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 5


@pytest.mark.parametrize("start, code", PYTHON, ids=[f"line{start}" for start, _ in PYTHON])
def test_python_block_runs(start, code, tmp_path, monkeypatch):
    if _needs(code, "torch"):
        pytest.importorskip("torch", reason="this README block needs torch")
    if _needs(code, "cupy"):
        cupy = pytest.importorskip("cupy", reason="this README block needs CuPy")
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("this README block needs a GPU")
    monkeypatch.chdir(tmp_path)
    # blank lines in front: the compiled code's line numbers are the README's
    compiled = compile("\n" * (start - 1) + code, str(README), "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        exec(compiled, {"__name__": "__readme__"})  # noqa: S102 (running the README is the test)


def test_first_commands_are_the_ones_ci_runs():
    lang, _, first = BLOCKS[0]
    assert lang == "bash"
    lines = [line.split("#")[0].strip() for line in first.splitlines()]
    assert "fastopt train" in lines and "python -m pytest" in lines
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "python -m pytest" in [line.strip() for line in ci]
