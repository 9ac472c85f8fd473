"""Swap mode with `host_buffers="file"`: the variants not active wait in the artifact's files,
not in host memory; every swap serves what `host_buffers="copy"` serves, bit for bit."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import one_error_line, run_main

from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import SettingsError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving import Runtime
from moeconsol.serving.crossvariant import ServingMode
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """bf16 base; ft: experts and every non-expert tensor's lowest bit changed (stored
    encoded); same: only experts changed (its non-expert tensors are the base's)."""
    root = tmp_path_factory.mktemp("host_buffers")
    base = tiny_mixtral(seed=4).to(torch.bfloat16)
    ft = derive_variant(base, 1, [(0, 1), (1, 0)], change_non_experts=False)
    same = derive_variant(base, 2, [(1, 1)], change_non_experts=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if ".experts." not in name:
                p.view(torch.int16).bitwise_xor_(torch.randint(0, 2, p.shape, dtype=torch.int16, generator=generator))
    for name, m in (("base", base), ("ft", ft), ("same", same)):
        save_model(m, root / name, tiny_tokenizer())
    out = root / "art"
    ckpts = open_checkpoints([f"{n}={root / n}" for n in ("base", "ft", "same")])
    merge(ckpts, out, MergeSettings(shard_size=60_000))
    return out


def test_file_backed_swaps_serve_what_host_copies_serve_with_no_host_copy(artifact):
    copy = Runtime.from_artifact(artifact, host_buffers="copy")
    files = Runtime.from_artifact(artifact, host_buffers="file")
    assert copy.resident_bytes().host > 0 and files.resident_bytes().host == 0
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    for name in ("ft", "base", "same", "ft", "same", "base", "ft"):
        a, b = copy.activate(name), files.activate(name)
        assert (a.bytes_moved, a.tensors_copied) == (b.bytes_moved, b.tensors_copied)
        with torch.no_grad():
            assert torch.equal(copy.model(ids).logits, files.model(ids).logits), name
    assert files.swap_bytes("base", "ft") == copy.swap_bytes("base", "ft") > 0
    assert files.swap_bytes("base", "same") == copy.swap_bytes("base", "same")


def test_host_buffers_is_checked(artifact):
    with pytest.raises(SettingsError, match="one of copy, file"):
        Runtime.from_artifact(artifact, host_buffers="disk")
    with pytest.raises(SettingsError, match="swap mode"):
        Runtime.from_artifact(artifact, host_buffers="file", mode=ServingMode.CROSS_VARIANT)


def test_serve_local_takes_host_buffers_and_refuses_a_bad_one_in_one_line(artifact):
    r = run_main("serve-local", artifact, "--prompt", "hello", "--max-new-tokens", "2", "--host-buffers", "file")
    assert r.returncode == 0, r.stderr
    assert "host 0 B" in r.stderr or "host 0" in r.stderr
    one_error_line(
        run_main("serve-local", artifact, "--prompt", "hello", "--host-buffers", "disk"), "one of copy, file"
    )
