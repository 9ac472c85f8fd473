"""The example family builder (examples/build_family.py) and the demo script.

One small family is built once for the module; the tests check what the demo relies on:
every model loads with transformers, variants changed exactly what they trained, the
frozen-expert variants share their experts bit for bit with the base, each variant got
better on its own data, files are written in every layout moeconsol reads, and a second
build reuses what is there.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeconsol.io.checkpoint import Checkpoint
from moeconsol.quality.metrics import seq2seq_accuracy

ROOT = Path(__file__).resolve().parents[2]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_family", ROOT / "examples" / "build_family.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_family"] = module
    spec.loader.exec_module(module)
    return module


bf = _load_builder()
VARIANTS = {"mixtral": bf.MIXTRAL_VARIANTS, "switch": bf.SWITCH_VARIANTS}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("family")
    report = bf.build(out, small=True, log=lambda _: None)
    return out, report


def _model_class(family: str):
    from transformers import MixtralForCausalLM, SwitchTransformersForConditionalGeneration

    return MixtralForCausalLM if family == "mixtral" else SwitchTransformersForConditionalGeneration


@pytest.fixture(scope="module")
def models(family):
    """Every model of the family, loaded back with transformers' from_pretrained."""
    out, _ = family
    return {
        (fam, name): _model_class(fam).from_pretrained(out / fam / name).eval()
        for fam, variants in VARIANTS.items()
        for name in ["base", *(v.name for v in variants)]
    }


def _is_router(name: str) -> bool:
    return ".mlp.gate." in name or ".router." in name


def test_every_model_loads_with_transformers_and_shares_one_tokenizer(family, models):
    from transformers import AutoTokenizer

    out, report = family
    assert [(m.family, m.name) for m in report.models] == list(models)
    assert all(m.status == "built" for m in report.models)
    for fam in VARIANTS:
        base_vocab = json.loads((out / fam / "base" / "tokenizer.json").read_text())["model"]["vocab"]
        for v in VARIANTS[fam]:
            tok = AutoTokenizer.from_pretrained(out / fam / v.name)
            assert tok.get_vocab() == base_vocab
            assert tok.pad_token_id == 0
    switch = models[("switch", "base")]
    assert switch.config.decoder_start_token_id == 0 == switch.config.pad_token_id
    # Every model generates with its own config (Switch needs decoder_start_token_id).
    ids = torch.tensor([[5, 6, 7, 2]])
    assert switch.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] >= 2
    assert models[("mixtral", "code")].generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] > 4


def test_files_cover_every_layout_moeconsol_reads(family):
    out, _ = family
    layouts = {
        name: Checkpoint(name, str(out / "mixtral" / name), out / "mixtral" / name).layout.name
        for name in ["base", "code", "math", "story"]
    }
    assert layouts == {"base": "mixtral", "code": "mixtral", "math": "mixtral-fused", "story": "mixtral"}
    for sharded in [out / "mixtral" / "story", out / "switch" / "prefix"]:
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
        assert not (sharded / "model.safetensors").exists()
    assert Checkpoint("p", "p", out / "switch" / "prefix").layout.name == "switch"


@pytest.mark.parametrize("fam", ["mixtral", "switch"])
def test_variants_change_exactly_what_they_trained(models, fam):
    base = models[(fam, "base")].state_dict()
    for v in VARIANTS[fam]:
        variant = models[(fam, v.name)].state_dict()
        assert variant.keys() == base.keys()
        trainable = bf.TRAINABLE[v.trainable]
        changed = {n for n in base if not torch.equal(base[n], variant[n])}
        frozen = {n for n in base if not trainable(n)}
        assert not changed & frozen, f"{v.name}: frozen tensors changed: {sorted(changed & frozen)[:3]}"
        # Every trained non-expert tensor moved; experts move where tokens were routed.
        non_experts = {n for n in base if trainable(n) and ".experts." not in n}
        assert non_experts and non_experts <= changed, f"{v.name}: unchanged {sorted(non_experts - changed)[:3]}"
        assert any(_is_router(n) for n in non_experts)
        if trainable("x.experts.y"):
            assert any(".experts." in n for n in changed), f"{v.name}: no expert changed"


