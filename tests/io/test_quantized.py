"""Quantized releases as inputs: MXFP4 gpt-oss and block-FP8 DeepSeek-V3 / Qwen3-MoE.

Each family is a tiny base and a fine-tune written the way the releases are laid out
(`testing.save_quantized`: tensor names, dtypes, scales, quantization_config). Expected
values come from transformers' own loading of the same files on CPU (which dequantizes
both formats there), never from moeconsol's dequantization.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from builders import QUANTIZED, QUANTIZED_OVERRIDES, quantized_family
from cli_helpers import one_error_line, run_main
from transformers.utils import logging as hf_logging

from moeconsol.analysis.similarity import analyze
from moeconsol.errors import CheckpointError, IncompatibleModelsError
from moeconsol.io.checkpoint import check_config, open_checkpoints
from moeconsol.testing import experts_modules, save_model, tiny_model, tiny_tokenizer

IDS = [row[0] for row in QUANTIZED]


@pytest.fixture(scope="module", params=QUANTIZED, ids=IDS)
def family(request, tmp_path_factory):
    f = quantized_family(tmp_path_factory.mktemp(f"quantized-{request.param[0]}"), request.param)
    return f["arch"], f["root"], f["layout"], f["changed"]


def _transformers_experts(path) -> list[torch.Tensor]:
    """Per MoE layer, [E, n] float64: every expert's parameters as transformers loads them
    from the quantized files (dequantized on CPU), concatenated."""
    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    out = []
    for experts in experts_modules(model).values():
        params = [p.detach() for _, p in sorted(experts.named_parameters(recurse=False))]
        out.append(torch.cat([p.reshape(p.shape[0], -1) for p in params], dim=1))
    return out


def test_the_layout_and_the_values_are_transformers(family):
    arch, root, layout, _ = family
    (ckpt,) = open_checkpoints([str(root / "base")])
    assert ckpt.layout.name == layout and ckpt.quantization is not None
    check_config(ckpt)  # the scales are no "tensor the config lacks"
    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    for layer, experts in zip(ckpt.moe_layers, experts_modules(model).values()):
        for e in range(ckpt.num_experts):
            ours = ckpt.values(layer, e)
            if arch == "gpt_oss":  # [H, 2I], gate and up interleaved; transposed weights
                gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
                want = {"gate_proj": gate_up[:, 0::2].T, "up_proj": gate_up[:, 1::2].T, "down_proj": down.T}
                bias = experts.gate_up_proj_bias[e]
                want |= {"gate_proj_bias": bias[0::2][None], "up_proj_bias": bias[1::2][None]}
                want["down_proj_bias"] = experts.down_proj_bias[e][None]
            else:
                gate, up = experts.gate_up_proj[e].chunk(2)
                want = {"gate_proj": gate, "up_proj": up, "down_proj": experts.down_proj[e]}
            assert sorted(ours) == sorted(want)
            for part, tensor in want.items():
                assert torch.equal(ours[part], tensor.detach()), (layer, e, part)


@pytest.mark.parametrize("metrics", [["cosine", "l2", "relative-l2"], ["cosine", "cka"]], ids=["stream", "cka"])
def test_analyze_measures_dequantized_values(family, metrics):
    """cosine from transformers' dequantized experts; identity from the stored bytes."""
    _, root, _, changed = family
    ckpts = open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"])
    ours = list(analyze(ckpts, metrics))
    theirs = [torch.cat(pair) for pair in zip(*(_transformers_experts(root / n) for n in ("base", "ft")))]
    for li, (layer, x) in enumerate(zip(ours, theirs)):
        gram = x @ x.T
        norms = gram.diagonal().sqrt()
        cosine = (gram / torch.outer(norms, norms)).numpy()
        assert np.abs(layer.matrices["cosine"] - cosine).max() < 1e-6
        e = ckpts[0].num_experts
        same = [(i, e + i) for i in range(e) if (li, i) not in changed]
        assert all(layer.identical[i, j] for i, j in same)
        assert layer.identical.sum() == 2 * e + 2 * len(same)


