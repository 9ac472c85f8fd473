"""What --help and the summaries show: values as the user writes them, arguments named alike."""

from __future__ import annotations

import pytest
from cli_helpers import run_main

from moeconsol import testing as T
from moeconsol.cli import COMMANDS
from moeconsol.cli.settings_text import mapping_lines, settings_line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_flags_without_a_value_tag(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = run_main(command, "--help")
    assert r.returncode == 0 and "--help" in r.stdout
    assert "<bool>" not in r.stdout, r.stdout


def test_merge_help_shows_sizes_as_written(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = run_main("merge", "--help").stdout
    assert "[default: 5GB]" in out and "5000000000" not in out
    assert "budget, calibrated and reference modes" in out


@pytest.mark.parametrize("command", ["export", "inspect", "verify", "serve-local", "serve", "eval"])
def test_every_command_calls_the_artifact_out(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = run_main(command, "--help").stdout
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "OUT" in usage and "artifact" not in usage.lower(), usage


def test_consolidation_settings_read_as_text():
    c = {
        "mode": "calibrated",
        "threshold": None,
        "budget": "0.5",
        "calibration": {"base": "base.txt", "code": "code.txt"},
        "calibration_tokens": 512,
        "deltas": True,
        "budget_bytes": 294912,
    }
    assert settings_line(c) == "mode calibrated, budget 0.5, calibration tokens 512, deltas, budget bytes 294.9 KB"
    assert mapping_lines(c) == ["calibration: base=base.txt, code=code.txt"]


def test_calibrated_summary_prints_no_python_dict(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # a line per setting, not wrapped
    tok = T.tiny_tokenizer()
    base = T.tiny_mixtral(seed=3)
    T.save_model(base, tmp_path / "base", tok)
    T.save_model(T.derive_variant(base, 4, [(0, 2)]), tmp_path / "ft", tok)
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    args = ["--mode", "calibrated", "--budget", "0.75", "--calibration", tmp_path / "t.txt"]
    r = run_main("merge", f"base={tmp_path / 'base'}", f"ft={tmp_path / 'ft'}", "-o", tmp_path / "art", *args)
    assert r.returncode == 0, r.stderr
    assert "{" not in r.stdout and f"calibration: base={tmp_path / 't.txt'}, ft=" in r.stdout
