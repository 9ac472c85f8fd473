"""Lossless encoding of a tensor against a reference of the same dtype and shape.

A fine-tune changes most weights of a non-expert tensor by a few units in the last place, so
the bit patterns of the two versions share their sign, exponent and high mantissa bits. The
`xor-zstd` codec (the scheme of zipnn, Hershcovitch et al. 2024):

1. XOR each element's bytes with the reference's: unchanged bits become zeros;
2. byte shuffle: all first bytes of the elements, then all second bytes, ... (a bf16 tensor
   becomes its low-byte plane, then its sign-and-exponent plane, which is nearly all zero);
3. zstandard, with its content checksum, so a damaged blob is refused, never decoded wrong.

The tensor is processed in chunks of `CHUNK_ELEMENTS` elements (the shuffle is per chunk,
so the blob format depends on it: it is part of the format, not a tuning knob), each chunk
streamed through one zstd frame: memory is the tensor, its reference and the blob, plus one
chunk. Bit-exact for every dtype (NaN payloads and -0.0 included): only bytes are handled.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from ..errors import DamagedArtifactError
from ..io.safetensors_file import dtype_names, torch_dtypes
from .manifest import CODECS, XOR_ZSTD  # noqa: F401 (the names this codec goes by, the manifest's vocabulary)

NONE = "none"
CHOICES = (XOR_ZSTD, NONE)
"""What merge accepts: a codec, or none (every version stored whole)."""
CHUNK_ELEMENTS = 1 << 22
"""Elements per shuffled chunk (4 Mi: 8 MiB of bf16): part of the blob format."""
PROBE_ELEMENTS = 1 << 18
"""Elements `probe` encodes to estimate a tensor's ratio (512 KiB of bf16)."""
LEVEL = 1
"""zstd level used to encode (decoding reads any level): see docs/benchmarks.md. zstd
compresses on every core (`threads=-1`: measured 1.6-2.2x one core's speed on 2 busy cores)."""


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a [numel, element_size] uint8 array (a view when contiguous).
    numpy, not torch: torch copies a transposed uint8 array 30x slower (measured)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().reshape(t.numel(), t.element_size())


def _check_pair(tensor: torch.Tensor, reference: torch.Tensor) -> None:
    if tensor.dtype != reference.dtype or tensor.shape != reference.shape:
        raise ValueError(
            f"cannot encode a {tensor.dtype} {list(tensor.shape)} tensor against a "
            f"{reference.dtype} {list(reference.shape)} reference: they must match"
        )
    if tensor.dtype not in dtype_names():
        raise ValueError(f"dtype {tensor.dtype} is not one safetensors stores")


def encode(tensor: torch.Tensor, reference: torch.Tensor, level: int = LEVEL) -> bytes:
    """`tensor` encoded against `reference` (same dtype and shape) with xor-zstd."""
    _check_pair(tensor, reference)
    data, ref = _bytes(tensor), _bytes(reference)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True, threads=-1)
    stream = compressor.compressobj(size=data.size)
    out = []
    xor = np.empty((min(CHUNK_ELEMENTS, data.shape[0]), data.shape[1]), dtype=np.uint8)
    planes = np.empty((data.shape[1], xor.shape[0]), dtype=np.uint8)
    for start in range(0, data.shape[0], CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, data.shape[0] - start)
        np.bitwise_xor(data[start : start + n], ref[start : start + n], out=xor[:n])
        shuffled = planes[:, :n] if n == planes.shape[1] else np.empty((data.shape[1], n), dtype=np.uint8)
        np.copyto(shuffled, xor[:n].T)
        out.append(stream.compress(shuffled))
    out.append(stream.flush())
    return b"".join(out)


def probe(tensor: torch.Tensor, reference: torch.Tensor) -> float:
    """Estimated encoded / whole bytes of `encode(tensor, reference)`: that of its first
    PROBE_ELEMENTS elements (all of a smaller tensor), at a fraction of the cost."""
    _check_pair(tensor, reference)
    n = min(PROBE_ELEMENTS, tensor.numel())
    if n == 0:
        return 0.0
    head = encode(tensor.reshape(-1)[:n], reference.reshape(-1)[:n])
    return len(head) / (n * tensor.element_size())


def decode(
    blob: bytes | memoryview | torch.Tensor,
    reference: torch.Tensor,
    dtype: str | torch.dtype,
    shape: tuple[int, ...] | list[int],
) -> torch.Tensor:
    """The tensor `encode` made from `reference`: dtype (a safetensors name or a torch dtype)
    and shape as recorded. A blob that is damaged, or decodes to another size, raises
    DamagedArtifactError."""
    dtype = torch_dtypes()[dtype] if isinstance(dtype, str) else dtype
    shape = tuple(shape)
    if reference.dtype != dtype or tuple(reference.shape) != shape:
        raise DamagedArtifactError(
            f"the reference is {reference.dtype} {list(reference.shape)}, the encoded tensor "
            f"{dtype} {list(shape)}: they must match"
        )
    if isinstance(blob, torch.Tensor):
        blob = blob.contiguous().view(torch.uint8).numpy()
    out = torch.empty(shape, dtype=dtype)
    data, ref = _bytes(out), _bytes(reference)
    numel, width = data.shape
    try:
        declared = zstandard.frame_content_size(blob)
        if declared != numel * width:
            raise DamagedArtifactError(
                f"the encoded blob holds {declared} bytes, not the {numel * width} of a "
                f"{dtype_names()[dtype]} {list(shape)} tensor"
            )
        stream = zstandard.ZstdDecompressor().decompressobj()
        chunk = np.empty(min(CHUNK_ELEMENTS, numel) * width, dtype=np.uint8)
        start, filled = 0, 0  # elements decoded; bytes of the current chunk received
        for piece in _pieces(blob):
            produced = stream.decompress(piece)
            offset = 0
            while offset < len(produced):
                n = min(CHUNK_ELEMENTS, numel - start)
                if n <= 0:
                    raise DamagedArtifactError("the encoded blob decodes to more bytes than its tensor holds")
                take = min(n * width - filled, len(produced) - offset)
                chunk[filled : filled + take] = np.frombuffer(produced, dtype=np.uint8, count=take, offset=offset)
                filled, offset = filled + take, offset + take
                if filled == n * width:
                    target, planes = data[start : start + n], chunk[: n * width].reshape(width, n)
                    for byte in range(width):  # one plane at a time: 18x faster than one transposed copy (measured)
                        np.copyto(target[:, byte], planes[byte])
                    np.bitwise_xor(target, ref[start : start + n], out=target)
                    start, filled = start + n, 0
        if not stream.eof or start < numel or stream.unused_data:
            raise DamagedArtifactError("the encoded blob is truncated or has bytes after its end")
    except zstandard.ZstdError as e:
        raise DamagedArtifactError(f"the encoded blob is damaged: {e}") from e
    return out


_PIECE = 1 << 20


def _pieces(blob) -> list[memoryview]:
    """The blob in pieces of 1 MiB, so the decompressor's output stays about one chunk."""
    view = memoryview(blob).cast("B")
    return [view[i : i + _PIECE] for i in range(0, len(view), _PIECE)] or [view]
