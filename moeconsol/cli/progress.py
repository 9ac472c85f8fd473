"""One progress bar for every command: the library reports `(stage, done, total)`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

StageCallback = Callable[[str, int, int], None]


@contextlib.contextmanager
def stage_progress(quiet: bool = False, labels: dict[str, str] | None = None) -> Iterator[StageCallback | None]:
    """A rich progress bar on stderr (only on a terminal, so pipes and logs stay clean), one
    task per stage, started at the first report. Yields the library's progress callback, or
    None when there is nothing to draw."""
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
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
