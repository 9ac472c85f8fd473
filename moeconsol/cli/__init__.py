"""The `moeconsol` command line: a thin layer over the library.

Each command lives in its own module and only parses options, calls library functions and
prints. Errors of the user's making (`MoeconsolError`) become one line on stderr and exit
code 2; Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import MoeconsolError

app = typer.Typer(
    name="moeconsol",
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


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a raised typer.Exit comes back as its code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except MoeconsolError as e:
        print(f"moeconsol: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("moeconsol: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and aborts
        try:  # typer >= 0.20 raises its own vendored click's exceptions
            from typer._click import exceptions as click_exceptions
        except ImportError:
            from click import exceptions as click_exceptions

        if isinstance(e, click_exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click_exceptions.Abort):
            print("moeconsol: aborted", file=sys.stderr)
            sys.exit(130)
        raise


# Command modules register themselves on `app`; one import line per module.
from . import analyze  # noqa: E402,F401
from . import merge  # noqa: E402,F401
from . import serve  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
