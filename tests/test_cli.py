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


@pytest.mark.parametrize("args", [("model", "params", "--preset", "tiny", "--seq-len", "-5"),
                                  ("pretrain", "--config", "shakespeare-char", "--model.n_head=0")])
def test_bad_numbers_are_one_line_errors(args):
    r = haina(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_debug_after_the_command_shows_the_traceback():
    r = haina("model", "params", "--preset", "gpt5", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "unknown model preset 'gpt5'" in r.stderr


def test_list_options_add_up_when_repeated_and_keep_their_default_otherwise():
    import argparse

    from haina.cli import _add_function_args, _call

    def fn(stop: list[str] | None = None, filters: list[str] = ["a", "b"]):  # noqa: B006 - read only
        return stop, filters

    parser = argparse.ArgumentParser()
    _add_function_args(parser, fn)
    assert _call(fn, parser.parse_args(["--stop", "x", "--stop", "y", "z"]), []) == (["x", "y", "z"], ["a", "b"])
    assert _call(fn, parser.parse_args(["--filters", "c"]), []) == (None, ["c"])