def test_analyze_cli_on_a_quantized_release(family, tmp_path):
    _, root, _, _ = family
    result = run_main("analyze", f"base={root / 'base'}", f"ft={root / 'ft'}", "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["models"] == ["base", "ft"]


def _copy(family, tmp_path, name="base"):
    _, root, _, _ = family
    return shutil.copytree(root / name, tmp_path / name)


def _edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_an_unknown_quant_method_is_refused(family, tmp_path):
    path = _copy(family, tmp_path)
    _edit_config(path, lambda c: c["quantization_config"].update(quant_method="awq"))
    with pytest.raises(CheckpointError, match="quant_method is 'awq'.*fp8, mxfp4"):
        open_checkpoints([str(path)])
    one_error_line(run_main("analyze", str(path)), "awq", "Dequantize the checkpoint first")


def test_quantized_codes_without_a_quantization_config_are_refused(family, tmp_path):
    """Before: analyze reported cosines of the raw codes, ignoring the scales."""
    path = _copy(family, tmp_path)
    _edit_config(path, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        open_checkpoints([str(path)])


def test_static_fp8_activation_scales_are_refused(family, tmp_path):
    arch = family[0]
    if arch == "gpt_oss":
        pytest.skip("block FP8 only")
    path = _copy(family, tmp_path)
    _edit_config(path, lambda c: c["quantization_config"].update(activation_scheme="static"))
    with pytest.raises(CheckpointError, match="activation_scheme 'static'"):
        open_checkpoints([str(path)])


def test_scales_of_the_wrong_shape_are_refused(family, tmp_path):
    arch = family[0]
    path = _copy(family, tmp_path)
    if arch != "gpt_oss":
        _edit_config(path, lambda c: c["quantization_config"].update(weight_block_size=[4, 4]))
        with pytest.raises(CheckpointError, match="weight_scale_inv is .* must be"):
            open_checkpoints([str(path)])
        return
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, 1:].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1 expert 0 down_proj: blocks .* and scales"):
        open_checkpoints([str(path)])


def test_a_quantized_release_beside_unquantized_models_is_named(family, tmp_path):
    """Only an MXFP4 release, listed first, takes unquantized fine-tunes beside it
    (tests/artifact/test_quantized_mixed.py); anything else is refused, saying why."""
    arch, root, _, _ = family
    plain = tiny_model(arch, seed=5, dtype=torch.bfloat16, **QUANTIZED_OVERRIDES.get(arch, {}))
    save_model(plain, tmp_path / "plain", tiny_tokenizer())
    with pytest.raises(IncompatibleModelsError, match="mixed storage.*list the quantized release first"):
        open_checkpoints([f"plain={tmp_path / 'plain'}", f"base={root / 'base'}"])
    if arch == "gpt_oss":
        assert len(open_checkpoints([f"base={root / 'base'}", f"plain={tmp_path / 'plain'}"])) == 2
    else:
        with pytest.raises(IncompatibleModelsError, match="mixed storage.*non-expert weights are quantized too"):
            open_checkpoints([f"base={root / 'base'}", f"plain={tmp_path / 'plain'}"])


def test_block_fp8_dequantizes_by_block_where_dimensions_are_not_multiples():
    """A [20, 40] weight in blocks of 8 x 16: edge blocks are partial (ceil), computed here block by block."""
    from moeconsol.io.quant import fp8

    w = torch.randn(20, 40, generator=torch.Generator().manual_seed(0))
    codes, scale = fp8.quantize(w, (8, 16), torch.float32)
    assert codes.dtype == torch.float8_e4m3fn and tuple(scale.shape) == (3, 3)
    want = torch.empty(20, 40)
    for i in range(3):
        for j in range(3):
            block = codes[i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16].float() * scale[i, j]
            want[i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16] = block
    got = fp8.dequantize_weight(codes, scale, (8, 16), torch.float32)
    assert torch.equal(got, want)
    assert (got - w).abs().max() <= w.abs().max() / 8  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("lo,hi", [(0, 1), (3, 70), (31, 33), (1, 639), (0, 640)])
def test_value_ranges_are_the_flat_dequantized_values(lo, hi):
    """The Gram matrix's column slices start anywhere (odd elements of a packed byte, inside a group)."""
    from moeconsol.io.quant import fp8, mxfp4

    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4.quantize(w)
    full = mxfp4.dequantize({"p_blocks": blocks, "p_scales": scales}, "p", torch.float64).T.reshape(-1)
    part = mxfp4.values_range(
        blocks.reshape(-1)[lo // 2 : -(-hi // 2)], scales.reshape(-1)[lo // 32 : -(-hi // 32)], lo, hi
    )
    assert torch.equal(part, full[lo:hi])
    codes, scale = fp8.quantize(w, (4, 16), torch.bfloat16)
    full = fp8.dequantize_weight(codes, scale, (4, 16), torch.float64).reshape(-1)
    part = fp8.values_range(codes.reshape(-1)[lo:hi], scale, (10, 64), (4, 16), lo)
    assert torch.allclose(part, full[lo:hi], rtol=1e-6, atol=0)
