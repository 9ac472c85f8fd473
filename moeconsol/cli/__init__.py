"""The `moeconsol` command line: a thin layer over the library.

Each command lives in its own module and only parses options, calls library functions and
prints. Errors of the user's making (`MoeconsolError`) become one line on stderr, with the
settings they name written as the options the user types (`messages.py`), and exit code 2;
Ctrl-C and SIGTERM exit 130 with one `moeconsol: interrupted` line, no traceback
(`interrupt.py`).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
import warnings

import typer
from typer.core import TyperGroup

from ..errors import MoeconsolError, MoeconsolWarning
from .interrupt import Interrupted, sigterm_interrupts
from .messages import as_typed, typed_options


def _untagged(param):  # noqa: ANN001, ANN202 (click's types)
    """An on/off flag (`--force`, `--help`) takes no value: an empty metavar, so that --help
    shows no `<bool>` value tag (typer >= 0.2x tags every option with its type)."""
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""
    return param


class _Commands(TyperGroup):
    """The command group: Ctrl-C inside a command becomes `Interrupted` (typer would turn it
    into a silent exit 130), and flags show no value tag in --help."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 (click's signature)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def get_command(self, ctx, cmd_name):  # noqa: ANN001, ANN201 (click's signature)
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            for param in [*command.params, command.get_help_option(ctx)]:
                _untagged(param)
        return command

    def get_help_option(self, ctx):  # noqa: ANN001, ANN201 (click's signature)
        return _untagged(super().get_help_option(ctx))


app = typer.Typer(
    name="moeconsol",
    cls=_Commands,
    help="Consolidate fine-tuned Mixture-of-Experts checkpoints into one shared expert bank.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Consolidate fine-tuned Mixture-of-Experts checkpoints into one shared expert bank."""


def fail(message: str) -> typer.Exit:
    """Print one line on stderr; return the exit to raise (code 2)."""
    print(f"moeconsol: error: {message}", file=sys.stderr)
    return typer.Exit(2)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of whichever click typer raises: typer >= 0.20
    vendors its own (`typer._click`, with Abort in `typer.exceptions`), older typer uses
    click. Looked up by name so that a class one of them lacks is skipped, never fatal."""
    usage: list[type] = []
    aborts: list[type] = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(module)
        except ImportError:
            continue
        usage += [c for c in (getattr(m, "ClickException", None),) if isinstance(c, type)]
        aborts += [c for c in (getattr(m, "Abort", None),) if isinstance(c, type)]
    return tuple(usage), tuple(aborts)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """MoeconsolWarning as one `moeconsol: warning:` line; other warnings as Python shows them."""
    if issubclass(category, MoeconsolWarning):
        print(f"moeconsol: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


COMMANDS: dict[str, str] = {
    "analyze": "analyze",
    "merge": "merge",
    "export": "merge",
    "inspect": "inspect",
    "verify": "merge",
    "add": "grow",
    "remove": "grow",
    "serve-local": "serve",
    "eval": "evaluate",
    "sweep": "evaluate",
    "serve": "ray_serve",
}
"""Command -> the module of this package that registers it on `app`. Modules are imported
when a command of theirs runs (`load_commands`), so a command does not pay for the others'
imports (FastAPI, the runtime, ...)."""


def load_commands(command: str | None = None) -> None:
    """Register `command`'s module on `app`, or every command's when it is None or unknown
    (`--help`, a typo: click lists or suggests them all)."""
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"{__name__}.{module}")


def main() -> None:
    warnings.showwarning = _show_warning
    # At exit, the interpreter's last garbage collections skip every object alive then
    # (gc.freeze), torch's included: 0.18 s of the 0.28 s an interpreter with torch takes to
    # exit. Objects in reference cycles are then not finalized at exit, which Python never
    # promises; files and directories are closed explicitly (atexit, weakref.finalize run).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        with sigterm_interrupts():
            load_commands(sys.argv[1] if len(sys.argv) > 1 else None)
            code = app(standalone_mode=False)  # a raised typer.Exit comes back as its code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except MoeconsolError as e:
        command = sys.argv[1] if len(sys.argv) > 1 else None
        print(f"moeconsol: error: {as_typed(str(e), typed_options(app, command))}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e.line(), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print(Interrupted().line(), file=sys.stderr)
        sys.exit(Interrupted().code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and aborts; anything else is a bug: its traceback
        usage, aborts = _click_exceptions()
        if isinstance(e, usage):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        if isinstance(e, aborts):
            print("moeconsol: aborted", file=sys.stderr)
            sys.exit(130)
        raise
