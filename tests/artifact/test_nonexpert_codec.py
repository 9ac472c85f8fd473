"""The xor-zstd codec: bit-exact round trips for every stored dtype, refusal of damaged blobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard

from moeconsol.artifact import nonexpert_codec as codec
from moeconsol.errors import ArtifactError, DamagedArtifactError
from moeconsol.io.safetensors_file import dtype_names, torch_dtypes

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (33, 5), (2, 3, 4, 5)]


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, by numpy (independent of the codec's own views)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def random_bytes_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Any bit pattern at all: NaN payloads, infinities, subnormals, -0.0, bool bytes 0/1."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dtype == torch.bool:
        data &= 1
    return torch.from_numpy(data).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def fine_tuned(reference: torch.Tensor, seed: int) -> torch.Tensor:
    """A version a fine-tune could make: a few units in the last place apart."""
    if not reference.is_floating_point():
        return reference.clone()
    g = torch.Generator().manual_seed(seed)
    x = reference.to(torch.float64)
    return (x + x.abs() * 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(reference.dtype)


@pytest.mark.parametrize("dtype_name", sorted(torch_dtypes()))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_bit_exact_for_any_bit_pattern(dtype_name, shape):
    dtype = torch_dtypes()[dtype_name]
    reference = random_bytes_tensor(dtype, shape, 1)
    for tensor in (random_bytes_tensor(dtype, shape, 2), reference.clone(), fine_tuned(reference, 3)):
        blob = codec.encode(tensor, reference)
        back = codec.decode(blob, reference, dtype_name, shape)
        assert back.dtype == dtype and tuple(back.shape) == shape
        assert raw(back) == raw(tensor)


def test_special_floats_survive_bit_for_bit():
    values = [0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, float("nan")]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reference = torch.tensor(values, dtype=torch.float64).to(dtype)
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[reference.element_size()]
        tensor = torch.cat([reference.flip(0), reference[-1:], reference[-1:]])  # -0.0 against +0.0, NaN against NaN
        bits = tensor.view(ints)
        bits[-2] += 1  # a NaN with another payload
        bits[-1] = -bits[-1] - 1  # a negative NaN with its own payload
        reference = torch.cat([reference, torch.zeros(2, dtype=dtype)])
        back = codec.decode(codec.encode(tensor, reference), reference, dtype_names()[dtype], tuple(tensor.shape))
        assert raw(back) == raw(tensor)
        assert torch.signbit(back[6]) and back[6] == 0  # -0.0 stays -0.0


def test_many_chunks_and_a_partial_last_one(monkeypatch):
    monkeypatch.setattr(codec, "CHUNK_ELEMENTS", 1000)
    reference = (torch.randn(10_345) * 0.02).to(torch.bfloat16)
    tensor = fine_tuned(reference, 0)
    blob = codec.encode(tensor, reference)
    assert raw(codec.decode(blob, reference, "BF16", (10_345,))) == raw(tensor)
    assert torch.equal(
        codec.decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8), reference, torch.bfloat16, [10_345]).view(
            torch.int16
        ),
        tensor.view(torch.int16),
    )


def test_a_fine_tune_compresses_and_the_shuffle_is_what_zipnn_does():
    reference = (torch.randn(256, 256) * 0.02).to(torch.bfloat16)
    tensor = fine_tuned(reference, 0)
    blob = codec.encode(tensor, reference)
    assert len(blob) < 0.5 * tensor.numel() * 2
    # independently: XOR of the int16 patterns, low bytes then high bytes, one zstd frame
    x = np.bitwise_xor(
        tensor.view(torch.int16).numpy().reshape(-1), reference.view(torch.int16).numpy().reshape(-1)
    ).view(np.uint8)
    shuffled = np.concatenate([x[0::2], x[1::2]]).tobytes()
    assert zstandard.ZstdDecompressor().decompress(blob) == shuffled


def test_encode_refuses_a_reference_of_another_dtype_or_shape():
    with pytest.raises(ValueError, match="must match"):
        codec.encode(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="must match"):
        codec.encode(torch.zeros(3), torch.zeros(3, dtype=torch.float64))


def damaged(blob: bytes) -> list[tuple[str, bytes]]:
    return [
        ("truncated", blob[: len(blob) - 5]),
        ("cut in half", blob[: len(blob) // 2]),
        ("trailing bytes", blob + b"\x00" * 7),
        ("a second frame", blob + blob),
        ("empty", b""),
        ("not zstd", b"hello, this is not a zstd frame at all"),
    ]


def pair(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    reference = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    return reference, fine_tuned(reference, 1)


@pytest.mark.parametrize("case", range(6))
def test_a_damaged_blob_is_an_artifact_error(case):
    reference, tensor = pair()
    what, blob = damaged(codec.encode(tensor, reference))[case]
    with pytest.raises(DamagedArtifactError) as e:
        codec.decode(blob, reference, "BF16", (4096,))
    assert isinstance(e.value, ArtifactError)
    assert "\n" not in str(e.value), what


def test_a_flipped_bit_anywhere_never_decodes_to_a_wrong_tensor():
    """zstd's checksum: a flip is refused, or lands in bits the decoder ignores (padding,
    reserved header bits) and changes nothing."""
    reference, tensor = pair()
    blob = codec.encode(tensor, reference)
    refused = 0
    for position in range(len(blob)):
        flipped = bytearray(blob)
        flipped[position] ^= 0x10
        try:
            back = codec.decode(bytes(flipped), reference, "BF16", (4096,))
        except DamagedArtifactError:
            refused += 1
            continue
        assert raw(back) == raw(tensor), position
    assert refused > 0.95 * len(blob)


def test_a_blob_of_another_size_or_a_mismatched_reference_is_refused():
    reference = torch.randn(100)
    with pytest.raises(DamagedArtifactError, match="holds 200 bytes, not the 400 of a F32"):
        codec.decode(codec.encode(torch.randn(50), torch.randn(50)), reference, "F32", (100,))
    blob = codec.encode(reference + 1, reference)
    with pytest.raises(DamagedArtifactError, match="must match"):
        codec.decode(blob, reference, "F64", (100,))
    with pytest.raises(DamagedArtifactError, match="must match"):
        codec.decode(blob, reference, "F32", (10, 10))
