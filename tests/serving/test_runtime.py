"""The runtime: one resident model serving every variant of a lossless artifact.

References are transformers' own models loaded from the original checkpoints with
from_pretrained: an independent path from the artifact, the bank and the slot maps.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import cli
from torch.utils._python_dispatch import TorchDispatchMode

from moeconsol.architectures.layouts import architecture
from moeconsol.consolidate.pipeline import merge
from moeconsol.errors import MoeconsolError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving import runtime
from moeconsol.serving.device import parse_device, parse_dtype
from moeconsol.serving.engine import GenerationSettings, complete
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.variants import Family
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_model, tiny_tokenizer

PROMPT = "The quick brown fox"


def build_family(root: Path, arch: str) -> dict[str, Path]:
    """base, ft (changed experts + non-experts; fused layout for Mixtral), same (only
    experts changed: its non-expert tensors are the base's), merged losslessly into out/."""
    tok = tiny_tokenizer()
    base = tiny_model(arch, 0)
    models = {
        "base": base,
        "ft": derive_variant(base, 1, changed_experts=[(0, 1), (1, 2)], scale=0.5),
        "same": derive_variant(base, 2, changed_experts=[(1, 0)], change_non_experts=False, scale=0.5),
    }
    fused = len(architecture(arch).layouts) > 1
    paths = {name: save_model(m, root / name, tok, fused=(fused and name == "ft")) for name, m in models.items()}
    merge(open_checkpoints([f"{n}={p}" for n, p in paths.items()]), root / "out")
    return {**paths, "out": root / "out"}


@pytest.fixture(scope="module", params=["mixtral", "switch_transformers"])
def family(request, tmp_path_factory):
    arch = request.param
    paths = build_family(tmp_path_factory.mktemp(arch), arch)
    model_class = getattr(transformers, architecture(arch).model_class)
    refs = {n: model_class.from_pretrained(paths[n]).eval() for n in ("base", "ft", "same")}
    return arch, paths, refs, Runtime.from_artifact(paths["out"])


def _inputs(arch: str, tok) -> dict:
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    return (
        {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
        if architecture(arch).encoder_decoder
        else {"input_ids": ids}
    )


@torch.no_grad()
def test_logits_equal_transformers_from_original_checkpoint(family):
    arch, paths, refs, rt = family
    inputs = _inputs(arch, rt.tokenizer("base"))
    for name in ("ft", "base", "same", "ft", "base"):  # every swap direction
        rt.activate(name)
        got, want = rt.model(**inputs).logits, refs[name](**inputs).logits
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the variants really differ, so equality above is not vacuous
    assert not torch.allclose(refs["base"](**inputs).logits, refs["ft"](**inputs).logits, atol=1e-3)


def test_buffers_and_dtypes_match_a_normally_built_model(family):
    arch, paths, refs, rt = family
    ref = refs["base"]
    want = dict(ref.named_buffers())
    got = {n: b for n, b in rt.model.named_buffers() if not n.endswith("slot_map")}
    assert set(got) == set(want)
    for name, buf in want.items():
        assert got[name].dtype == buf.dtype and torch.equal(got[name], buf), name
    params = {n: p.dtype for n, p in rt.model.named_parameters()}
    assert all(d == torch.float32 for d in params.values())
    if rt.model.config.tie_word_embeddings:  # tied embeddings stay tied, as in transformers' own model
        assert rt.model.lm_head.weight.data_ptr() == rt.model.shared.weight.data_ptr()


def test_bank_is_allocated_once_and_never_moves(family):
    arch, paths, refs, rt = family
    rt.activate("base")
    bank = {n: (t.data_ptr(), t.detach().clone()) for n, t in rt.bank_tensors().items()}
    targets = {n: t.data_ptr() for n, t in rt._targets.items()}
    for name in ("ft", "same", "base", "ft"):
        rt.activate(name)
        for n, t in rt.bank_tensors().items():
            assert t.data_ptr() == bank[n][0], f"{n} re-allocated"
            assert torch.equal(t, bank[n][1]), f"{n} changed by a swap"
        assert {n: t.data_ptr() for n, t in rt._targets.items()} == targets  # copied in place


def test_swap_changes_only_non_expert_tensors_and_slot_maps(family):
    arch, paths, refs, rt = family
    rt.activate("base")
    before = {n: t.clone() for n, t in rt._targets.items()}
    report = rt.activate("ft")
    state = refs["ft"].state_dict()
    for name, t in rt._targets.items():
        assert torch.equal(t, state[name]), name  # now the variant's own tensor
    assert report.tensors_copied == sum(not torch.equal(before[n], t) for n, t in rt._targets.items())
    assert report.tensors_copied + report.tensors_skipped == len(rt._targets)
    # slot maps: experts left unchanged by the fine-tune share the base's bank entry
    for i, layer in enumerate(rt.family.layers):
        changed = {(0, 1), (1, 2)}
        base_map, ft_map = rt.family.variants["base"].slot_maps[layer], rt.slot_map(layer)
        for e in range(len(ft_map)):
            assert (ft_map[e] != base_map[e]) == ((i, e) in changed)


def test_swap_reports_bytes_actually_moved_and_same_model_is_free(family):
    arch, paths, refs, rt = family
    rt.activate("base")
    again = rt.activate("base")
    assert (again.seconds, again.bytes_moved, again.tensors_copied) == (0.0, 0, 0)
    table = len(rt.family.layers) * len(rt.slot_map(rt.family.layers[0])) * 8  # every layer's slot map, int64
    # 'same' shares every non-expert tensor with base: only the slot-map table moves (one layer differs)
    assert rt.swap_bytes("base", "same") == table
    report = rt.activate("same")
    assert report.tensors_copied == 0 and report.slot_maps_changed == 1
    assert report.bytes_moved == table
    # base -> ft: every non-expert tensor differs; bytes = their sizes, counted from the reference
    rt.activate("base")
    assert rt.swap_bytes("base", "ft") == rt.swap_bytes("ft", "base")
    report = rt.activate("ft")
    seen, want = set(), 0
    for name, p in refs["ft"].named_parameters():
        if "experts" not in name and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            want += p.numel() * p.element_size()
    assert report.bytes_moved == want + table == rt.swap_bytes("base", "ft")
    assert report.slot_maps_changed == 2
    assert report.seconds > 0 and rt.swaps[-1] == report


class _CountOps(TorchDispatchMode):
    """Records every aten operation run while active (copies included, whatever calls them)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_resident_non_expert_tensors_are_views_into_one_flat_buffer_per_dtype(family):
    arch, paths, refs, rt = family
    flats = {dtype: _storage(f.buffer) for dtype, f in rt._flats.items()}
    assert len(flats) == 1  # float32 only
    bank = {id(t) for t in rt.bank_tensors().values()}
    outside = [
        (n, t)
        for n, t in [*rt.model.named_parameters(remove_duplicate=False), *rt.model.named_buffers()]
        if id(t) not in bank and not n.endswith(("slot_map", "inv_freq"))
    ]
    assert len(outside) > len(rt._targets) - 1
    for name, t in outside:
        assert _storage(t) == flats[t.dtype], f"{name} is not a view into the flat buffer"
    # the swap region holds exactly the tensors whose stored key differs between variants
    flat = next(iter(rt._flats.values()))
    start = flat.buffer.data_ptr()
    for name, t in rt._targets.items():
        inside = (t.data_ptr() - start) // t.element_size() < flat.swap_numel
        assert inside == (len({rt._keys[v][name] for v in rt.names}) > 1), name
    # the slot maps are rows of one table
    assert len({_storage(m.slot_map) for m in rt._banks.values()}) == 1
    if arch == "switch":  # tied embeddings: one Parameter, as in transformers' own model
        m = rt.model
        assert m.lm_head.weight is m.shared.weight is m.encoder.embed_tokens.weight is m.decoder.embed_tokens.weight
    for name in ("ft", "base"):  # and the views see every swap
        rt.activate(name)
        for pname, t in refs[name].state_dict().items():
            if "experts" not in pname:
                assert torch.equal(rt.model.get_parameter(pname), t), pname


def test_a_swap_is_one_copy_per_dtype_plus_the_slot_maps(family, monkeypatch):
    arch, paths, refs, rt = family
    copies: list[tuple[int, int]] = []
    copy_into = runtime._copy_into
    monkeypatch.setattr(
        runtime, "_copy_into", lambda dst, src: (copies.append((dst.data_ptr(), dst.numel())), copy_into(dst, src))
    )
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    (flat,) = rt._flats.values()
    region, table = (flat.buffer.data_ptr(), flat.swap_numel), (rt._slot_table.data_ptr(), rt._slot_table.numel())
    rt.activate("base")
    # base and same share their non-expert tensors (one host buffer) but not their slot maps
    for name, want in (
        ("ft", [region, table]),
        ("same", [region, table]),
        ("base", [table]),
        ("same", [table]),
        ("same", []),
        ("ft", [region, table]),
    ):
        copies.clear()
        with _CountOps() as counted:
            report = rt.activate(name)
        assert copies == want, name
        assert set(counted.ops) <= {"aten.view", "aten.detach"}, (
            counted.ops
        )  # besides the copies: byte views, no kernel
        assert report.tensors_copied == (len(rt._targets) if region in want else 0)  # base/ft: every tensor differs
    assert threads == []  # no process-wide thread setting touched
    assert flat.swap_numel == flat.buffer.numel()


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)
@torch.no_grad()
def test_forward_runs_transformers_own_operations_plus_one_slot_map_gather_per_layer(family):
    """The bank module adds nothing to transformers' model but mapping the router's choice
    through the slot map. This pins, for one, the resident parameters' requires_grad to
    from_pretrained's: with a weight that does not require grad, torch's matmul runs the
    prefill's last-token LM head as an expand + bmm that copies the whole weight."""
    arch, paths, refs, rt = family
    rt.activate("ft")
    inputs = _inputs(arch, rt.tokenizer("ft"))
    with _CountOps() as ours:
        rt.model(**inputs, logits_to_keep=1)
    with _CountOps() as theirs:
        refs["ft"](**inputs, logits_to_keep=1)
    extra, missing = Counter(ours.ops) - Counter(theirs.ops), Counter(theirs.ops) - Counter(ours.ops)
    assert (dict(extra), dict(missing)) == ({"aten.index": len(rt.family.layers)}, {})


def test_tensors_every_variant_shares_stay_out_of_the_swap():
    base = tiny_mixtral(5)
    ft = derive_variant(base, 6, changed_experts=[(1, 1)], change_non_experts=False)
    with torch.no_grad():
        ft.lm_head.weight.add_(0.5)
        ft.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    calls: dict[str, tuple[int, int]] = {}
    rt = Runtime(
        Family.from_models({"base": base, "ft": ft}),
        progress=lambda stage, done, total: calls.update({stage: (done, total)}),
    )
    shared = len(rt._targets) - 2
    assert calls["non-expert tensors"] == (2 * 2 + shared,) * 2  # each variant's 2 differing tensors, the others once
    (flat,) = rt._flats.values()
    assert flat.swappable == ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    changed = ft.lm_head.weight.numel() + ft.model.layers[1].self_attn.q_proj.weight.numel()
    assert flat.swap_numel == changed
    report = rt.activate("ft")
    assert report.tensors_copied == 2 and report.tensors_skipped == len(rt._targets) - 2
    assert report.bytes_moved == changed * 4 + 2 * 4 * 8  # the two tensors + the slot-map table
    assert rt.resident_bytes().host == 2 * changed * 4  # only the swap regions wait in host memory
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    with torch.no_grad():
        for name, m in (("ft", ft), ("base", base), ("ft", ft)):
            rt.activate(name)
            assert torch.equal(rt.model(input_ids=ids).logits, m(input_ids=ids).logits)


DEVICES = ["cpu", *([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_on_device_logits_equal_transformers_and_swaps_stay_in_place(family, device):
    """The same checks on every device this machine has (benchmarks/device.sh runs it on CUDA):
    host buffers pinned on CUDA, the bank and the flat buffers never re-allocated, logits equal
    to transformers' model from the original checkpoint after every swap."""
    arch, paths, refs, _ = family
    rt = Runtime.from_artifact(paths["out"], device=device)
    host = [t for buffers in rt._host.values() for t in buffers.values()] + list(rt._slot_maps.values())
    assert all(t.is_pinned() == (device == "cuda") for t in host)
    where = {n: t.data_ptr() for n, t in [*rt.bank_tensors().items(), *rt._targets.items()]}
    inputs = {k: v.to(device) for k, v in _inputs(arch, rt.tokenizer("base")).items()}
    for name in ("ft", "same", "base", "ft"):
        rt.activate(name)
        ref = copy.deepcopy(refs[name]).to(device)
        torch.testing.assert_close(rt.model(**inputs).logits, ref(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert {n: t.data_ptr() for n, t in [*rt.bank_tensors().items(), *rt._targets.items()]} == where


def test_resident_bytes(family):
    arch, paths, refs, rt = family
    rb = rt.resident_bytes()
    per_expert = len(architecture(arch).parts) * 32 * 64 * 4  # wi, wo or w1, w2, w3 of 32 x 64, float32
    assert rb.bank == sum(rt.family.bank_sizes.values()) * per_expert
    non_expert = {p.data_ptr(): p.numel() * 4 for n, p in refs["base"].named_parameters() if "experts" not in n}
    assert rb.non_expert == sum(non_expert.values())
    assert rb.total == rb.bank + rb.non_expert
    assert rb.host == 2 * rb.non_expert  # base/same share one set, ft has its own


def test_greedy_generation_equals_transformers(family):
    arch, paths, refs, rt = family
    tok = rt.tokenizer("ft")
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    for name in ("ft", "base"):
        got = complete(rt, name, PROMPT, GenerationSettings(max_new_tokens=10))
        out = refs[name].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False
        )
        want = out[0, 1:] if architecture(arch).encoder_decoder else out[0, ids.shape[1] :]
        assert got.token_ids == want.tolist()
        assert got.text == tok.decode(want, skip_special_tokens=True)
        assert got.prompt_tokens == ids.shape[1] and got.finish_reason in ("stop", "length")
        assert 0 < got.time_to_first_token and got.tokens_per_second > 0
    assert len(set(tuple(complete(rt, n, PROMPT, GenerationSettings(6)).token_ids) for n in ("ft", "base"))) == 2


def test_sampling_is_reproducible_with_a_seed(family):
    arch, paths, refs, rt = family
    s = GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    a, b = complete(rt, "ft", PROMPT, s), complete(rt, "ft", PROMPT, s)
    assert a.token_ids == b.token_ids


def test_streamed_text_adds_up_to_the_completion(family):
    arch, paths, refs, rt = family
    pieces: list[str] = []
    c = complete(rt, "base", PROMPT, GenerationSettings(max_new_tokens=8), on_text=pieces.append)
    assert "".join(pieces) == c.text


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)  # one dtype check is enough
def test_bfloat16_runtime_matches_transformers_in_bfloat16(family):
    arch, paths, refs, _ = family
    rt = Runtime.from_artifact(paths["out"], dtype=torch.bfloat16, active="ft")
    ref = transformers.MixtralForCausalLM.from_pretrained(paths["ft"], dtype=torch.bfloat16).eval()
    inputs = _inputs("mixtral", rt.tokenizer("ft"))
    with torch.no_grad():
        got, want = rt.model(**inputs).logits, ref(**inputs).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert rt.resident_bytes().bank == sum(rt.family.bank_sizes.values()) * 3 * 32 * 64 * 2
    assert rt.model.model.rotary_emb.inv_freq.dtype == ref.model.rotary_emb.inv_freq.dtype


def test_family_from_in_memory_models():
    base = tiny_mixtral(3)
    ft = derive_variant(base, 4, changed_experts=[(0, 0)])
    fam = Family.from_models({"base": base, "ft": ft})
    assert fam.bank_sizes == {"model.layers.0": 5, "model.layers.1": 4}
    rt = Runtime(fam, active="ft")
    ids = torch.tensor([[5, 9, 40, 7]])
    with torch.no_grad():
        for name, m in (("ft", ft), ("base", base), ("ft", ft)):
            rt.activate(name)
            torch.testing.assert_close(rt.model(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_one_clear_error(family):
    arch, paths, refs, rt = family
    with pytest.raises(MoeconsolError, match="unknown model 'nope'.*base, ft, same"):
        rt.activate("nope")
    with pytest.raises(MoeconsolError, match="unknown `dtype`"):
        parse_dtype("int3")
    with pytest.raises(MoeconsolError, match="unknown `device`|unsupported `device`"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MoeconsolError, match="no CUDA device"):
            parse_device("cuda")
    with pytest.raises(MoeconsolError, match="temperature"):
        complete(rt, "base", PROMPT, GenerationSettings(temperature=-1))
    with pytest.raises(MoeconsolError, match="no such artifact"):
        Runtime.from_artifact(paths["out"] / "missing")


def test_variants_of_different_configurations_are_refused():
    a, b = tiny_mixtral(0), tiny_mixtral(0, rms_norm_eps=1e-3)
    with pytest.raises(MoeconsolError, match="differ in config key 'rms_norm_eps'"):
        Runtime(Family.from_models({"a": a, "b": b}))


# -- the CLI, one-shot -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)  # one CLI run is enough
def test_cli_one_shot_prints_greedy_text_of_each_model(family):
    arch, paths, refs, rt = family
    r = cli(
        "serve-local",
        str(paths["out"]),
        "--model",
        "ft",
        "--model",
        "base",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = rt.tokenizer("ft")
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    assert [c["model"] for c in out["completions"]] == ["ft", "base"]
    for c in out["completions"]:
        want = refs[c["model"]].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
        assert c["token_ids"] == want[0, ids.shape[1] :].tolist()
    assert out["completions"][0]["swap"]["bytes_moved"] == 0  # ft is loaded active
    assert out["completions"][1]["swap"]["bytes_moved"] > 0
    assert out["resident_bytes"]["total"] == rt.resident_bytes().total
    # the human-readable form, in process (same code path, no interpreter start-up)
    from typer.testing import CliRunner

    from moeconsol.cli import app, load_commands

    load_commands("serve-local")
    r = CliRunner().invoke(
        app, ["serve-local", str(paths["out"]), "--model", "base", "--prompt", PROMPT, "--max-new-tokens", "3"]
    )
    assert r.exit_code == 0, r.output
    assert "time to first token" in r.output and "tokens/s" in r.output and "swap" in r.output


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)  # CLI errors do not depend on the architecture
def test_cli_errors_are_one_line_exit_2(family):
    arch, paths, refs, rt = family
    cases = [
        (["--model", "nope", "--prompt", "hi"], "unknown model 'nope'"),
        (["--prompt", "hi", "--port", "8000"], "either --prompt"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moeconsol", "serve-local", str(paths["out"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    for (_args, message), proc in zip(cases, procs):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("moeconsol: error:") and message in lines[0], stderr
