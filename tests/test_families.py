"""Every architecture of the registry, one row each, through every round trip.

`FAMILIES` drives this module (as peft drives its tests from `TEST_CASES`): for each row a
tiny base and two fine-tuned variants are built with transformers' own classes
(`testing.tiny_model`) and written by its own `save_pretrained` (the base sharded, variant
`b` in the fused layout where the family has one). Expected values come from transformers'
models loaded from those checkpoints and from their bytes, never from moeconsol.
Adding a family = one record in `layouts.ARCHITECTURES` + one row here.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from cli_helpers import run_main

from moeconsol.analysis.similarity import gaussian_probes, layer_similarity
from moeconsol.architectures.layouts import ARCHITECTURES, architecture
from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.quality.evaluate import EvalSettings, eval_artifact, sweep
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import SAMPLE_TEXT, derive_variant, experts_modules, save_model, tiny_model, tiny_tokenizer

FAMILIES = [
    # architecture, experts changed by variant a, by variant b: (moe layer index, expert)
    ("mixtral", [(0, 1)], [(0, 1), (1, 3)]),
    ("switch_transformers", [(0, 2)], [(1, 0)]),
    ("qwen2_moe", [(0, 1)], [(1, 2)]),
    ("qwen3_moe", [(0, 1), (1, 1)], [(1, 2)]),
    ("olmoe", [(0, 3)], [(0, 3), (1, 0)]),
    ("deepseek_v2", [(0, 1)], [(1, 2)]),
    ("deepseek_v3", [(0, 0)], [(1, 3)]),
    ("gpt_oss", [(0, 1)], [(0, 1), (1, 2)]),
]
IDS = [row[0] for row in FAMILIES]


def test_the_table_covers_the_registry():
    assert sorted(IDS) == sorted(a.name for a in ARCHITECTURES)


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request, tmp_path_factory):
    arch, changed_a, changed_b = request.param
    root = tmp_path_factory.mktemp(arch)
    tok = tiny_tokenizer()
    base = tiny_model(arch, seed=11)
    models = {
        "base": base,
        "a": derive_variant(base, 1, changed_a, scale=0.05),
        "b": derive_variant(base, 2, changed_b, scale=0.05),
    }
    fused = len(architecture(arch).layouts) > 1
    save_model(base, root / "base", tok, max_shard_size="60KB")
    save_model(models["a"], root / "a", tok)
    save_model(models["b"], root / "b", tok, fused=fused)
    examples = [{"input": "copy: fox dog", "target": "fox dog"}, {"input": "upper: cat", "target": "CAT"}]
    for name in models:
        (root / f"{name}.txt").write_text(SAMPLE_TEXT if name != "b" else SAMPLE_TEXT[::-1])
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in (examples if name != "b" else examples[::-1]))
        )
    merge(open_checkpoints([f"{n}={root / n}" for n in models]), root / "lossless")
    changed = {(li, e) for li, e in changed_a} | {(li, e) for li, e in changed_b}
    return arch, root, models, changed


def _inputs(arch: str) -> dict:
    ids = torch.tensor([[1, 5, 9, 12, 40, 7, 33, 2]])
    return dict(input_ids=ids, decoder_input_ids=ids) if architecture(arch).encoder_decoder else dict(input_ids=ids)


def _expert_output(model, li: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of MoE layer li applied to x by transformers' own experts module."""
    experts = list(experts_modules(model).values())[li]
    if hasattr(experts, f"expert_{e}"):
        return experts[f"expert_{e}"](x)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    return experts(x, torch.full((x.shape[0], 1), e), ones)


def _cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    ka, kb = a @ a.T, b @ b.T
    return float((ka * kb).sum() / (ka.norm() * kb.norm()))


def test_analyze_every_metric_against_transformers_experts(family):
    arch, root, models, changed = family
    ckpts = open_checkpoints([f"{n}={root / n}" for n in models])
    E = ckpts[0].num_experts
    for li, layer in enumerate(ckpts[0].moe_layers):
        probes = gaussian_probes(ckpts[0].expert_shape(ckpts[0].layout.parts[0])[1], 64, seed=li)
        sim = layer_similarity(ckpts, layer, ["cosine", "l2", "relative-l2", "cka"], probes)
        for e in range(E):
            i, j = 0 * E + e, 1 * E + e  # base vs a, same index
            same = (li, e) not in _changed_by(family, "a")
            assert (sim.matrices["cosine"][i, j] == 1.0) == same
            assert (sim.matrices["l2"][i, j] == 0.0) == same
        # CKA of base expert 0 vs variant a's expert 1: from transformers' own expert outputs
        # (float32: its grouped matmul takes no float64; moeconsol computes in float64)
        with torch.no_grad():
            ya = _expert_output(models["base"], li, 0, probes.float()).double()
            yb = _expert_output(models["a"], li, 1, probes.float()).double()
        assert sim.matrices["cka"][0, E + 1] == pytest.approx(_cka(ya, yb), rel=1e-5)


