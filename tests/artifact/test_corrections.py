"""deltas.py: every format against a direct torch computation, byte counts, packing round trips."""

from __future__ import annotations

import pytest
import torch

from moeconsol.artifact.corrections import (
    FORMATS,
    corrected,
    decode,
    delta_format,
    pack_bits,
    pack_nibbles,
    unpack_bits,
    unpack_nibbles,
)
from moeconsol.errors import SettingsError

SHAPES = [(64, 32), (33, 45), (1, 7)]


def _delta(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_bit_packing_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 8))
    assert torch.equal(unpack_bits(packed, shape[1]), mask)
    # bit j of byte c is column 8c + j, by hand
    row = [int(b) for b in mask[0]]
    row += [0] * (-len(row) % 8)
    want = [sum(row[8 * c + j] << j for j in range(8)) for c in range(len(row) // 8)]
    assert packed[0].tolist() == want


@pytest.mark.parametrize("shape", SHAPES)
def test_nibble_packing_round_trips(shape):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (shape[0], -(-shape[1] // 2))
    assert torch.equal(unpack_nibbles(packed, shape[1]), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) + (16 * int(codes[0, 1]) if shape[1] > 1 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_is_the_truncated_svd(dtype):
    d = _delta((64, 32))
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    for r in FORMATS["lowrank"].sizes((64, 32)):
        c = FORMATS["lowrank"].encode(d, r, dtype)
        assert c["a"].dtype == dtype and c["a"].shape == (64, r) and c["b"].shape == (r, 32)
        want = (u[:, :r] * s[:r]) @ vh[:r]
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
        torch.testing.assert_close(decode("lowrank", c, (64, 32), r).double(), want, **tol)
    # rank sizes stop where the factors would cost as much as the matrix
    assert FORMATS["lowrank"].sizes((64, 32)) == [1, 2, 4, 8, 16]
    # the best rank-r approximation: the error is the norm of the dropped singular values
    c = FORMATS["lowrank"].encode(d, 4, torch.float32)
    err = torch.linalg.norm(decode("lowrank", c, (64, 32), 4).double() - d.double())
    assert float(err) == pytest.approx(float(torch.linalg.norm(s[4:])), rel=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_is_sign_times_mean_magnitude(shape):
    d = _delta(shape, 3)
    c = FORMATS["sign"].encode(d, None, torch.float32)
    scale = d.abs().mean()
    want = torch.where(d >= 0, scale, -scale)
    assert torch.equal(decode("sign", c, shape, None), want)
    assert c["scale"].dtype == torch.float32 and c["scale"].shape == (1,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [None, 32, 8, 5])
def test_int4_is_absmax_quantisation_by_hand(shape, group):
    d = _delta(shape, 4)
    rows, cols = shape
    c = FORMATS["int4"].encode(d, group, torch.float32)
    g = cols if group is None else min(group, cols)
    want = torch.empty(shape)
    for i in range(rows):
        for start in range(0, cols, g):
            x = d[i, start : start + g]
            s = x.abs().max() / 7
            want[i, start : start + g] = (torch.round(x / s).clamp(-7, 7) * s) if s > 0 else 0
    torch.testing.assert_close(decode("int4", c, shape, group), want, rtol=0, atol=1e-9)
    # at most half a step off, per group
    assert float((decode("int4", c, shape, group) - d).abs().max()) <= float(d.abs().max()) / 14 + 1e-9


def test_int4_of_a_zero_group_is_zero():
    d = torch.zeros(3, 16)
    d[1, 3] = 0.5
    c = FORMATS["int4"].encode(d, 8, torch.float32)
    out = decode("int4", c, (3, 16), 8)
    assert torch.equal(out, d)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_byte_counts_and_component_specs_match_what_encode_stores(name, dtype):
    f = FORMATS[name]
    for shape in SHAPES:
        for size in f.sizes(shape):
            c = f.encode(_delta(shape), size, dtype)
            specs = f.components(shape, size, dtype)
            assert set(c) == set(specs)
            for k, t in c.items():
                assert (t.dtype, tuple(t.shape)) == (specs[k][0], specs[k][1]), (name, shape, size, k)
            assert f.nbytes(shape, size, dtype) == sum(t.numel() * t.element_size() for t in c.values())
    # by hand, for a 64 x 32 matrix
    assert FORMATS["sign"].nbytes((64, 32), None, dtype) == 64 * 4 + 4
    assert FORMATS["int4"].nbytes((64, 32), 16, dtype) == 64 * 16 + 64 * 2 * 4
    assert FORMATS["lowrank"].nbytes((64, 32), 4, dtype) == (64 + 32) * 4 * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_corrected_is_bank_plus_decoded_delta_in_the_bank_dtype(dtype):
    bank = torch.randn(64, 32).to(dtype)
    own = (bank.float() + _delta((64, 32), 5)).to(dtype)
    for name, size in (("lowrank", 8), ("sign", None), ("int4", 16)):
        c = FORMATS[name].encode(own.float() - bank.float(), size, dtype)
        out = corrected(bank, c, name, size)
        assert out.dtype == dtype
        assert torch.equal(out, (bank.float() + decode(name, c, (64, 32), size)).to(dtype))
    # a full-rank lowrank delta restores the own expert (to float32 rounding)
    c = FORMATS["lowrank"].encode(own.float() - bank.float(), 32, torch.float32)
    torch.testing.assert_close(corrected(bank.float(), c, "lowrank", 32), own.float(), rtol=1e-5, atol=1e-6)


def test_unknown_format_is_refused():
    with pytest.raises(
        SettingsError, match="unknown `delta_format` 'zip': choose from auto, lowrank, sign, int4, mixed"
    ):
        delta_format("zip")


def test_mixed_is_the_svd_with_top_vectors_at_8_bits_and_the_rest_at_4_by_hand():
    d = _delta((64, 32), 6)
    r = 8
    c = FORMATS["mixed"].encode(d, r, torch.float32)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    a = (u[:, :r] * s[:r].sqrt()).float()  # [out, r]
    b = (s[:r].sqrt().unsqueeze(1) * vh[:r]).float()  # [r, in]
    high = r // 4

    def quant(x, levels):  # per vector (row), absmax
        scale = x.abs().max() / levels
        return torch.round(x / scale).clamp(-levels, levels) * scale

    want = torch.zeros(64, 32, dtype=torch.float64)
    for i in range(r):
        levels = 127 if i < high else 7
        want += torch.outer(quant(a[:, i], levels).double(), quant(b[i], levels).double())
    torch.testing.assert_close(decode("mixed", c, (64, 32), r).double(), want, rtol=1e-4, atol=1e-7)
    assert c["a8"].dtype == torch.int8 and c["a8"].shape == (64, high) and c["a4"].shape == (r - high, 32)
    # bytes by hand: int8 vectors, nibble-packed vectors, two float32 scales per vector
    assert FORMATS["mixed"].nbytes((64, 32), r, torch.float32) == high * 96 + (r - high) * (32 + 16) + 8 * r
    # much closer than the 4-bit-only rounding of all vectors would allow, and a real approximation
    low_rank = (u[:, :r] * s[:r]) @ vh[:r]
    err = torch.linalg.norm(decode("mixed", c, (64, 32), r).double() - low_rank) / torch.linalg.norm(low_rank)
    assert float(err) < 0.15
    with pytest.raises(SettingsError, match="rank of at least 2"):
        FORMATS["mixed"].encode(d, 1, torch.float32)
