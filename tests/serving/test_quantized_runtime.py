"""A quantized release served from its artifact: logits equal to transformers' own loading of
the quantized files on CPU (which dequantizes MXFP4 and block FP8 there), for every variant,
in bf16 (the default) and float32; the memory `inspect` states is what the runtime holds."""

from __future__ import annotations

import pytest
import torch
import transformers
from builders import QUANTIZED, quantized_family
from cli_helpers import run_main
from transformers.utils import logging as hf_logging

from moeconsol.artifact.reader import Artifact, summary
from moeconsol.consolidate import merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.runtime import Runtime

IDS = [row[0] for row in QUANTIZED]
IDS_IN = torch.tensor([[1, 5, 9, 12, 40, 7, 33, 2]])


@pytest.fixture(scope="module", params=QUANTIZED, ids=IDS)
def family(request, tmp_path_factory):
    f = quantized_family(tmp_path_factory.mktemp(f"quantized-rt-{request.param[0]}"), request.param)
    root = f["root"]
    merge(open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"]), root / "lossless")
    return f


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_logits_equal_transformers_loading_the_quantized_files(family, dtype):
    root = family["root"]
    runtime = Runtime.from_artifact(root / "lossless", dtype=dtype)
    hf_logging.set_verbosity_error()
    for name in ("ft", "base", "ft"):  # swaps both ways
        runtime.activate(name)
        reference = transformers.AutoModelForCausalLM.from_pretrained(root / name, dtype=dtype).eval()
        with torch.no_grad():
            ours, theirs = runtime.model(input_ids=IDS_IN).logits, reference(input_ids=IDS_IN).logits
        assert torch.equal(ours, theirs), (name, (ours - theirs).abs().max())


def test_the_default_serving_dtype_is_bf16_and_inspect_states_its_bank(family):
    root = family["root"]
    runtime = Runtime.from_artifact(root / "lossless")
    assert runtime.dtype == torch.bfloat16
    q = summary(Artifact.open(root / "lossless"))["quantization"]
    assert runtime.resident_bytes().bank == q["bank_served"]


def test_serve_local_completes_from_a_quantized_release(family):
    root = family["root"]
    result = run_main(
        "serve-local", root / "lossless", "--model", "ft", "--prompt", "The quick", "--max-new-tokens", "3"
    )
    assert result.returncode == 0, result.stderr