def test_frozen_expert_variants_keep_experts_bit_identical_on_disk(family):
    """Read through moeconsol's own reader: what consolidation will see."""
    out, _ = family
    for fam, name in [("mixtral", "code"), ("switch", "upper")]:
        base = Checkpoint("base", "base", out / fam / "base")
        variant = Checkpoint(name, name, out / fam / name)
        assert variant.moe_layers == base.moe_layers and variant.num_experts == base.num_experts
        for layer in base.moe_layers:
            assert not torch.equal(base.read(base.router_name(layer)), variant.read(variant.router_name(layer)))
            for e in range(base.num_experts):
                for part, tensor in base.expert(layer, e).items():
                    assert torch.equal(tensor, variant.expert_part(layer, e, part)), (fam, name, layer, e, part)
    # The trained-everything variant does not share every expert.
    base, math = (Checkpoint(n, n, out / "mixtral" / n) for n in ["base", "math"])
    assert any(
        not torch.equal(base.expert_part(layer, e, "w1"), math.expert_part(layer, e, "w1"))
        for layer in base.moe_layers
        for e in range(base.num_experts)
    )


def _hf_causal_loss(model, tokenizer, text_file: Path, seq_len: int) -> float:
    """transformers' own loss (it shifts labels itself) on the held-out file as written, cut into
    consecutive windows of seq_len tokens (a last, shorter one kept), token-weighted."""
    ids = tokenizer(text_file.read_text())["input_ids"]
    nll = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            if window.shape[1] >= 2:
                nll += float(model(input_ids=window, labels=window).loss) * (window.shape[1] - 1)
                tokens += window.shape[1] - 1
    return nll / tokens


def _hf_seq2seq_loss(model, tokenizer, jsonl: Path) -> float:
    pairs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    enc = tokenizer([p["input"] for p in pairs], padding=True, return_tensors="pt")
    labels = tokenizer([p["target"] + "</s>" for p in pairs], padding=True, return_tensors="pt")
    target = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
    with torch.no_grad():
        out = model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=target, output_router_logits=False
        )
    return float(out.loss)


def test_each_variant_beats_the_base_on_its_own_held_out_data(family, models):
    from transformers import AutoTokenizer

    out, report = family
    for m in report.models:
        if m.name == "base":
            continue
        eval_file = Path(m.eval_file)
        assert eval_file.parent == out / "data" / "eval"
        tok = AutoTokenizer.from_pretrained(out / m.family / "base")
        if m.family == "mixtral":
            docs = eval_file.read_text().rstrip("\n").split("\n\n")
            assert docs == bf.text_docs(m.data, bf.SMALL.eval_docs, bf.SEED + 1)
            # `moeconsol eval` scores in windows of max_position_embeddings: the training window.
            assert models[(m.family, m.name)].config.max_position_embeddings == bf.SMALL.seq_len
            base_loss, own_loss = (
                _hf_causal_loss(models[(m.family, n)], tok, eval_file, bf.SMALL.seq_len) for n in ["base", m.name]
            )
            assert m.base_eval_accuracy is None and m.eval_accuracy is None
        else:
            assert len(eval_file.read_text().splitlines()) == bf.SMALL.eval_pairs
            base_loss, own_loss = (_hf_seq2seq_loss(models[(m.family, n)], tok, eval_file) for n in ["base", m.name])
            # The accuracy the builder prints is the one the quality sweep measures, per example.
            examples = [json.loads(line) for line in eval_file.read_text().splitlines()]
            base_acc, own_acc = (
                seq2seq_accuracy(models[(m.family, n)], tok, examples, max_new_tokens=1).token_accuracy
                for n in ["base", m.name]
            )
            assert m.base_eval_accuracy == pytest.approx(base_acc, abs=1e-9)
            assert m.eval_accuracy == pytest.approx(own_acc, abs=1e-9)
            assert own_acc > base_acc, f"{m.family}/{m.name}: accuracy {own_acc:.3f} !> base {base_acc:.3f}"
        assert m.base_eval_loss == pytest.approx(base_loss, abs=1e-4)
        assert m.eval_loss == pytest.approx(own_loss, abs=1e-4)
        assert own_loss < base_loss, f"{m.family}/{m.name}: {own_loss:.3f} !< base {base_loss:.3f}"
        assert m.train_loss is not None and m.train_loss > 0


