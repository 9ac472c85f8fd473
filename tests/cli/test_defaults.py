"""The command line's defaults are the library's: the CLI writes some out (so that parsing
options imports no torch), and these tests hold the two equal."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from moeconsol.cli import app, load_commands
from moeconsol.consolidate.settings import MergeSettings
from moeconsol.io.sizes import parse_size
from moeconsol.serving import engine


def defaults(command: str) -> dict[str, object]:
    load_commands(command)
    return {p.name: p.default for p in typer.main.get_command(app).commands[command].params}


def test_merge_defaults_are_merge_settings_defaults():
    cli = defaults("merge")
    library = {f.name: f.default for f in dataclasses.fields(MergeSettings)}
    cli["shard_size"] = parse_size(cli["shard_size"])
    shared = set(cli) & set(library) - {"calibration"}  # a list of NAME=FILE on the command line, a dict here
    assert shared >= {"mode", "representative", "shard_size", "density", "scale", "non_expert_codec", "deltas"}
    for name in shared:
        assert cli[name] == library[name], name


@pytest.mark.parametrize("command", ["serve-local", "serve"])
def test_server_defaults_are_the_engines(command):
    cli = defaults(command)
    for name in ("max_wait", "max_prompt_tokens", "max_batch_size", "max_tokens_in_flight"):
        assert cli[name] == getattr(engine, f"DEFAULT_{name.upper()}"), name


@pytest.mark.parametrize("command", ["add", "remove"])
def test_grow_shard_size_is_merge_settings_default(command):
    assert parse_size(defaults(command)["shard_size"]) == MergeSettings().shard_size