def _changed_by(family, name: str) -> set:
    arch = family[0]
    row = next(r for r in FAMILIES if r[0] == arch)
    return set(row[1] if name == "a" else row[2])


def test_analyze_cli_writes_a_report(family, tmp_path):
    arch, root, models, changed = family
    r = run_main(
        "analyze", *(f"{n}={root / n}" for n in models), "--json", tmp_path / "r.json", "--heatmap", tmp_path / "h.png"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["architecture"] == arch and (tmp_path / "h.png").stat().st_size > 0


def test_lossless_merge_stores_exactly_the_distinct_experts(family):
    arch, root, models, changed = family
    art = Artifact.open(root / "lossless")
    E = art.experts_per_layer
    edits = [*_changed_by(family, "a"), *_changed_by(family, "b")]  # each a distinct new expert
    for li, layer in enumerate(art.layers):
        assert art.bank_size(layer) == E + sum(1 for c_li, _ in edits if c_li == li)
    assert verify_artifact(root / "lossless") == []


def test_export_is_bit_exact_with_the_source_shards(family, tmp_path):
    arch, root, models, changed = family
    for name in models:
        out = export_model(root / "lossless", name, tmp_path / name)
        source = sorted(p.name for p in (root / name).glob("*.safetensors*"))
        assert sorted(p.name for p in out.glob("*.safetensors*")) == source
        for f in source:
            assert (out / f).read_bytes() == (root / name / f).read_bytes(), f


def test_inspect_and_verify_cli(family):
    arch, root, models, changed = family
    assert run_main("verify", root / "lossless").returncode == 0
    r = run_main("inspect", root / "lossless")
    assert r.returncode == 0 and arch in r.stdout


def test_runtime_logits_equal_transformers_from_the_source(family):
    arch, root, models, changed = family
    runtime = Runtime.from_artifact(root / "lossless")
    cls = getattr(transformers, architecture(arch).model_class)
    for name in ("b", "base", "a"):
        runtime.activate(name)
        ref = cls.from_pretrained(str(root / name)).eval()
        with torch.no_grad():
            assert torch.equal(runtime.model(**_inputs(arch)).logits, ref(**_inputs(arch)).logits), name


@pytest.mark.parametrize("family", FAMILIES, ids=IDS, indirect=True)
def test_bfloat16_runtime_equals_transformers_in_bfloat16(family):
    """from_pretrained(dtype=bfloat16) keeps some tensors in float32 (DeepSeek-V3's router
    weight and e_score_correction_bias): so does the runtime, with a float32 flat buffer."""
    arch, root, models, changed = family
    runtime = Runtime.from_artifact(root / "lossless", dtype=torch.bfloat16)
    cls = getattr(transformers, architecture(arch).model_class)
    for name in ("a", "base"):
        runtime.activate(name)
        ref = cls.from_pretrained(str(root / name), dtype=torch.bfloat16).eval()
        ours = runtime.model.state_dict()
        kept = [n for n, t in ref.state_dict().items() if t.dtype == torch.float32]  # DeepSeek-V3's router
        assert all(ours[n].dtype == torch.float32 for n in kept)
        with torch.no_grad():
            assert torch.equal(runtime.model(**_inputs(arch)).logits, ref(**_inputs(arch)).logits), name


def test_every_merge_mode_serves_and_eval_sweep_score_it(family, tmp_path):
    arch, root, models, changed = family
    refs = [f"{n}={root / n}" for n in ("a", "b")]
    suffix = "jsonl" if architecture(arch).encoder_decoder else "txt"
    data = {n: str(root / f"{n}.{suffix}") for n in ("a", "b")}
    settings = EvalSettings(chunk_len=16)
    # threshold at cosine 1.0 is lossless sharing
    merge(open_checkpoints(refs), tmp_path / "t", MergeSettings(mode="threshold", metric="cosine", threshold=1.0))
    lossless = merge(open_checkpoints(refs), tmp_path / "l")

    def banks(path):  # lossless also records each entry's digest (what `add` hashes against)
        return [replace(x, bank=[replace(b, digest=None) for b in x.bank]) for x in Artifact.open(path).spec.layers]

    assert banks(tmp_path / "t") == banks(tmp_path / "l")
    # eval of a lossless artifact: the consolidated scores are the originals'
    report = eval_artifact(tmp_path / "l", data, base=str(root / "base"), settings=settings)
    for v in report.variants:
        assert v.consolidated == v.original
    del lossless
    # sweep: every other mode at one budget, merged, served and scored
    calibration = {n: str(root / f"{n}.txt") for n in ("a", "b")}
    methods = ["reference", "budget", "calibrated", "average", "task-arithmetic", "ties"]
    s = sweep(
        refs,
        data,
        [0.75],
        base=str(root / "base"),
        calibration=calibration,
        methods=methods,
        settings=settings,
        workdir=tmp_path,
    )
    assert sorted({p.method for p in s.points}) == sorted(methods)
    for p in s.points:
        assert p.error is None, (p.method, p.error)
        assert all(math.isfinite(q) for q in p.quality.values()), p.method
    assert np.isfinite(list(s.original.values())).all()


def test_serve_local_completion_equals_transformers(family):
    from fastapi.testclient import TestClient

    from moeconsol.serving.server import create_app

    arch, root, models, changed = family
    runtime = Runtime.from_artifact(root / "lossless")
    tok = tiny_tokenizer()
    cls = getattr(transformers, architecture(arch).model_class)
    with TestClient(create_app(runtime, max_wait=5.0)) as client:
        for name in ("a", "b"):
            r = client.post(
                "/v1/completions", json={"model": name, "prompt": "Once upon", "max_tokens": 4, "temperature": 0}
            )
            assert r.status_code == 200, r.text
            ref = cls.from_pretrained(str(root / name)).eval()
            x = torch.tensor([tok("Once upon")["input_ids"]])
            out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
            new = out[0, 1:] if architecture(arch).encoder_decoder else out[0, x.shape[1] :]
            assert r.json()["choices"][0]["text"] == tok.decode(new.tolist(), skip_special_tokens=True)


def test_report_at_real_expert_counts_is_a_per_layer_summary(tmp_path):
    """Qwen3-30B-A3B's 128 experts per layer (2 layers, tiny sizes): the JSON and the picture
    summarise per layer (same-index profile, shareable counts) unless full matrices are asked for."""
    import matplotlib.image

    kw = dict(
        num_experts=128,
        num_experts_per_tok=8,
        hidden_size=16,
        moe_intermediate_size=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    base = tiny_model("qwen3_moe", seed=0, **kw)
    changed = [(0, e) for e in range(0, 128, 4)] + [(1, 5)]
    save_model(base, tmp_path / "base")
    save_model(derive_variant(base, 1, changed, scale=0.05), tmp_path / "ft")
    models = [f"base={tmp_path / 'base'}", f"ft={tmp_path / 'ft'}"]
    r = run_main("analyze", *models, "--json", tmp_path / "r.json", "--heatmap", tmp_path / "h.png")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [x["matrix"] for x in doc["metrics"]["cosine"]["layers"]] == [None, None]
    for li, summary in enumerate(doc["summary"]):
        profile = summary["same_index"]["cosine"]
        edited = {e for c_li, e in changed if c_li == li}
        assert len(profile) == 128 and [e for e, v in enumerate(profile) if v != 1.0] == sorted(edited)
        assert summary["shared"][0] == {"rule": "identical", "experts": 128 - len(edited)}
    height, width = matplotlib.image.imread(tmp_path / "h.png").shape[:2]
    assert width <= 1600 and height <= 1600
    r = run_main("analyze", *models, "--json", tmp_path / "full.json", "--full-matrices")
    assert r.returncode == 0, r.stderr
    matrix = json.loads((tmp_path / "full.json").read_text())["metrics"]["cosine"]["layers"][0]["matrix"]
    assert len(matrix) == 256 and len(matrix[0]) == 256


def test_unsupported_message_names_every_family_of_the_registry(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    r = run_main("analyze", tmp_path, tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    for a in ARCHITECTURES:
        assert a.label in r.stderr
