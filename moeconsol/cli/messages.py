"""The library's messages as a command line user reads them.

A library message names a setting by its Python parameter in backticks (`force`,
`shard_size`: see errors.py), so that it reads right from Python; on the command line the
same name becomes the option the user types (`--force`, `--shard-size`), looked up among the
running command's own options.
"""

from __future__ import annotations

import re

import typer

_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def typed_options(app: typer.Typer, command: str | None) -> dict[str, str]:
    """Parameter name -> the long option that sets it, for `command` of `app` (none if unknown)."""
    group = typer.main.get_command(app)
    cmd = getattr(group, "commands", {}).get(command) if command else None
    options: dict[str, str] = {}
    for param in cmd.params if cmd is not None else []:
        long = [o for o in param.opts if o.startswith("--")]
        if param.param_type_name == "option" and param.name and long:
            options[param.name] = long[0]
    return options


def as_typed(message: str, options: dict[str, str]) -> str:
    """`message` with each backticked parameter the command has an option for written as that option."""
    return _PARAMETER.sub(lambda m: options.get(m[1], m[0]), message)
