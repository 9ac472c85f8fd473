"""LoRA adapters served unmerged (`serve-local --adapter NAME=DIR`): the base's weights as
they are, the factors applied in the forward; answers as peft's own model, no swap between
an adapter and its base, refusals in one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from builders import greedy, peft_model, save_adapter
from cli_helpers import one_error_line, run_main
from peft import LoraConfig

from moeconsol import testing as T
from moeconsol.consolidate import merge
from moeconsol.errors import SettingsError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.crossvariant import ServingMode
from moeconsol.serving.engine import GenerationSettings, complete
from moeconsol.serving.runtime import Runtime

MIXTRAL = transformers.MixtralForCausalLM


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """An artifact of the base alone, two adapters on attention (one rsLoRA), one on experts
    and one on the routers."""
    root = tmp_path_factory.mktemp("lora-serving")
    base = T.tiny_mixtral(0)
    T.save_model(base, root / "base", T.tiny_tokenizer())
    save_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "a1", 1)
    config = LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"])
    save_adapter(base, config, root / "a2", 2)
    save_adapter(
        base, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]), root / "ex", 3
    )
    save_adapter(base, LoraConfig(r=2, target_modules=["gate"]), root / "router", 4)  # a module that is no Linear
    merge(open_checkpoints([f"base={root / 'base'}"]), root / "out")
    return root


@torch.no_grad()
def test_unmerged_adapters_answer_as_peft(family):
    root = family
    rt = Runtime.from_artifact(root / "out", adapters={"a1": root / "a1", "a2": root / "a2"})
    assert rt.names == ["base", "a1", "a2"]
    ids = torch.tensor([rt.encode("base", T.SAMPLE_TEXT[:60])])
    refs = {n: peft_model(MIXTRAL, root / "base", root / n, merged=False) for n in ("a1", "a2")}
    refs["base"] = MIXTRAL.from_pretrained(root / "base").eval()
    for name in ("a1", "base", "a2", "a1"):
        report = rt.activate(name)
        assert report.bytes_moved == 0  # an adapter shares its base's weights: nothing is copied
        got, want = rt.model(input_ids=ids).logits, refs[name](input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merged = peft_model(MIXTRAL, root / "base", root / "a1")
    rt.activate("a1")
    torch.testing.assert_close(rt.model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(refs["a1"](input_ids=ids).logits, refs["base"](input_ids=ids).logits, atol=1e-3)
    prompt = rt.encode("a2", "the quick")
    got = complete(rt, "a2", prompt, GenerationSettings(max_new_tokens=8)).token_ids
    assert got == greedy(refs["a2"], prompt, 8)


def test_adapters_cost_their_factors(family):
    root = family
    plain = Runtime.from_artifact(root / "out").resident_bytes()
    rb = Runtime.from_artifact(root / "out", adapters={"a1": root / "a1"}).resident_bytes()
    factors = sum(
        p.numel() * 4
        for n, p in peft_model(MIXTRAL, root / "base", root / "a1", False).named_parameters()
        if "lora_" in n
    )
    assert rb.adapters == factors
    assert (rb.bank, rb.non_expert, rb.host) == (plain.bank, plain.non_expert, plain.host)
    assert rb.total == plain.total + factors


def test_refusals(family):
    root = family
    with pytest.raises(SettingsError, match="adapters on experts are served merged"):
        Runtime.from_artifact(root / "out", adapters={"ex": root / "ex"})
    with pytest.raises(SettingsError, match="only LoRA on Linear modules"):
        Runtime.from_artifact(root / "out", adapters={"router": root / "router"})
    with pytest.raises(SettingsError, match="cross-variant batching"):
        Runtime.from_artifact(root / "out", adapters={"a1": root / "a1"}, mode=ServingMode.CROSS_VARIANT)
    with pytest.raises(SettingsError, match="already a model"):
        Runtime.from_artifact(root / "out", adapters={"base": root / "a1"})
    r = run_main("serve-local", root / "out", "--adapter", f"ex={root / 'ex'}", "--prompt", "hi")
    one_error_line(r, "served merged")


def test_serve_local_one_shot_with_an_adapter(family):
    root = family
    r = run_main(
        "serve-local",
        root / "out",
        "--adapter",
        f"a1={root / 'a1'}",
        "--model",
        "a1",
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [c["model"] for c in out["completions"]] == ["a1"] and len(out["completions"][0]["token_ids"]) == 4
    assert out["resident_bytes"]["adapters"] > 0
