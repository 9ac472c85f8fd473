"""An MXFP4 gpt-oss release beside bf16 fine-tunes of it (made as users make them: loaded by
transformers with `Mxfp4Config(dequantize=True)`, trained, saved in bf16): the fine-tunes'
untouched experts share the release's entries, every export is bit-exact in its own source
format, and every variant serves transformers' own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from builders import QUANTIZED, quantized_family
from cli_helpers import one_error_line, run_main
from transformers.utils import logging as hf_logging

from moeconsol.analysis.similarity import analyze
from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import merge
from moeconsol.errors import IncompatibleModelsError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import derive_variant, experts_modules, save_model, tiny_tokenizer

GPT_OSS = next(row for row in QUANTIZED if row[0] == "gpt_oss")
BF16_CHANGED = [(1, 3)]
NAMES = {"rel": "base", "qft": "ft", "bf": "bf"}
"""artifact model name -> directory under the family's root"""


def _bf16_fine_tune(release, out):
    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        release, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    return save_model(derive_variant(model, 7, BF16_CHANGED, scale=0.05), out, tiny_tokenizer())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    f = quantized_family(tmp_path_factory.mktemp("quantized-mixed"), GPT_OSS)
    root = f["root"]
    _bf16_fine_tune(root / "base", root / "bf")
    merge(open_checkpoints([f"{n}={root / d}" for n, d in NAMES.items()]), root / "mixed")
    return f


def test_untouched_experts_share_the_release_entries(family):
    root = family["root"]
    art = Artifact.open(root / "mixed")
    changed = {*family["changed"], *BF16_CHANGED}
    for li, layer in enumerate(art.layers):
        assert art.bank_size(layer) == 4 + sum(1 for x in changed if x[0] == li)
        values = [k for k in range(art.bank_size(layer)) if art.stored_as_values(layer, k)]
        assert len(values) == sum(1 for x in BF16_CHANGED if x[0] == li)
        slots = art.slot_map("bf", layer)
        for e in range(4):  # the bf16 fine-tune's untouched experts are the release's entries
            assert art.stored_as_values(layer, slots[e]) == ((li, e) in BF16_CHANGED)
            if (li, e) not in changed:
                assert slots[e] == art.slot_map("rel", layer)[e]
    assert verify_artifact(root / "mixed") == []


@pytest.mark.parametrize("name", list(NAMES))
def test_every_export_is_bit_exact_in_its_own_format(family, name, tmp_path):
    root = family["root"]
    out = export_model(root / "mixed", name, tmp_path / name)
    for src in sorted((root / NAMES[name]).iterdir()):
        assert (out / src.name).read_bytes() == src.read_bytes(), src.name


def test_every_variant_serves_transformers_logits(family):
    root = family["root"]
    runtime = Runtime.from_artifact(root / "mixed")
    ids = torch.tensor([[1, 5, 9, 12, 40, 7, 33, 2]])
    hf_logging.set_verbosity_error()
    for name in ("bf", "rel", "qft", "bf"):
        runtime.activate(name)
        ref = transformers.AutoModelForCausalLM.from_pretrained(root / NAMES[name], dtype=torch.bfloat16).eval()
        with torch.no_grad():
            assert torch.equal(runtime.model(input_ids=ids).logits, ref(input_ids=ids).logits), name


def test_analyze_compares_values_across_storages(family):
    root = family["root"]
    ckpts = open_checkpoints([f"{n}={root / d}" for n, d in NAMES.items()])
    (first, *_) = analyze(ckpts, ["cosine"])
    hf_logging.set_verbosity_error()
    flat = []
    for d in NAMES.values():
        model = transformers.AutoModelForCausalLM.from_pretrained(root / d, dtype=torch.float64)
        experts = next(iter(experts_modules(model).values()))
        params = [p.detach() for _, p in sorted(experts.named_parameters(recurse=False))]
        flat.append(torch.cat([p.reshape(p.shape[0], -1) for p in params], dim=1))
    x = torch.cat(flat)
    gram = x @ x.T
    cosine = (gram / torch.outer(gram.diagonal().sqrt(), gram.diagonal().sqrt())).numpy()
    assert np.abs(first.matrices["cosine"] - cosine).max() < 1e-6
    assert first.identical[0, 8] and first.identical[1, 9]  # release expert e == bf16 expert e, left alone


def test_only_lossless_and_the_release_first(family, tmp_path):
    root = family["root"]
    args = [f"{n}={root / d}" for n, d in NAMES.items()]
    result = run_main("merge", *args, "-o", tmp_path / "x", "--mode", "threshold", "--threshold", "0.9")
    one_error_line(result, "mode lossless only")
    with pytest.raises(IncompatibleModelsError, match="list the quantized release first"):
        open_checkpoints([f"bf={root / 'bf'}", f"rel={root / 'base'}"])


def test_a_block_fp8_release_beside_an_unquantized_model_is_refused(tmp_path):
    row = next(r for r in QUANTIZED if r[0] == "qwen3_moe")
    f = quantized_family(tmp_path, row)
    save_model(f["base_model"], tmp_path / "plain", tiny_tokenizer())
    with pytest.raises(IncompatibleModelsError, match="non-expert weights are quantized too"):
        open_checkpoints([f"rel={tmp_path / 'base'}", f"plain={tmp_path / 'plain'}"])
