"""LoRA adapters (peft) as variants: the consolidated variant is peft's own merge_and_unload
model, bit for bit; an adapter that touches no expert adds nothing to the bank; what is not
supported is refused in one line."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from builders import peft_model, save_adapter
from cli_helpers import one_error_line, run_main
from peft import LoraConfig

from moeconsol import testing as T
from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.consolidate import merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.quality.evaluate import eval_artifact
from moeconsol.quality.metrics import DEFAULT_CHUNK_LEN, perplexity
from moeconsol.serving.runtime import Runtime

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def same_weights(a, b) -> list[str]:
    """Names of the tensors that differ (bitwise) between two models' state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Mixtral base, an adapter on attention only and one on attention and the fused
    experts (rsLoRA), merged losslessly with the base."""
    root = tmp_path_factory.mktemp("lora")
    tok = T.tiny_tokenizer()
    base = T.tiny_mixtral(0)
    T.save_model(base, root / "base", tok)
    configs = {
        "attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "experts": LoraConfig(
            r=2, lora_alpha=16, use_rslora=True, target_modules=["o_proj"], target_parameters=EXPERTS
        ),
    }
    for i, (name, config) in enumerate(configs.items()):
        save_adapter(base, config, root / name, seed=i + 1)
    models = [f"{n}={root / n}" for n in ("base", *configs)]
    merge(open_checkpoints(models), root / "out")
    refs = {n: peft_model(transformers.MixtralForCausalLM, root / "base", root / n) for n in configs}
    refs["base"] = transformers.MixtralForCausalLM.from_pretrained(root / "base").eval()
    return root, refs, tok


@torch.no_grad()
def test_served_variants_answer_as_peft_merge_and_unload(family):
    root, refs, tok = family
    rt = Runtime.from_artifact(root / "out")
    ids = torch.tensor([tok(T.SAMPLE_TEXT[:80])["input_ids"]])
    for name in ("attn", "experts", "base", "experts", "attn"):
        rt.activate(name)
        assert torch.equal(rt.model(input_ids=ids).logits, refs[name](input_ids=ids).logits), name
    for name in ("attn", "experts"):  # the adapters change the answers: the equality is not vacuous
        assert not torch.allclose(refs[name](input_ids=ids).logits, refs["base"](input_ids=ids).logits, atol=1e-3)


def test_exported_variant_is_peft_merged_model_bit_for_bit(family, tmp_path):
    root, refs, _ = family
    for name in ("attn", "experts"):
        export_model(root / "out", name, tmp_path / name)
        assert same_weights(transformers.MixtralForCausalLM.from_pretrained(tmp_path / name), refs[name]) == []


def test_adapter_on_attention_only_leaves_the_bank_the_bases(family, tmp_path):
    root, _, _ = family
    merge(open_checkpoints([f"base={root / 'base'}", f"attn={root / 'attn'}"]), tmp_path / "out")
    art = Artifact.open(tmp_path / "out")
    for layer in art.spec.layers:  # every slot of the adapter variant is served by the base's own expert
        assert len(layer.bank) == 4 and layer.slot_map["attn"] == layer.slot_map["base"]
    # the adapter on the experts does add experts of its own
    assert all(len(layer.bank) == 8 for layer in Artifact.open(root / "out").spec.layers)


@pytest.mark.parametrize("dtype, fused", [(torch.bfloat16, False), (torch.float32, True)])
def test_bf16_and_fused_bases(tmp_path, dtype, fused):
    """A bfloat16 base (peft merges in float32 on the CPU, then casts) and a base saved in
    the fused layout (each expert's part is a slice of one tensor on disk)."""
    base = T.tiny_mixtral(5, dtype=dtype)
    T.save_model(base, tmp_path / "base", fused=fused)
    save_adapter(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], target_parameters=EXPERTS), tmp_path / "ad", 3
    )
    merge(open_checkpoints([f"base={tmp_path / 'base'}", f"ad={tmp_path / 'ad'}"]), tmp_path / "out")
    export_model(tmp_path / "out", "ad", tmp_path / "exp")
    ref = peft_model(transformers.MixtralForCausalLM, tmp_path / "base", tmp_path / "ad")
    assert same_weights(transformers.MixtralForCausalLM.from_pretrained(tmp_path / "exp"), ref) == []


