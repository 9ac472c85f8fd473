"""A bad option fails before the command imports torch, transformers or the runtime (seconds
on a busy machine): counted as the heavy modules a fresh interpreter imported, not as time."""

from __future__ import annotations

import pytest
from cli_helpers import imported_after, one_error_line

from moeconsol.cli import COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_nothing_heavy(command):
    code, heavy, err = imported_after([command, "--help"])
    assert (code, heavy) == (0, []), err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["merge", "--mode", "nope", "a", "b", "-o", "x"], "unknown --mode 'nope'"),
        (["merge", "a", "b", "-o", "x", "--shard-size", "5XB"], "bad size '5XB'"),
        (["merge", "a", "b", "-o", "x", "--calibration", "=f"], "--calibration"),
        (["merge", "./absent-a", "./absent-b", "-o", "x"], "absent-a"),
        (["serve-local", "X", "--port", "0"], "--port"),
        (["serve-local", "X", "--prompt", "hi", "--max-wait", "-1"], "--max-wait"),
        (["serve-local", "X"], "--prompt"),
        (["serve", "X", "--replicas", "0"], "--replicas"),
        (["eval", "X", "--data", "f.txt"], "NAME=FILE"),
        (["sweep", "a", "b", "--data", "a=f", "--budgets", "lots"], "budgets 'lots'"),
    ],
)
def test_bad_options_fail_before_heavy_imports(argv, fragment):
    code, heavy, err = imported_after(argv)
    assert heavy == [], err
    one_error_line(err, fragment)
    assert code == 2


def test_a_value_click_cannot_parse_fails_before_heavy_imports():
    code, heavy, err = imported_after(["serve-local", "--port", "abc", "X"])
    assert (code, heavy) == (2, []), err
    assert "'--port'" in err and "Traceback" not in err
