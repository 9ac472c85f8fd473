"""The lock that `make install` uses as pip constraints (docs/dependencies.md)."""

from __future__ import annotations

import re
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


def test_the_lock_pins_every_package_by_version_and_not_moeconsol_nor_torch():
    pins = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert pins, "requirements/lock.txt pins nothing"
    bad = [line for line in pins if not re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line)]
    assert not bad, f"not a name==version pin (a path or URL would pin this checkout): {bad}"
    names = [line.split("==")[0].lower().replace("_", "-") for line in pins]
    assert "moeconsol" not in names and "torch" not in names, (
        "the project itself and torch (the Makefile's TORCH) stay out"
    )
    assert len(names) == len(set(names)), "a package pinned twice"
    assert {"transformers", "safetensors", "huggingface-hub", "typer"} <= set(names)
