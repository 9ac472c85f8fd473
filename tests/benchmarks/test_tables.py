"""benchmarks/tables.py: docs/benchmarks.md's generated tables agree with benchmarks/results/;
a stale table is named and --check changes nothing; a rewrite makes the page agree again; a
marker of an unknown table, or a table missing from the page, is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tables.py"
PAGE = ROOT / "docs" / "benchmarks.md"


def tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_the_page_agrees_with_the_results():
    proc = tables("--check")
    assert proc.returncode == 0, proc.stderr


def test_a_stale_table_is_named_and_rewritten(tmp_path):
    page, results = tmp_path / "benchmarks.md", tmp_path / "results"
    shutil.copy(PAGE, page)
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    merge = json.loads((results / "merge-io.json").read_text())
    merge["summary"][0]["median_seconds"] = 99.0
    merge["summary"][0]["seconds"] = [99.0, 99.0, 99.0]
    (results / "merge-io.json").write_text(json.dumps(merge))
    paths = ("--page", str(page), "--results", str(results))

    stale = tables("--check", *paths)
    assert stale.returncode == 1
    assert stale.stderr.splitlines() == [
        f"{page}: table merge-io differs from {results}; run python benchmarks/tables.py"
    ]
    assert page.read_text() == PAGE.read_text()

    assert tables(*paths).returncode == 0
    assert "| merge lossless | 99.0 s (99.0, 99.0, 99.0) |" in page.read_text()
    assert tables("--check", *paths).returncode == 0


def test_unknown_and_missing_tables_are_refused(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.read_text() + "\n<!-- table: nope -->\n<!-- end -->\n")
    unknown = tables("--check", "--page", str(page))
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1 and "unknown table(s) nope" in unknown.stderr

    page.write_text(PAGE.read_text().replace("<!-- table: merge-io -->", "<!-- merge-io -->"))
    missing = tables("--check", "--page", str(page))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "merge-io" in missing.stderr
