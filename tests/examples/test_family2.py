"""The second example family (examples/build_family2.py), built at the small size.

What the quality benchmark relies on: the same output shape as the first family
(family.json naming each model's files, data/train and data/eval), other data than the
first family's, each variant trained what its recipe says (expert-only variants change
nothing but experts), and a gain over the base on its own held-out data.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moeconsol.io.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, file: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bf = _load("build_family", "build_family.py")
bf2 = _load("build_family2", "build_family2.py")


SIZE = replace(
    bf.SMALL,
    base_steps=24,
    variant_steps=24,
    switch_base_steps=24,
    switch_variant_steps=24,
    train_docs=60,
    eval_docs=12,
    train_pairs=300,
    eval_pairs=24,
)
"""Smaller than the first family's test build: this file checks the family's data and recipe."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("family2")
    report = bf2.build(out, size=SIZE, log=lambda _: None)
    return out, report


def test_same_shape_as_the_first_family_with_other_data(family):
    out, report = family
    manifest = json.loads((out / "family.json").read_text())
    names = {fam: [m["name"] for m in manifest["models"] if m["family"] == fam] for fam in ("mixtral", "switch")}
    assert names == {"mixtral": ["base", "dialogue", "records", "sql"], "switch": ["base", "sort", "devowel", "rot13"]}
    for m in report.models:
        assert (out / m.family / m.name / "config.json").is_file()
        assert Path(m.train_file).parent == out / "data" / "train" and Path(m.train_file).is_file()
        assert Path(m.eval_file).parent == out / "data" / "eval" and Path(m.eval_file).is_file()
    # none of the first family's domains or tasks, and the generators are the ones named
    assert not set(bf2.TEXT_DOMAINS) & set(bf.TEXT_DOMAINS)
    assert not set(bf2.SEQ2SEQ_TASKS) & set(bf.SEQ2SEQ_TASKS)
    sql = (out / "data" / "eval" / "mixtral-sql.txt").read_text().rstrip("\n").split("\n\n")
    assert sql == bf.text_docs("sql", SIZE.eval_docs, bf2.SEED + 1, bf2.TEXT_DOMAINS)
    examples = [json.loads(line) for line in (out / "data" / "train" / "switch-rot13.jsonl").read_text().splitlines()]
    assert len(examples) == SIZE.train_pairs
    for ex in examples[:20]:  # rot13 checked against the standard library's codec
        import codecs

        words = ex["input"].removeprefix("rot13: ")
        assert ex["target"] == codecs.encode(words, "rot13")
    sort = json.loads((out / "data" / "eval" / "switch-sort.jsonl").read_text().splitlines()[0])
    assert sort["target"].split() == ["".join(sorted(w)) for w in sort["input"].removeprefix("sort: ").split()]


def test_expert_only_variants_change_nothing_but_experts(family):
    """Read through moeconsol's reader: routers and every non-expert tensor equal the base's."""
    out, _ = family
    for fam, name in [("mixtral", "records"), ("switch", "devowel")]:
        base = Checkpoint("base", "base", out / fam / "base")
        variant = Checkpoint(name, name, out / fam / name)
        for layer in base.moe_layers:
            assert torch.equal(base.read(base.router_name(layer)), variant.read(variant.router_name(layer)))
        moved = [
            not torch.equal(t, variant.expert_part(layer, e, part))
            for layer in base.moe_layers
            for e in range(base.num_experts)
            for part, t in base.expert(layer, e).items()
        ]
        assert any(moved), (fam, name)
        from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

        cls = AutoModelForCausalLM if fam == "mixtral" else SwitchTransformersForConditionalGeneration
        a, b = (cls.from_pretrained(out / fam / n).state_dict() for n in ("base", name))
        changed = {n for n in a if not torch.equal(a[n], b[n])}
        assert changed and all(".experts." in n for n in changed), sorted(n for n in changed if ".experts." not in n)[
            :3
        ]


def test_each_variant_gains_on_its_own_held_out_data(family):
    """The report's losses against transformers' own loss on the held-out files."""
    from transformers import AutoTokenizer, MixtralForCausalLM, SwitchTransformersForConditionalGeneration

    out, report = family
    for m in report.models:
        if m.name == "base":
            continue
        tok = AutoTokenizer.from_pretrained(out / m.family / "base")
        path = Path(m.eval_file)
        losses = []
        for name in ("base", m.name):
            if m.family == "mixtral":
                model = MixtralForCausalLM.from_pretrained(out / "mixtral" / name).eval()
                ids = tok(path.read_text())["input_ids"]
                nll = count = 0.0
                with torch.no_grad():
                    for start in range(0, len(ids), SIZE.seq_len):
                        w = torch.tensor([ids[start : start + SIZE.seq_len]])
                        if w.shape[1] >= 2:
                            nll += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
                            count += w.shape[1] - 1
                losses.append(nll / count)
            else:
                model = SwitchTransformersForConditionalGeneration.from_pretrained(out / "switch" / name).eval()
                pairs = [json.loads(line) for line in path.read_text().splitlines()]
                enc = tok([p["input"] for p in pairs], padding=True, return_tensors="pt")
                lab = tok([p["target"] + "</s>" for p in pairs], padding=True, return_tensors="pt")
                target = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
                with torch.no_grad():
                    losses.append(
                        float(
                            model(
                                input_ids=enc.input_ids,
                                attention_mask=enc.attention_mask,
                                labels=target,
                                output_router_logits=False,
                            ).loss
                        )
                    )
        assert m.base_eval_loss == pytest.approx(losses[0], abs=1e-4)
        assert m.eval_loss == pytest.approx(losses[1], abs=1e-4)
        assert losses[1] < losses[0], f"{m.family}/{m.name}: {losses[1]:.3f} !< base {losses[0]:.3f}"
