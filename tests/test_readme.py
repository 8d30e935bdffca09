"""Every command in the README runs: python blocks are executed, shell lines are run (`make test`
is what CI runs; `make demo` runs `python -m spion_fx.demo`, whose main is tested in test_demo)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    lang, first = BLOCKS[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert lang == "bash" and commands == ["make demo", "make test"]
    assert Path(README.parent / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_blocks_run(index):
    exec(compile(BLOCKS[index][1], f"README block {index}", "exec"), {"__name__": "__readme__"})


SHELL = [
    line.split("#")[0].strip()
    for lang, body in BLOCKS[1:] if lang == "bash"
    for line in body.strip().splitlines()
]


@pytest.mark.parametrize("command", SHELL)
def test_shell_commands_run(command):
    argv = shlex.split(command)
    assert argv[0] == "python", f"README shell command not covered by a test: {command}"
    result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
