"""Reading safetensors files one tensor at a time, without mmap.

`safetensors.safe_open` maps the whole file: every page it touches stays in the process's
resident set until the handle is closed, so reading a 93 GB checkpoint tensor by tensor
through one handle makes RSS climb towards 93 GB. Here the header is parsed once and each
tensor is read with `os.pread` into a fresh buffer that is freed when the tensor is, so
memory follows what the caller holds, not what it has read. The header is validated
(offsets inside the file, sizes matching shapes) so a truncated or corrupt file is refused
with a clear message before any work starts. Nothing here can unpickle.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SafetensorsError
from .safety import is_regular_file

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
"""Bytes per element of each safetensors dtype this module reads: header checks need no torch."""


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Safetensors dtype name -> torch dtype (imports torch)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


@cache
def dtype_names() -> dict[torch.dtype, str]:
    """Torch dtype -> safetensors dtype name: the inverse of `torch_dtypes` (imports torch)."""
    return {v: k for k, v in torch_dtypes().items()}


_MAX_HEADER = 100_000_000
CHUNK_BYTES = 8 << 20
"""Size of the reused buffer `iter_chunks` streams bytes through."""
_buffers = threading.local()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors by name, `__metadata__`).

    Refused as the safetensors library refuses them: a file that is not a regular file
    (a FIFO would block), a header longer than the file or not a JSON object, an entry
    without a known dtype, a shape of non-negative integers and two integer offsets, a size
    that does not match the shape, tensors that overlap, leave gaps or do not end exactly
    at the end of the file, and a `__metadata__` that is not an object of strings.
    """
    if not is_regular_file(path):
        raise SafetensorsError(f"{path}: not a regular file (a FIFO, device or directory); expected a safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{path}: not a safetensors file or truncated (header length {header_len} > file)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header (not JSON)") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _metadata(path, header.pop("__metadata__", None))
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype, shape, start, end = _entry(path, name, entry)
        if end - start != math.prod(shape) * ITEMSIZE[dtype]:
            raise SafetensorsError(
                f"{path}: corrupt safetensors header: {name!r} has {end - start} bytes for shape {list(shape)}"
            )
        if base + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        tensors[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    _check_layout(path, tensors, base, size)
    return tensors, metadata


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, types checked."""
    bad = SafetensorsError(
        f"{path}: corrupt safetensors header entry for {name!r}: expected "
        '{"dtype": one of ' + ", ".join(ITEMSIZE) + ', "shape": [non-negative integers], "data_offsets": [start, end]}'
    )
    if not isinstance(entry, dict):
        raise bad
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (
        not isinstance(dtype, str)
        or dtype not in ITEMSIZE
        or not isinstance(shape, list)
        or not isinstance(offsets, list)
    ):
        raise bad
    if (
        not all(_is_int(d) and d >= 0 for d in shape)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise bad
    start, end = offsets
    if end < start:
        raise bad
    return dtype, tuple(shape), start, end


def _metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SafetensorsError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    return value


def _check_layout(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """Tensors in offset order must tile the data exactly: no overlap, no gap, no trailing bytes."""
    position = base
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != position:
            what = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
            raise SafetensorsError(
                f"{path}: corrupt safetensors header: tensor {name!r} {what} (offsets must tile the data)"
            )
        position = info.end
    if position != size:
        raise SafetensorsError(f"{path}: corrupt safetensors file: {size - position} bytes after the last tensor")


def read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` with the bytes of the open file `fd` from `offset` on (pread, no mmap)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsError(f"{path}: truncated while reading")
        done += n


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into a new CPU tensor (owns its memory; no mmap).

    The memory is allocated uninitialized (`torch.empty`) and filled by the read: no pass
    zeroing it first (a `bytearray` would memset every byte before the read overwrites it)."""
    import torch

    dtype = torch_dtypes()[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        read_into(fd, memoryview(raw.numpy()), info.start, info.file)
    finally:
        os.close(fd)
    return raw.view(dtype).reshape(info.shape)


def _chunk_buffer() -> memoryview:
    """This thread's reused buffer: allocated (and its pages faulted in) once, not per tensor."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(CHUNK_BYTES))
    return buf


def iter_chunks(info: TensorInfo) -> Iterator[memoryview]:
    """The bytes of `info`'s range, in order, through one reused buffer per thread.

    Each chunk is valid only until the next one is asked for: hash it or write it, do not
    keep it. This moves bytes without allocating a tensor (no page faults, no zeroing).
    """
    buf = _chunk_buffer()
    fd = os.open(info.file, os.O_RDONLY)
    try:
        pos = info.start
        while pos < info.end:
            n = os.preadv(fd, [buf[: min(len(buf), info.end - pos)]], pos)
            if n == 0:
                raise SafetensorsError(f"{info.file}: truncated while reading")
            yield buf[:n]
            pos += n
    finally:
        os.close(fd)
