"""One way to show progress for every command: the library reports `(stage, done, total)`.

On a terminal, a rich progress bar on stderr. Elsewhere (a log file, a pipe, a CI job), lines
on stderr, as pip and huggingface_hub do when they cannot draw: one when a stage starts, one
when it ends, and in between one whenever the stage has moved on by a tenth (at most one a
second) or `INTERVAL` seconds have passed since the last, each with done/total and the time
the stage has taken. A long merge is never silent in its log.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

StageCallback = Callable[[str, int, int], None]

INTERVAL = 10.0
"""Seconds between two lines of a stage that moves by less than a tenth in that time."""
MIN_GAP = 1.0
"""Seconds between two lines of a stage that moves by a tenth or more."""


def elapsed(seconds: float) -> str:
    """`4.2s`, `1m05s`, `1h02m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class _Stage:
    started: float
    printed_at: float
    printed_done: int
    finished: bool = False


class ProgressLines:
    """The `(stage, done, total)` callback that writes progress lines to `stream` (see the module)."""

    def __init__(
        self,
        labels: dict[str, str] | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.labels, self.stream, self.clock = labels or {}, stream, clock
        self.stages: dict[str, _Stage] = {}
        self.lock = threading.Lock()  # the library may report from a worker thread

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self.lock:
            now = self.clock()
            s = self.stages.get(stage)
            if s is None:
                s = self.stages[stage] = _Stage(started=now, printed_at=now, printed_done=done)
            elif s.finished:
                return
            elif done < total:
                moved = (done - s.printed_done) * 10 >= total and now - s.printed_at >= MIN_GAP
                if not (moved or now - s.printed_at >= INTERVAL):
                    return
            s.printed_at, s.printed_done, s.finished = now, done, done >= total
            self._line(stage, done, total, now - s.started, s.finished)

    def _line(self, stage: str, done: int, total: int, seconds: float, finished: bool) -> None:
        share = f" ({done / total:.0%})" if total > 0 else ""
        when = f"done in {elapsed(seconds)}" if finished else elapsed(seconds)
        stream = self.stream or sys.stderr
        print(f"moeconsol: {self.labels.get(stage, stage)}: {done}/{total}{share}, {when}", file=stream, flush=True)


@contextlib.contextmanager
def stage_progress(labels: dict[str, str] | None = None) -> Iterator[StageCallback]:
    """The library's progress callback: a rich bar on stderr when it is a terminal (one task
    per stage, started at the first report, gone at the end), progress lines otherwise."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield ProgressLines(labels)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task((labels or {}).get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield report
    finally:
        if tasks:
            bar.stop()
