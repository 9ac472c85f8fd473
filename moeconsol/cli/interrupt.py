"""Ctrl-C and SIGTERM: both stop a command the same way, with one `moeconsol: interrupted` line.

While `main` runs, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so
that every cleanup (`finally`, the atomic output directory) runs for both. A command that
stops on purpose when interrupted (a server) raises `Interrupted` with what it stopped and
its exit code; any other command interrupted exits 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

INTERRUPTED = 130
"""Exit code of an interrupted command (128 + SIGINT, as shells report Ctrl-C)."""


class Interrupted(Exception):
    """The command was interrupted: `main` prints `moeconsol: interrupted[: detail]` and exits `code`."""

    def __init__(self, detail: str = "", code: int = INTERRUPTED):
        super().__init__(detail)
        self.detail, self.code = detail, code

    def line(self) -> str:
        return "moeconsol: interrupted" + (f": {self.detail}" if self.detail else "")


_received: list[int] = []


def by_sigterm() -> bool:
    """Whether SIGTERM (not Ctrl-C) interrupted this command."""
    return signal.SIGTERM in _received


def _on_sigterm(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside (main thread), SIGTERM raises KeyboardInterrupt; the previous handler
    comes back on leaving."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
