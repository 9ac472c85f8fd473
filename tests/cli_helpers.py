"""Running the real `moeconsol` command in a subprocess, and checking its error contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def cli(*args: object, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moeconsol ARGS`, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "moeconsol", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


PROGRESS_LINE = re.compile(r"moeconsol: [^:]+: \d+/\d+ \(\d+%\), [^:]+")
"""A progress line (cli/progress.py), written when stderr is not a terminal."""


def one_error_line(result: str | subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: exactly one `moeconsol: error:` line on stderr naming every fragment (and,
    given a finished process, exit code 2); before it only progress lines, where the error
    was found after work began."""
    if isinstance(result, subprocess.CompletedProcess):
        assert result.returncode == 2, (result.returncode, result.stderr)
        result = result.stderr
    lines = [line for line in result.strip().splitlines() if not PROGRESS_LINE.fullmatch(line)]
    assert len(lines) == 1 and lines[0].startswith("moeconsol: error: "), result
    for f in fragments:
        assert f in lines[0], result


def run_main(*args: object) -> subprocess.CompletedProcess:
    """`moeconsol ARGS` in this process, through the same `main()` as the console script
    (much faster than `cli()`: no new interpreter importing torch). Output captured."""
    import contextlib
    import io
    import warnings

    from moeconsol.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, show = sys.argv, warnings.showwarning
    sys.argv = ["moeconsol", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, warnings.showwarning = argv, show
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


HEAVY = ("torch", "transformers", "fastapi", "matplotlib", "scipy", "uvicorn")
"""Modules that take seconds to import: a command imports them only once its options are checked."""


def imported_after(argv: list[str]) -> tuple[int, list[str], str]:
    """Run `main()` with argv in a fresh interpreter: (exit code, heavy modules imported, stderr)."""
    code = (
        "import json, sys\n"
        f"sys.argv = ['moeconsol', *{argv!r}]\n"
        "from moeconsol.cli import main\n"
        "try:\n    main()\n    code = 0\nexcept SystemExit as e:\n    code = e.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps([code, heavy]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    exit_code, heavy = json.loads(r.stdout.strip().splitlines()[-1])
    return exit_code, heavy, r.stderr
