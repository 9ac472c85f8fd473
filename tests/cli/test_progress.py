"""Progress where stderr is not a terminal (a log, a pipe): lines, not silence, not a flood."""

from __future__ import annotations

import io
import re

from cli_helpers import cli

from moeconsol import testing as T
from moeconsol.cli.progress import INTERVAL, ProgressLines, elapsed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines_of(events: list[tuple[float, str, int, int]]) -> list[str]:
    """Feed (seconds since start, stage, done, total) reports; the lines written."""
    clock, out = Clock(), io.StringIO()
    report = ProgressLines({"plan": "measuring experts"}, out, clock)
    for t, stage, done, total in events:
        clock.now = 100.0 + t
        report(stage, done, total)
    return out.getvalue().splitlines()


def test_a_line_when_a_stage_starts_and_when_it_ends():
    assert lines_of([(0, "plan", 0, 4), (0.5, "plan", 4, 4), (0.6, "plan", 4, 4)]) == [
        "moeconsol: measuring experts: 0/4 (0%), 0.0s",
        "moeconsol: measuring experts: 4/4 (100%), done in 0.5s",
    ]


def test_between_a_line_per_tenth_at_most_one_a_second():
    reports = [(i * 0.01, "write", i, 1000) for i in range(1000)]  # 10 s of many small steps
    out = lines_of(reports)
    assert out[0] == "moeconsol: write: 0/1000 (0%), 0.0s"
    # a tenth every second: one line a second, each a tenth further on
    assert [re.search(r": (\d+)/", line)[1] for line in out[1:]] == [str(100 * k) for k in range(1, 10)]


def test_between_a_line_every_interval_when_a_stage_moves_slowly():
    reports = [(t, "deltas", t // 7, 1000) for t in range(0, 70)]  # 1 step per 7 s: never a tenth
    out = lines_of(reports)
    assert len(out) == 1 + 69 // INTERVAL
    assert out[1] == f"moeconsol: deltas: 1/1000 (0%), {INTERVAL:.1f}s" and out[-1].endswith(", 1m00s")


def test_stages_are_counted_apart_and_elapsed_reads_well():
    out = lines_of([(0, "a", 0, 2), (1, "b", 0, 2), (2, "a", 2, 2), (75, "b", 2, 2)])
    assert out[-2:] == ["moeconsol: a: 2/2 (100%), done in 2.0s", "moeconsol: b: 2/2 (100%), done in 1m14s"]
    assert [elapsed(s) for s in (4.25, 65, 3725)] == ["4.2s", "1m05s", "1h02m"]


def test_a_merge_into_a_pipe_writes_progress_lines(tmp_path):
    base = T.tiny_mixtral(seed=3)
    T.save_model(base, tmp_path / "base")
    T.save_model(T.derive_variant(base, 4, [(0, 2)]), tmp_path / "ft")
    r = cli("merge", tmp_path / "base", tmp_path / "ft", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    stages = [line.split(":")[1].strip() for line in r.stderr.splitlines()]
    assert {"measuring experts", "hashing non-expert tensors", "writing"} <= set(stages)
    assert all(re.fullmatch(r"moeconsol: [a-z -]+: \d+/\d+ \(\d+%\), .+", line) for line in r.stderr.splitlines())
    assert r.stderr.splitlines()[-1].startswith("moeconsol: writing: ") and "done in" in r.stderr.splitlines()[-1]
