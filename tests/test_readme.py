"""The README's promises: its Python code blocks run, its test command is CI's."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(r"^```" + lang + r"\n(.*?)^```", README, flags=re.S | re.M)


def test_ci_runs_the_readme_test_command():
    bash = [b.strip() for b in _blocks("bash")]
    assert len(bash) >= 2, "the README must show its two commands as bash blocks"
    test_command = bash[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test_command


PY_BLOCKS = _blocks("python")


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    code = PY_BLOCKS[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
