"""The generated families (examples/build_families.py): a family is a function of its seed,
families differ in shape, data and recipe, and a built family (tiny sizes, a few steps) is
what benchmarks/quality.py reads: family.json naming models and files, variants that trained
only what their recipe says (the frozen experts of a `some-experts` variant bit-identical to
the base's), reuse of what is built, and a rebuild when the spec changes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeconsol.io.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bfs = _load("build_families", ROOT / "examples" / "build_families.py")
SEED = 2
"""Recipe `some-experts` (seed mod 5 = 2): only some expert indices train."""


def tiny(spec):
    """The drawn spec at a tiny size: its shape (layers, experts) and first two variants kept, a
    few steps, little data."""
    size = {
        **spec.size,
        "hidden": 32,
        "intermediate": 64,
        "vocab": 320,
        "seq_len": 32,
        "batch": 4,
        "pairs": 8,
        "base_steps": 6,
        "variant_steps": 6,
        "switch_base_steps": 6,
        "switch_variant_steps": 6,
        "train_docs": 40,
        "eval_docs": 6,
        "train_pairs": 60,
        "eval_pairs": 8,
    }
    return dataclasses.replace(spec, size=size, variants=spec.variants[:2])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Family SEED of both architectures, tiny, built twice in two directories; its Switch
    family's second variant is seed 3's first, trained on two tasks (recipe `overlap`)."""
    specs = {a: tiny(bfs.draw_spec(a, SEED)) for a in bfs.ARCHS}
    overlap = bfs.draw_spec("switch", 3).variants[0]
    assert "+" in overlap["data"]
    specs["switch"] = dataclasses.replace(specs["switch"], variants=(specs["switch"].variants[0], overlap))
    out = [tmp_path_factory.mktemp(f"families{k}") / bfs.family_name(SEED) for k in range(2)]
    records = [bfs.build_family(o, SEED, bfs.ARCHS, log=lambda _: None, specs=specs) for o in out]
    return specs, out, records


def test_a_spec_is_a_function_of_its_seed_and_families_differ():
    for arch in bfs.ARCHS:
        specs = [bfs.draw_spec(arch, s) for s in range(10)]
        assert specs == [bfs.draw_spec(arch, s) for s in range(10)]
        assert [s.recipe for s in specs] == [bfs.RECIPES[s % 5] for s in range(10)]
        assert all(2 <= len(s.variants) <= 5 for s in specs)
        assert len({len(s.variants) for s in specs}) >= 3
        shapes = {(s.size["hidden"], s.size["layers"], s.size["experts"]) for s in specs}
        assert len(shapes) >= 5
        data = [frozenset(v["data"] for v in s.variants) for s in specs]
        assert len(set(data)) == 10
        r = bfs.SIZES["small"]
        for s in specs:
            assert s.size["hidden"] in r.hidden and s.size["experts"] in r.experts
            assert len({v["name"] for v in s.variants}) == len(s.variants)
            pool = bfs.TEXT_POOL if arch == "mixtral" else bfs.SEQ2SEQ_POOL
            assert all(p in pool for v in s.variants for p in v["data"].split("+"))
            assert all(p in pool for p in s.base_data)
        assert bfs.draw_spec(arch, 3, "full") != specs[3]


def test_recipes_overlap_and_some_experts():
    for arch in bfs.ARCHS:
        overlap = bfs.draw_spec(arch, 3)
        parts = [v["data"].split("+") for v in overlap.variants]
        assert all(len(p) == 2 for p in parts)
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # neighbours share a domain
        some = bfs.draw_spec(arch, SEED)
        experts = some.size["experts"]
        assert all(v["experts"] and 1 <= len(v["experts"]) <= experts // 2 for v in some.variants)
        assert all(0 <= e < experts for v in some.variants for e in v["experts"])
        frozen = bfs.draw_spec(arch, 1)
        assert all(v["trainable"] == "experts" and v["experts"] is None for v in frozen.variants)
    # Switch bases learn generic tasks only, their variants others
    for s in range(10):
        spec = bfs.draw_spec("switch", s)
        assert set(spec.base_data) <= set(bfs.GENERIC_TASKS)
        assert not set(spec.base_data) & {p for v in spec.variants for p in v["data"].split("+")}


def test_a_built_family_is_what_the_quality_benchmark_reads(built):
    specs, out, records = built
    q = _load("quality_benchmark_generated", ROOT / "benchmarks" / "quality.py")
    record = json.loads((out[0] / "family.json").read_text())
    assert record == records[0]
    assert set(record["specs"]) == set(bfs.ARCHS)
    for arch in bfs.ARCHS:
        models = q.family_models(out[0], arch)
        assert [m["name"] for m in models] == ["base", *(v["name"] for v in specs[arch].variants)]
        for m in models:
            assert Path(m["eval_file"]).is_file() and Path(m["train_file"]).is_file()
            if "+" in m["data"]:  # trained on two tasks in turn: its files hold both
                tasks = {json.loads(line)["input"].split(":")[0] for line in Path(m["train_file"]).open()}
                assert tasks == set(m["data"].split("+"))
            ckpt = Checkpoint(m["name"], m["path"], Path(m["path"]))
            assert ckpt.num_experts == specs[arch].size["experts"]
            assert len(ckpt.moe_layers) == specs[arch].size["layers"]


def test_the_same_seed_builds_the_same_family(built):
    _, out, _ = built
    files = sorted(p.relative_to(out[0]) for p in out[0].rglob("*") if p.is_file() and p.name != "family.json")
    assert files == sorted(p.relative_to(out[1]) for p in out[1].rglob("*") if p.is_file() and p.name != "family.json")
    data = [f for f in files if f.parts[0] == "data"]
    assert data and all((out[0] / f).read_bytes() == (out[1] / f).read_bytes() for f in data)
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            a, b = load_file(out[0] / f), load_file(out[1] / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_only_the_tuned_experts_move(built):
    specs, out, _ = built
    for arch in bfs.ARCHS:
        base = Checkpoint("base", "base", out[0] / arch / "base")
        moved_any = False
        for v in specs[arch].variants:
            variant = Checkpoint(v["name"], v["name"], out[0] / arch / v["name"])
            for layer in base.moe_layers:
                for e in range(base.num_experts):
                    same = all(
                        torch.equal(t, variant.expert_part(layer, e, part)) for part, t in base.expert(layer, e).items()
                    )
                    if v["experts"] is not None and e not in v["experts"]:
                        assert same, (arch, v["name"], layer, e)
                    moved_any |= not same
        assert moved_any, arch


def test_reuse_and_a_changed_spec_rebuilds(built, tmp_path):
    specs, out, _ = built
    again = bfs.build_family(out[0], SEED, ["switch"], log=lambda _: None, specs=specs)
    assert {m["status"] for m in again["models"] if m["family"] == "switch"} == {"reused"}
    assert {m["family"] for m in again["models"]} == set(bfs.ARCHS)  # the other architecture kept
    changed = {"switch": dataclasses.replace(specs["switch"], seed=SEED + 100)}
    rebuilt = bfs.build_family(out[0], SEED, ["switch"], log=lambda _: None, specs=changed)
    assert {m["status"] for m in rebuilt["models"] if m["family"] == "switch"} == {"built"}


def test_an_unknown_architecture_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "build_families.py"), "--out", str(tmp_path), "--archs", "gpt2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown architecture 'gpt2'" in proc.stderr
    assert not any(tmp_path.iterdir())
