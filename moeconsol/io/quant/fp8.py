"""Block FP8: DeepSeek-V3/R1 and Qwen3 `-FP8` releases (transformers' `finegrained_fp8`).

A quantized linear weight `X.weight` is stored as F8_E4M3 codes [rows, cols] beside
`X.weight_scale_inv` [ceil(rows / bm), ceil(cols / bn)] (F32 in DeepSeek's releases, BF16 in
Qwen3's): value[r, c] = code[r, c] * scale_inv[r // bm, c // bn], with the block (bm, bn) of
config.json's `quantization_config.weight_block_size` ([128, 128] in the releases). Tensors the
release leaves unquantized (embeddings, norms, routers, lm_head) have no `_scale_inv`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...errors import CheckpointError

if TYPE_CHECKING:
    import torch

NAME = "fp8"
CODE_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("F32", "BF16", "F16")
WEIGHT = ".weight"
SCALE = ".weight_scale_inv"
FP8_MAX = 448.0
"""The largest finite float8_e4m3fn value."""


def check_config(qc: dict, where: str) -> tuple[int, int]:
    """The block (bm, bn) of a `quant_method: fp8` quantization_config; CheckpointError for the
    variants moeconsol does not read (static activation scales, e5m2, no block)."""
    if qc.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}: fp8 format {qc.get('fmt')!r}; moeconsol reads e4m3 block FP8 only")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"{where}: fp8 with activation_scheme {qc.get('activation_scheme')!r} (stored activation scales); "
            "moeconsol reads dynamic block FP8 only"
        )
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{where}: fp8 quantization_config.weight_block_size is {block!r}; moeconsol reads block FP8 "
            "(weight_block_size [rows, cols], e.g. [128, 128]) only"
        )
    return block[0], block[1]


def units(parts: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Stored expert parts grouped by the weight they hold: `X` -> (`X.weight`, `X.weight_scale_inv`)."""
    return {p.removesuffix(WEIGHT): (p, p.removesuffix(WEIGHT) + SCALE) for p in parts if p.endswith(WEIGHT)}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def check_pair(name: str, code: tuple[str, tuple], scale: tuple[str, tuple], block: tuple[int, int], where: str):
    """Refuse a weight whose codes or scales do not have the dtypes and shapes of block FP8."""
    (cdtype, cshape), (sdtype, sshape) = code, scale
    if cdtype != CODE_DTYPE or len(cshape) != 2:
        raise CheckpointError(f"{where}: {name} is {cdtype} {list(cshape)}; block FP8 stores 2-D {CODE_DTYPE} codes")
    if sdtype not in SCALE_DTYPES or tuple(sshape) != scale_shape(cshape, block):
        raise CheckpointError(
            f"{where}: {name.removesuffix(WEIGHT) + SCALE} is {sdtype} {list(sshape)}; for {list(cshape)} codes in "
            f"blocks of {list(block)} it must be {list(scale_shape(cshape, block))} of {'/'.join(SCALE_DTYPES)}"
        )


def unit_shape(shapes: dict[str, tuple[int, ...]], unit: str) -> tuple[int, ...]:
    return tuple(shapes[unit + WEIGHT])


def dequantize(stored: dict[str, torch.Tensor], unit: str, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The values of weight `unit` from its codes and block scales, computed in float32."""
    return dequantize_weight(stored[unit + WEIGHT], stored[unit + SCALE], block, dtype)


def dequantize_weight(
    code: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """code * scale_inv of its block, computed in float32 (as transformers does), in `dtype`."""
    import torch  # here: io imports no torch until a tensor is read

    rows, cols = code.shape
    bm, bn = block
    s = scale.to(torch.float32).repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (code.to(torch.float32) * s).to(dtype)


def values_range(
    code: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int], lo: int
) -> torch.Tensor:
    """float64 values of flat elements lo : lo + len(code) of a weight of `shape`, from those
    elements' codes and the whole (small) scale grid."""
    import torch  # here: io imports no torch until a tensor is read

    idx = torch.arange(lo, lo + code.numel())
    rows, cols = idx // shape[1], idx % shape[1]
    s = scale.to(torch.float64)[rows // block[0], cols // block[1]]
    return code.to(torch.float64) * s


def quantize(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale_inv) of a 2-D weight, as the releases make them: each block's absolute
    maximum maps to the largest e4m3 value (tests, and fine-tunes brought to the base's format)."""
    import torch  # here: io imports no torch until a tensor is read

    rows, cols = w.shape
    gr, gc = scale_shape((rows, cols), block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.reshape(gr, block[0], gc, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    s = scale.float()[:, None, :, None]
    codes = (tiles / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols]
    return codes.contiguous(), scale