def test_linear_experts_of_switch(tmp_path):
    """Switch Transformers' experts are Linear modules: target_modules reaches them."""
    base = T.tiny_switch(0)
    T.save_model(base, tmp_path / "base")
    save_adapter(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "wi", "wo"]), tmp_path / "ad", 4)
    ckpts = open_checkpoints([f"base={tmp_path / 'base'}", f"ad={tmp_path / 'ad'}"])
    merge(ckpts, tmp_path / "out")
    export_model(tmp_path / "out", "ad", tmp_path / "exp")
    cls = transformers.SwitchTransformersForConditionalGeneration
    ref = peft_model(cls, tmp_path / "base", tmp_path / "ad")
    assert same_weights(cls.from_pretrained(tmp_path / "exp"), ref) == []


def test_load_model_is_the_merged_model(family):
    """Calibration and CKA probes load the whole variant: the base with the adapter merged."""
    root, refs, _ = family
    ckpt = open_checkpoints([f"base={root / 'base'}", f"experts={root / 'experts'}"])[1]
    assert same_weights(ckpt.load_model(transformers.MixtralForCausalLM), refs["experts"]) == []


def test_eval_scores_the_adapter_variant_on_its_base(family, tmp_path):
    """`moeconsol eval`'s originals of adapter variants: base + adapter, as merge read them."""
    root, refs, tok = family
    text = tmp_path / "text.txt"
    text.write_text(T.SAMPLE_TEXT)
    report = eval_artifact(root / "out", {"attn": str(text), "experts": str(text)})
    for row in report.variants:
        chunk = min(DEFAULT_CHUNK_LEN, refs[row.name].config.max_position_embeddings)
        want = perplexity(refs[row.name], tok, T.SAMPLE_TEXT, chunk, None).perplexity
        assert row.original == pytest.approx(want, rel=1e-6) and row.consolidated == pytest.approx(want, rel=1e-6)


def test_scratch_file_goes_with_the_variant(family):
    root, _, _ = family
    ckpt = open_checkpoints([f"base={root / 'base'}", f"attn={root / 'attn'}"])[1]
    scratch = next(info.file for info in ckpt.tensors.values() if info.file.name == "adapted.safetensors").parent
    assert scratch.is_dir()
    del ckpt
    gc.collect()
    assert not scratch.exists()


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"lora_alpha": "eight"}, "lora_alpha must be a number"),
    ],
)
def test_unsupported_adapters_are_refused(family, tmp_path, changes, fragment):
    root, _, _ = family
    bad = _edit_config(root / "attn", tmp_path / "bad", **changes)
    r = run_main("merge", f"base={root / 'base'}", f"bad={bad}", "-o", tmp_path / "out")
    one_error_line(r, fragment)
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_weights_are_refused(family, tmp_path):
    root, _, _ = family
    bad = shutil.copytree(root / "attn", tmp_path / "bad")
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    one_error_line(run_main("analyze", f"base={root / 'base'}", f"bad={bad}"), "never unpickles")


def test_adapter_needs_its_base_in_the_command(family, tmp_path):
    root, _, _ = family
    one_error_line(run_main("analyze", f"attn={root / 'attn'}", f"experts={root / 'experts'}"), "base model")
    other = shutil.copytree(root / "base", tmp_path / "other")
    r = run_main("analyze", f"base={root / 'base'}", f"other={other}", f"attn={root / 'attn'}")
    one_error_line(r, "base_model_name_or_path")
    named = _edit_config(root / "attn", tmp_path / "named", base_model_name_or_path="other")
    assert run_main("analyze", f"base={root / 'base'}", f"other={other}", f"named={named}").returncode == 0
    r = run_main("merge", f"base={root / 'base'}", f"other={other}", f"named={named}", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    assert [m["name"] for m in json.loads(r.stdout)["models"]] == ["base", "other", "named"]


def test_adapter_for_another_model_is_refused(family, tmp_path):
    root, _, _ = family
    small = T.tiny_mixtral(0, hidden_size=16, intermediate_size=32, head_dim=4)
    save_adapter(small, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "small", 1)
    one_error_line(run_main("analyze", f"base={root / 'base'}", f"small={tmp_path / 'small'}"), "do not fit")
