"""The layouts derived from transformers' conversion mapping are shipped as data
(`moeconsol/derived_layouts.py`) so that detecting a layout does not import transformers.
These tests keep that copy honest: it must be exactly what the installed transformers gives."""

from __future__ import annotations

import subprocess
import sys

from moeconsol import derived_layouts, layouts

REGENERATE = "python -m moeconsol.layouts --regenerate"


def test_shipped_facts_are_what_the_installed_transformers_gives(tmp_path):
    fresh = layouts.regenerate(tmp_path / "derived_layouts.py").read_text()
    shipped = open(derived_layouts.__file__).read()
    assert fresh == shipped, f"moeconsol/derived_layouts.py is stale for the installed transformers: run `{REGENERATE}`"
    for name in layouts.derived_families():
        assert derived_layouts.FACTS[name] == layouts.derive_facts(name), f"{name}: run `{REGENERATE}`"


def test_every_family_without_written_layouts_is_shipped():
    assert set(layouts.derived_families()) == set(derived_layouts.FACTS), f"run `{REGENERATE}`"
    assert {"mixtral", "qwen2_moe", "deepseek_v3"} <= set(derived_layouts.FACTS)


def test_layouts_without_importing_transformers():
    code = (
        "import sys; from moeconsol import layouts; names = [x.name for x in layouts.all_layouts()]; "
        "assert 'mixtral-fused' in names and 'qwen2_moe' in names, names; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')); "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


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