def test_second_build_reuses_models_and_rebuilds_only_what_is_missing(family, tmp_path, capsys):
    out, first = family
    story = out / "mixtral" / "story"
    before = {p.name: p.read_bytes() for p in story.glob("*.safetensors")}
    moved = tmp_path / "story"
    shutil.move(story, moved)

    again = bf.build(out, small=True, log=lambda _: None)
    status = {(m.family, m.name): m.status for m in again.models}
    assert status.pop(("mixtral", "story")) == "built"
    assert set(status.values()) == {"reused"}
    # Seeded: the rebuilt variant is bit-identical to the first build.
    assert {p.name: p.read_bytes() for p in story.glob("*.safetensors")} == before
    for a, b in zip(first.models, again.models):
        assert b.eval_loss == pytest.approx(a.eval_loss, abs=1e-6)
    manifest = json.loads((out / "family.json").read_text())
    assert [m["name"] for m in manifest["models"]] == [m.name for m in first.models]

    assert bf.main(["--out", str(out), "--small"]) == 0
    printed = capsys.readouterr().out
    assert "mixtral/story" in printed and "switch/prefix" in printed and "reused" in printed
    assert "built" not in printed


def test_cli_rejects_a_missing_out_option():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "build_family.py")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--out" in proc.stderr


def _demo(*args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "MOECONSOL": str(Path(sys.executable).parent / "moeconsol"),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "demo.sh"), *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


@pytest.mark.slow
def test_demo_script_runs_the_whole_pipeline(family):
    out, _ = family
    proc = _demo(str(out))
    assert proc.returncode == 0, proc.stderr
    reports = out / "reports"
    for fam in ["mixtral", "switch", "qwen3_moe"]:
        analysis = json.loads((reports / f"{fam}-analyze.json").read_text())
        assert analysis  # written by `moeconsol analyze`, checked in its own tests
        assert (reports / f"{fam}-heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = out / "artifacts"
    for name in [
        "mixtral-lossless",
        "mixtral-budget50",
        "switch-threshold",
        "mixtral-calibrated",
        "qwen3_moe-lossless",
    ]:
        assert (artifacts / name / "manifest.json").is_file(), name
    assert "ok: " in proc.stdout  # `moeconsol verify` of the lossless artifact
    assert (artifacts / "math-exported" / "config.json").is_file()
    assert proc.stdout.count("time to first token") == 4  # serve-local: code, math, upper; Qwen3-MoE b
    merged = json.loads((reports / "mixtral-calibrated-merge.json").read_text())
    b = merged["bytes"]
    assert b["deltas"] > 0 and b["bank"] + b["deltas"] <= 0.3 * b["experts_in"]  # --deltas at 30%, honestly counted
    evaluation = json.loads((reports / "mixtral-eval.json").read_text())
    gains = {v["name"]: v["retained_gain"] for v in evaluation["variants"]}
    assert set(gains) == {"base", "code", "math", "story"}
    assert gains["base"] is None and all(isinstance(gains[n], float) for n in ["code", "math", "story"])


def test_demo_script_refuses_a_directory_without_a_family(tmp_path):
    proc = _demo(str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "build_family.py --out" in proc.stderr
    assert _demo().returncode == 2
