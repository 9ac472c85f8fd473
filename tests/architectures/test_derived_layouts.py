"""The layouts derived from transformers' conversion mapping are shipped as data
(`moeconsol/architectures/derived_layouts.py`) so that detecting a layout does not import transformers.
These tests keep that copy honest for the transformers version of the lock, and check that any
other version installed (`make test-latest`) is read live instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeconsol.architectures import derived_layouts, layouts

REGENERATE = "python -m moeconsol.architectures.layouts --regenerate"
LOCK = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
INSTALLED = layouts._transformers_version()
SHIPPED = derived_layouts.TRANSFORMERS_VERSION
on_the_shipped_version = pytest.mark.skipif(
    INSTALLED != SHIPPED, reason=f"transformers {INSTALLED} is not the shipped {SHIPPED}"
)
on_another_version = pytest.mark.skipif(INSTALLED == SHIPPED, reason=f"transformers {INSTALLED} is the shipped version")


def locked_transformers() -> str:
    pins = [
        line.split("==", 1)[1].strip() for line in LOCK.read_text().splitlines() if line.startswith("transformers==")
    ]
    assert len(pins) == 1, f"{LOCK} pins transformers {len(pins)} times"
    return pins[0]


def test_shipped_facts_are_for_the_locked_transformers():
    assert SHIPPED == locked_transformers(), (
        f"the lock moved to transformers {locked_transformers()}: install it, run `{REGENERATE}`"
    )


@on_the_shipped_version
def test_shipped_facts_are_what_the_installed_transformers_gives(tmp_path):
    fresh = layouts.regenerate(tmp_path / "derived_layouts.py").read_text()
    shipped = open(derived_layouts.__file__).read()
    assert fresh == shipped, (
        f"moeconsol/architectures/derived_layouts.py is stale for the installed transformers: run `{REGENERATE}`"
    )
    for name in layouts.derived_families():
        assert derived_layouts.FACTS[name] == layouts.derive_facts(name), f"{name}: run `{REGENERATE}`"


def test_every_family_without_written_layouts_is_shipped():
    assert set(layouts.derived_families()) == set(derived_layouts.FACTS), f"run `{REGENERATE}`"
    assert {"mixtral", "qwen2_moe", "deepseek_v3"} <= set(derived_layouts.FACTS)


def _detect_layouts_in_a_fresh_interpreter() -> dict:
    code = (
        "import json, sys; from moeconsol.architectures import layouts; names = [x.name for x in layouts.all_layouts()]; "
        "print(json.dumps({'names': names, 'imported': sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch'))}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@on_the_shipped_version
def test_layouts_without_importing_transformers():
    seen = _detect_layouts_in_a_fresh_interpreter()
    assert {"mixtral-fused", "qwen2_moe", "switch"} <= set(seen["names"]), seen["names"]
    assert not seen["imported"], seen["imported"]


@on_another_version
def test_another_installed_transformers_is_read_live():
    """Another transformers than the shipped facts' (the canary's newest release): the layouts
    are derived from the installed transformers' conversion mapping, and every family still has
    its per-expert and fused layout."""
    seen = _detect_layouts_in_a_fresh_interpreter()
    assert "transformers.conversion_mapping" in seen["imported"]
    for name in layouts.derived_families():
        assert [x.name for x in layouts.architecture(name).layouts] == [name, f"{name}-fused"]


def test_another_transformers_version_derives_the_layouts(monkeypatch):
    """With another transformers version installed the shipped copy is not trusted: the facts
    are derived from transformers, and give the same layouts here."""
    shipped = {name: layouts.architecture(name).layouts for name in layouts.derived_families()}
    calls: list[str] = []
    derive = layouts.derive_facts
    monkeypatch.setattr(layouts, "_transformers_version", lambda: "0.0.0-not-shipped")
    monkeypatch.setattr(layouts, "derive_facts", lambda name: calls.append(name) or derive(name))
    layouts._derived_layouts.cache_clear()
    try:
        derived = {name: layouts.architecture(name).layouts for name in layouts.derived_families()}
    finally:
        layouts._derived_layouts.cache_clear()
    assert calls == layouts.derived_families()
    assert derived == shipped
    mixtral = derived["mixtral"][0]
    assert mixtral.match_expert("model.layers.3.block_sparse_moe.experts.7.w2.weight") == ("model.layers.3", 7, "w2")
