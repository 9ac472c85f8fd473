"""A quantized release's artifact served dequantized: what `VariantSet.from_artifact` reads
in place of the stored codes and scales.

The bank keeps the release's format on disk (`io.quant`); the runtime holds values, as
transformers does on a CPU (it dequantizes both MXFP4 and block FP8 there): each bank expert
is dequantized when it is loaded, to the canonical parts of the unquantized layout, and a
block-FP8 non-expert weight (DeepSeek-V3's attention, shared experts, dense layers) is
dequantized when its variant's tensors are filled. `artifact.overview.quantization_summary`
states the memory that takes (`inspect`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..artifact.reader import Artifact
from ..io import quant

SERVING_DTYPE = torch.bfloat16
"""The default serving dtype of a quantized release: what transformers dequantizes it to."""
_PAIR = "\0"
"""Joins a block-FP8 weight's stored key and its scales' key into the key the runtime reads."""


def bank_values(art: Artifact) -> Callable[[str, int], dict[str, torch.Tensor]]:
    """(layer, bank index) -> the bank expert's values (canonical parts of the unquantized
    layout): dequantized from its stored parts now (float32), or an unquantized fine-tune's
    entry as stored."""
    return lambda layer, k: art.bank_values(layer, k, torch.float32)


def value_keys(tensors: dict[str, str]) -> dict[str, str]:
    """A variant's in-memory name -> stored key, with each block-FP8 weight's key joined to its
    scales' (read by `read_values`) and the scales, which no module holds, left out."""
    out = {}
    for name, key in tensors.items():
        if name.endswith(quant.fp8.SCALE) and name.removesuffix(quant.fp8.SCALE) + quant.fp8.WEIGHT in tensors:
            continue
        scale = tensors.get(name.removesuffix(quant.fp8.WEIGHT) + quant.fp8.SCALE)
        out[name] = key if scale is None or not name.endswith(quant.fp8.WEIGHT) else f"{key}{_PAIR}{scale}"
    return out


def read_values(art: Artifact) -> Callable[[str], torch.Tensor]:
    """Stored key -> tensor; a joined key (`value_keys`) -> the weight dequantized (float32)."""
    q = art.spec.quantization
    assert q is not None

    def read(key: str) -> torch.Tensor:
        if _PAIR not in key:
            return art.read(key)
        assert q.block is not None
        weight, scale = key.split(_PAIR)
        return quant.fp8.dequantize_weight(art.read(weight), art.read(scale), q.block, torch.float32)

    return read
