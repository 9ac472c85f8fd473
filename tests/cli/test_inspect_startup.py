"""`moeconsol inspect` reads the manifest alone: it imports neither torch nor the pipeline
(on an OLMoE-sized manifest the imports took five times the rest), and it says what
`summary(Artifact.open(...))` says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import one_error_line

from moeconsol.artifact import Artifact, summary
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.testing import derive_variant, save_model, tiny_mixtral

HEAVY = ("torch", "transformers", "numpy", "safetensors", "zstandard", "fastapi", "matplotlib", "scipy")


def inspect_in_fresh_interpreter(*args: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules imported, stdout, stderr) of `moeconsol inspect ARGS` run by
    `main()` in a fresh interpreter."""
    code = (
        "import json, sys\n"
        f"sys.argv = ['moeconsol', 'inspect', *{list(args)!r}]\n"
        "from moeconsol.cli import main\n"
        "try:\n    main()\n    code = 0\nexcept SystemExit as e:\n    code = e.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print('\\n' + json.dumps([code, heavy]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    *out, last = r.stdout.strip().splitlines()
    exit_code, heavy = json.loads(last)
    return exit_code, heavy, "\n".join(out), r.stderr


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A lossless artifact whose second model's non-expert tensors are stored encoded."""
    root = tmp_path_factory.mktemp("inspect")
    base = tiny_mixtral(seed=5)
    save_model(base, root / "base")
    save_model(derive_variant(base, 1, [(0, 1)]), root / "ft")
    out = root / "art"
    merge(open_checkpoints([str(root / "base"), str(root / "ft")]), out, MergeSettings())
    return out


def test_inspect_imports_nothing_heavy_and_says_what_summary_says(artifact):
    code, heavy, out, err = inspect_in_fresh_interpreter(str(artifact), "--json")
    assert code == 0, err
    assert heavy == []
    assert json.loads(out) == json.loads(json.dumps(summary(Artifact.open(artifact))))
    code, heavy, out, err = inspect_in_fresh_interpreter(str(artifact))
    assert code == 0 and heavy == [] and "base" in out and "ft" in out


def test_inspect_of_no_artifact_is_one_line_without_heavy_imports(tmp_path):
    code, heavy, _, err = inspect_in_fresh_interpreter(str(tmp_path / "absent"))
    assert code == 2 and heavy == []
    one_error_line(err, "no such artifact directory")
