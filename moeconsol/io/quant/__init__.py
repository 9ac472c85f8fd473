"""Quantized releases as inputs: one module per format (`fp8`: block FP8, `mxfp4`: gpt-oss).

A quantized checkpoint's layout (`Layout.quant`) names what is *stored*: an expert's parts are
its codes and scales, byte ranges like any other, so identity (digests), lossless sharing and
export work on the stored bytes, scales included, and bit for bit. Its *values* are those of the
layout `Layout.base`, computed here: stored parts are grouped into units (one weight: its codes
and its scales; an unquantized part, such as gpt-oss's biases, is a unit of its own), and each
unit dequantizes to what the unquantized layout stores in its place (a per-expert weight, or an
expert's slice of a fused tensor). The formats are told apart by config.json's
`quantization_config.quant_method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...architectures.layouts import Layout, split
from ...errors import CheckpointError
from ..safetensors_file import ITEMSIZE, TensorInfo, read_tensor
from . import fp8, mxfp4

if TYPE_CHECKING:
    import torch

FORMATS = {fp8.NAME: fp8, mxfp4.NAME: mxfp4}


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's weights are quantized (from its config.json)."""

    method: str
    """`FORMATS` key: the quantization_config's `quant_method`."""
    block: tuple[int, int] | None = None
    """Block FP8's (rows, cols) per scale."""


def read_quantization(config: dict, where: str) -> Quantization | None:
    """The quantization of a checkpoint from its config (None: not quantized); CheckpointError
    for a method or variant moeconsol does not read."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {method!r}; moeconsol reads MXFP4 (gpt-oss) and block "
            f"FP8 (DeepSeek-V3, Qwen3 -FP8) releases: {', '.join(FORMATS)}. Dequantize the checkpoint first "
            "(load it with transformers, save_pretrained) to consolidate it"
        )
    if method == fp8.NAME:
        return Quantization(method, fp8.check_config(qc, where))
    FORMATS[method].check_config(qc, where)
    return Quantization(method)


def units(q: Quantization, parts: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Unit -> the stored parts it is made of, in `parts` order of the first part of each."""
    grouped = FORMATS[q.method].units(parts)
    inside = {p for ps in grouped.values() for p in ps}
    out: dict[str, tuple[str, ...]] = {}
    for p in parts:
        unit = next((u for u, ps in grouped.items() if ps[0] == p), None)
        if unit is not None:
            out[unit] = grouped[unit]
        elif p not in inside:
            out[p] = (p,)
    return out


def unit_shape(q: Quantization, shapes: dict[str, tuple[int, ...]], unit: str, parts: tuple[str, ...]) -> tuple:
    """Shape of a unit's values, from its stored parts' shapes."""
    if len(parts) == 1:
        return tuple(shapes[parts[0]])
    return FORMATS[q.method].unit_shape(shapes, unit)


def dequantize(
    q: Quantization, stored: dict[str, torch.Tensor], unit: str, parts: tuple[str, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A unit's values in `dtype`, from its stored parts' tensors."""
    if len(parts) == 1:
        return stored[parts[0]].to(dtype)
    if q.method == fp8.NAME:
        assert q.block is not None
        return fp8.dequantize(stored, unit, q.block, dtype)
    return mxfp4.dequantize(stored, unit, dtype)


def _bytes(info: TensorInfo, dtype: str, lo: int, hi: int) -> torch.Tensor:
    """Bytes lo:hi of a tensor's range, read as a 1-D tensor of `dtype`."""
    return read_tensor(TensorInfo(info.file, dtype, ((hi - lo) // ITEMSIZE[dtype],), info.start + lo, info.start + hi))


def values_range(
    q: Quantization, infos: dict[str, TensorInfo], unit: str, parts: tuple[str, ...], lo: int, hi: int
) -> torch.Tensor:
    """float64 values of flat elements lo:hi of one expert's unit, read from its byte ranges (a
    few MiB, never the whole expert), in the stored orientation: the same order for every
    expert stored in one format, which is all the Gram matrix of the experts asks."""
    import torch  # here: io imports no torch until a tensor is read

    if len(parts) == 1:
        info = infos[parts[0]]
        size = ITEMSIZE[info.dtype]
        return _bytes(info, info.dtype, lo * size, hi * size).to(torch.float64)
    if q.method == fp8.NAME:
        assert q.block is not None
        code = infos[unit + fp8.WEIGHT]
        return fp8.values_range(
            _bytes(code, fp8.CODE_DTYPE, lo, hi), read_tensor(infos[unit + fp8.SCALE]), code.shape, q.block, lo
        )
    blocks, scales = infos[unit + mxfp4.BLOCKS], infos[unit + mxfp4.SCALES]
    return mxfp4.values_range(
        _bytes(blocks, "U8", lo // 2, -(-hi // 2)),
        _bytes(scales, "U8", lo // mxfp4.GROUP, -(-hi // mxfp4.GROUP)),
        lo,
        hi,
    )


def values(
    q: Quantization, parts: tuple[str, ...], base: Layout, stored: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One expert's values as the canonical parts of the unquantized layout `base`, from its
    stored parts (`parts`, a quantized layout's): each unit dequantized, then split as `base`
    splits its fused slices. The one definition analysis, calibration and the runtime share."""
    out = {u: dequantize(q, stored, u, ps, dtype) for u, ps in units(q, parts).items()}
    if not base.fused_parts:
        return {p: out[p] for p in base.parts}
    split_parts: dict[str, torch.Tensor] = {}
    for fused, names in base.fused_parts.items():
        split_parts.update(zip(names, (t.contiguous() for t in split(base.fused_codec, out[fused], len(names)))))
    return {p: split_parts[p] for p in base.parts}
