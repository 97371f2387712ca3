"""The CLI as a user meets it: help for every stage, one-line errors, no tracebacks."""

import subprocess
import sys

import pytest

from haina.cli import COMMANDS


def haina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_help_lists_every_stage():
    out = haina("--help").stdout
    for stage in {path[0] for path in COMMANDS}:
        assert stage in out


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_command_has_help(path):
    r = haina(*path, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: haina" in r.stdout and "Traceback" not in r.stderr


def test_model_params_for_70b():
    r = haina("model", "params", "--preset", "llama-70b")
    assert r.returncode == 0
    assert "68,976,648,192" in r.stdout and "AdamW" in r.stdout


def test_errors_are_one_line():
    r = haina("model", "params", "--preset", "gpt5")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown model preset 'gpt5'")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
