"""MXFP4: gpt-oss-20b / -120b releases (transformers' `integrations/mxfp4.py`).

An expert weight `P` (`gate_up_proj`, `down_proj`) is stored as `P_blocks` U8 [E, rows, G, 16]
and `P_scales` U8 [E, rows, G]: row r of expert e holds G groups of 32 E2M1 (FP4) values, two
per byte (element 2k in the low nibble of byte k, 2k + 1 in the high one), each group scaled by
2 ** (scale - 127). The rows are the output features of the weight as transformers holds it
transposed: dequantized, expert e's slice is [rows, 32 G], and its transpose is the bf16
checkpoints' `P[e]` ([H, 2I] for gate_up_proj, gate and up interleaved). Biases stay BF16.
config.json: `quantization_config: {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32
"""Values per scale."""
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""E2M1 code -> value (bit 3 is the sign)."""


def check_config(qc: dict, where: str) -> None:
    """Nothing in an mxfp4 quantization_config changes how its weights are read."""


def units(parts: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Stored expert parts grouped by the weight they hold: `P` -> (`P_blocks`, `P_scales`)."""
    return {p.removesuffix(BLOCKS): (p, p.removesuffix(BLOCKS) + SCALES) for p in parts if p.endswith(BLOCKS)}


def stored_shape(shapes: dict[str, tuple[int, ...]], unit: str) -> tuple[int, int]:
    """(rows, columns) of one expert's dequantized slice, in the stored orientation."""
    rows, groups, nbytes = shapes[unit + BLOCKS]
    return rows, groups * nbytes * 2


def unit_shape(shapes: dict[str, tuple[int, ...]], unit: str) -> tuple[int, ...]:
    """Shape of one expert's slice of the bf16 checkpoints' tensor: the transpose."""
    rows, cols = stored_shape(shapes, unit)
    return cols, rows


def check_pair(blocks: tuple[str, tuple], scales: tuple[str, tuple]) -> str | None:
    """What is wrong with one expert's blocks and scales (dtype, shape), if anything."""
    (bdtype, bshape), (sdtype, sshape) = blocks, scales
    if bdtype != "U8" or sdtype != "U8":
        return f"blocks and scales are {bdtype} and {sdtype}; MXFP4 stores both as U8"
    if len(bshape) != 3 or tuple(bshape[:2]) != tuple(sshape) or bshape[2] * 2 != GROUP:
        return f"blocks {list(bshape)} and scales {list(sshape)} are not [rows, G, 16] and [rows, G]"
    return None


def _decode(codes: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed bytes [n] and one exponent per value [2n] -> 2n values."""
    import torch  # here: io imports no torch until a tensor is read

    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    out = torch.empty(codes.numel() * 2, dtype=dtype)
    out[0::2] = lut[(codes & 0x0F).long()]
    out[1::2] = lut[(codes >> 4).long()]
    return torch.ldexp(out, exponents)


def dequantize(stored: dict[str, torch.Tensor], unit: str, dtype: torch.dtype) -> torch.Tensor:
    """One expert's slice of weight `unit` (the transposed bf16 layout: [H, 2I] for gate_up_proj)."""
    import torch  # here: io imports no torch until a tensor is read

    blocks, scales = stored[unit + BLOCKS], stored[unit + SCALES]
    rows, groups, nbytes = blocks.shape
    exponents = (scales.to(torch.int32) - 127).repeat_interleave(GROUP).reshape(-1)
    values = _decode(blocks.reshape(-1), exponents, torch.float32)
    return values.reshape(rows, groups * nbytes * 2).T.to(dtype)


def values_range(blocks: torch.Tensor, scales: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """float64 values of flat elements lo:hi of one expert's slice in the stored orientation
    ([rows, 32 G], row-major), from bytes lo // 2 .. ceil(hi / 2) of its blocks and its scales
    lo // 32 .. ceil(hi / 32)."""
    import torch  # here: io imports no torch until a tensor is read

    first = (lo // 2) * 2
    idx = torch.arange(first, first + blocks.numel() * 2)
    exponents = scales.to(torch.int32)[idx // GROUP - lo // GROUP] - 127
    return _decode(blocks, exponents, torch.float64)[lo - first : hi - first]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [rows, G, 16], scales [rows, G]) of a [rows, cols] weight (cols a multiple of 32),
    as the OCP MX rule makes them: each group's exponent is floor(log2(max |x|)) - 2, so its
    largest value lands in [4, 8), and every value rounds to the nearest E2M1 value."""
    import torch  # here: io imports no torch until a tensor is read

    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
    exponent = exponent.clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(amax), exponent.int())[..., None]
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
    code = code | ((scaled < 0).long() << 3)
    code = code.to(torch.uint8).reshape(rows, cols // GROUP, GROUP // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)
