"""`add` and `remove`: an artifact that grows and shrinks stays verifiable, every variant
exports bit-exact, the files already written are never rewritten, and a crash at any phase
leaves the old artifact valid."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run_main
from safetensors import safe_open

from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.consolidate.grow import add_variant
from moeconsol.consolidate.shrink import remove_variant
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

VARIANTS = {
    "a": [(0, 1)],
    "b": [(1, 2), (0, 0)],
    "c": [(0, 1), (1, 3)],
    "d": [(0, 2), (1, 1)],
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and four fine-tunes (b sharded and fused; c's non-expert tensors untouched, so
    they are the base's), and the lossless artifact of base, a and b."""
    root = tmp_path_factory.mktemp("grow")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=5)
    save_model(base, root / "base", tok)
    save_model(derive_variant(base, 1, VARIANTS["a"]), root / "a", tok)
    save_model(derive_variant(base, 2, VARIANTS["b"]), root / "b", tok, fused=True, max_shard_size="100KB")
    save_model(derive_variant(base, 3, VARIANTS["c"], change_non_experts=False), root / "c", tok)
    save_model(derive_variant(base, 4, VARIANTS["d"]), root / "d", tok)
    merge(open_checkpoints([f"{n}={root / n}" for n in ("base", "a", "b")]), root / "art")
    return root


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def tensors_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def assert_exports_bit_exact(art: Path, root: Path, tmp: Path, only: list[str] | None = None) -> None:
    """verify finds nothing, and every variant (or those of `only` it holds) exports as its
    source: same files, same tensors."""
    assert verify_artifact(art) == []
    for name in Artifact.open(art).model_names:
        if only is not None and name not in only:
            continue
        out = export_model(art, name, tmp / f"export-{name}", force=True)
        source = root / name
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in source.glob("*.safetensors"))
        got, want = tensors_of(out), tensors_of(source)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want), name


def file_hashes(art: Path) -> dict[str, str]:
    return {
        str(p.relative_to(art)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(art.rglob("*"))
        if p.is_file()
    }


def test_add_matches_a_full_merge_and_rewrites_nothing(family, tmp_path):
    art = copy_artifact(family / "art", tmp_path / "art")
    before = file_hashes(art)
    r = add_variant(art, f"c={family / 'c'}")
    assert verify_artifact(art) == []
    after = file_hashes(art)
    # every file already there is unchanged, apart from the manifest
    assert {f: h for f, h in after.items() if f in before and f != "manifest.json"} == {
        f: h for f, h in before.items() if f != "manifest.json"
    }
    full = merge(open_checkpoints([f"{n}={family / n}" for n in ("base", "a", "b", "c")]), tmp_path / "full")
    grown = Artifact.open(art)
    assert {x: grown.bank_size(x) for x in grown.layers} == full.bank_sizes
    assert sum(r.new_bank.values()) == sum(full.bank_sizes.values()) - sum(
        Artifact.open(family / "art").bank_size(x) for x in grown.layers
    )
    # c's non-expert tensors are the base's: all shared, none stored again
    assert r.non_expert_new == 0 and r.references_read == []
    assert grown.non_expert_keys("c") == grown.non_expert_keys("base")
    # no bank entry moved: a reader of format version 2 reads it all
    assert grown.manifest["format_version"] == 2
    assert grown.manifest["bytes"]["bank"] == full.bank_bytes
    assert grown.manifest["bytes"]["experts_in"] == full.expert_bytes_in
    assert_exports_bit_exact(art, family, tmp_path)


def test_add_to_a_new_directory_leaves_the_old_one_as_it_was(family, tmp_path):
    art = copy_artifact(family / "art", tmp_path / "art")
    before = file_hashes(art)
    add_variant(art, f"c={family / 'c'}", tmp_path / "new")
    assert file_hashes(art) == before
    assert Artifact.open(tmp_path / "new").model_names == ["base", "a", "b", "c"]
    assert_exports_bit_exact(tmp_path / "new", family, tmp_path)


def test_remove_drops_what_no_other_variant_uses_and_compact_drops_the_bytes(family, tmp_path):
    art = copy_artifact(family / "art", tmp_path / "art")
    original = Artifact.open(art)
    r = remove_variant(art, "a")
    grown = Artifact.open(art)
    assert grown.model_names == ["base", "b"]
    # a changed one expert of layer 0: its own bank entry is gone, nothing else
    assert r.dropped_bank == {"model.layers.0": 1}
    assert {x: grown.bank_size(x) for x in grown.layers} == {
        x: original.bank_size(x) - r.dropped_bank.get(x, 0) for x in grown.layers
    }
    # entries after the dropped one keep their tensors under their old keys: version 3
    assert grown.manifest["format_version"] == 3
    assert_exports_bit_exact(art, family, tmp_path)
    size_before = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())

    r = remove_variant(art, "b", compact=True)
    compacted = Artifact.open(art)
    assert compacted.manifest["format_version"] == 2 and r.deleted
    assert_exports_bit_exact(art, family, tmp_path)
    # the directory holds exactly what the manifest lists, and each file only used tensors
    on_disk = {str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()}
    assert on_disk == set(compacted.spec.files) | {"manifest.json"}
    for f in compacted.spec.files:
        if f.endswith(".safetensors"):
            with safe_open(art / f, "pt") as s:
                assert set(s.keys()) <= set(compacted.spec.weight_map)
    assert sum(p.stat().st_size for p in art.rglob("*") if p.is_file()) < size_before
    # what is left is what merging the base alone stores (the same bank, as many bytes)
    alone = merge(open_checkpoints([f"base={family / 'base'}"]), tmp_path / "alone")
    assert {x: compacted.bank_size(x) for x in compacted.layers} == alone.bank_sizes


def test_a_removed_variant_comes_back(family, tmp_path):
    art = copy_artifact(family / "art", tmp_path / "art")
    remove_variant(art, "base")
    add_variant(art, f"base={family / 'base'}")
    add_variant(art, f"c={family / 'c'}")
    assert Artifact.open(art).model_names == ["a", "b", "base", "c"]
    assert_exports_bit_exact(art, family, tmp_path)


def test_a_fine_tune_is_added_as_lossless_deltas_like_merge_stores_it(tmp_path):
    """bf16 fine-tunes: the new variant's non-expert versions are encoded against the stored
    ones exactly as a merge of all of them encodes them."""
    from test_nonexpert_encoding import fine_tune

    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=5)
    models = {"base": base, "ft": fine_tune(base)}
    for n, m in models.items():
        save_model(m.to(torch.bfloat16), tmp_path / n, tok)
    merge(open_checkpoints([f"base={tmp_path / 'base'}"]), tmp_path / "art")
    r = add_variant(tmp_path / "art", f"ft={tmp_path / 'ft'}")
    full = merge(open_checkpoints([f"{n}={tmp_path / n}" for n in models]), tmp_path / "full")
    grown = Artifact.open(tmp_path / "art")
    assert r.non_expert_encoded > 0
    assert grown.spec.encodings == Artifact.open(full.path).spec.encodings
    assert grown.manifest["bytes"]["non_expert"] == full.manifest["bytes"]["non_expert"]
    # the references read are the base's versions, once each
    assert r.references_read and all(k.endswith("@0") for k in r.references_read)
    assert len(set(r.references_read)) == len(r.references_read)
    assert_exports_bit_exact(tmp_path / "art", tmp_path, tmp_path)


def test_an_artifact_without_digests_is_hashed_once(family, tmp_path):
    """A manifest that records no digests (older moeconsol): add computes them from the
    artifact's own tensors and still finds every shared expert and tensor."""
    art = copy_artifact(family / "art", tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    m.pop("digests")
    for layer in m["layers"]:
        for b in layer["bank"]:
            b.pop("digest")
    (art / "manifest.json").write_text(json.dumps(m))
    r = add_variant(art, f"c={family / 'c'}")
    assert r.bank_hashed == sum(len(layer["bank"]) for layer in m["layers"])
    assert r.non_expert_new == 0
    full = merge(open_checkpoints([f"{n}={family / n}" for n in ("base", "a", "b", "c")]), tmp_path / "full")
    assert {x: Artifact.open(art).bank_size(x) for x in full.bank_sizes} == full.bank_sizes
    assert_exports_bit_exact(art, family, tmp_path, only=["c"])


def test_budget_artifact_places_the_new_variant_within_the_budget_and_the_others_keep_theirs(family, tmp_path):
    names = ("base", "a", "b")
    merge(
        open_checkpoints([f"{n}={family / n}" for n in names]),
        tmp_path / "art",
        MergeSettings(mode="budget", budget="0.7"),
    )
    before = {n: tensors_of(export_model(tmp_path / "art", n, tmp_path / f"before-{n}")) for n in names}
    r = run_main("add", tmp_path / "art", f"d={family / 'd'}", "--in-place", "--budget", "0.7", "--json")
    assert r.returncode == 0, r.stderr
    placement = json.loads(r.stdout)["placement"]
    art = Artifact.open(tmp_path / "art")
    assert verify_artifact(tmp_path / "art") == []
    allowed = int(0.7 * 4 * len(art.layers) * art.experts_per_layer)
    assert placement["budget_experts"] == allowed == art.spec.consolidation["budget_experts"]
    assert sum(art.bank_size(x) for x in art.layers) <= allowed
    # the others are not re-planned: they keep what they had, and export exactly as before
    assert {n: placement["kept_after"][n] for n in names} == placement["kept_before"]
    for n in names:
        after = tensors_of(export_model(tmp_path / "art", n, tmp_path / f"after-{n}"))
        assert all(torch.equal(after[k], v) for k, v in before[n].items()), n
    # d's two changed experts are farther from every stored expert than anything else: its own
    source = tensors_of(family / "d")
    exported = tensors_of(export_model(tmp_path / "art", "d", tmp_path / "after-d"))
    for layer, e in VARIANTS["d"]:
        for w in ("w1", "w2", "w3"):
            key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
            assert torch.equal(exported[key], source[key]), key
    assert placement["kept_after"]["d"] >= len(VARIANTS["d"])
    # a budget the bank already exceeds would need the others re-planned: refused, said so
    one_error_line(
        run_main("add", tmp_path / "art", f"c={family / 'c'}", "--in-place", "--budget", "0.3"),
        "--replan is not supported",
    )
    # the base's stored experts serve the others too: it cannot leave a budget bank; d can
    one_error_line(
        run_main("remove", tmp_path / "art", "base", "--in-place"), "stores the expert of 'base'", "re-merge"
    )
    remove_variant(tmp_path / "art", "d", compact=True)
    assert verify_artifact(tmp_path / "art") == [] and Artifact.open(tmp_path / "art").model_names == list(names)
    for n in names:
        after = tensors_of(export_model(tmp_path / "art", n, tmp_path / f"again-{n}", force=True))
        assert all(torch.equal(after[k], v) for k, v in before[n].items()), n


def test_threshold_artifact_shares_what_lies_within_the_threshold(family, tmp_path):
    merge(
        open_checkpoints([f"base={family / 'base'}", f"a={family / 'a'}"]),
        tmp_path / "art",
        MergeSettings(mode="threshold", metric="cosine", threshold=0.999999),
    )
    r = add_variant(tmp_path / "art", f"c={family / 'c'}")
    assert verify_artifact(tmp_path / "art") == [] and r.placement is not None
    art = Artifact.open(tmp_path / "art")
    full = merge(
        open_checkpoints([f"{n}={family / n}" for n in ("base", "a", "c")]),
        tmp_path / "full",
        MergeSettings(mode="threshold", metric="cosine", threshold=0.999999),
    )
    # at a threshold this tight only bit-identical experts share, as in a merge of all three
    assert {x: art.bank_size(x) for x in art.layers} == full.bank_sizes
    assert_exports_bit_exact(tmp_path / "art", family, tmp_path)


# -- a crash at any phase ------------------------------------------------------------------


def crash_at(stage: str, at: int, change) -> int:
    """Run `change(progress)` in a forked child that dies (os._exit, no cleanup of any kind)
    the `at`-th time it reports `stage`; return the child's exit status (9: it died there)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        seen: dict[str, int] = {}

        def progress(s: str, done: int, total: int) -> None:
            seen[s] = seen.get(s, -1) + 1
            if s == stage and seen[s] == at:
                os._exit(9)

        try:
            change(progress)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


ADD_PHASES = [("plan", 1), ("non-expert", 3), ("write", 2), ("switch", 0), ("switch", 1)]
COMPACT_PHASES = [("write", 3), ("switch", 0), ("switch", 1)]


@pytest.mark.parametrize("stage,at", ADD_PHASES)
def test_a_crash_while_adding_leaves_a_valid_artifact(family, tmp_path, stage, at):
    art = copy_artifact(family / "art", tmp_path / "art")
    manifest = (art / "manifest.json").read_bytes()
    assert crash_at(stage, at, lambda progress: add_variant(art, f"d={family / 'd'}", progress=progress)) == 9
    assert verify_artifact(art) == []
    switched = (stage, at) == ("switch", 1)
    assert ((art / "manifest.json").read_bytes() == manifest) != switched
    assert ("d" in Artifact.open(art).model_names) == switched
    if (stage, at) == ("switch", 0):  # the complete new manifest, never switched in: ignored
        assert [p.name for p in art.glob(".manifest.json.tmp-*")]
        # and still an artifact that merge --force may replace
        merge(open_checkpoints([f"base={family / 'base'}"]), copy_artifact(art, tmp_path / "again"), force=True)
    # the next change goes through, over whatever the crash left
    add_variant(art, f"c={family / 'c'}")
    assert_exports_bit_exact(art, family, tmp_path, only=["c", "d"])


@pytest.mark.parametrize("stage,at", COMPACT_PHASES)
def test_a_crash_while_compacting_leaves_a_valid_artifact(family, tmp_path, stage, at):
    art = copy_artifact(family / "art", tmp_path / "art")
    manifest = (art / "manifest.json").read_bytes()
    assert crash_at(stage, at, lambda progress: remove_variant(art, "a", compact=True, progress=progress)) == 9
    assert verify_artifact(art) == []
    switched = (stage, at) == ("switch", 1)
    assert ((art / "manifest.json").read_bytes() == manifest) != switched
    assert ("a" in Artifact.open(art).model_names) != switched
    assert_exports_bit_exact(art, family, tmp_path)


# -- the command line ----------------------------------------------------------------------


def test_cli_add_and_remove(family, tmp_path):
    art = copy_artifact(family / "art", tmp_path / "art")
    r = run_main("add", art, f"c={family / 'c'}", "--in-place", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "c"
    r = run_main("remove", art, "a", "-o", tmp_path / "new", "--compact")
    assert r.returncode == 0, r.stderr
    assert "removed 'a'" in r.stdout
    assert Artifact.open(tmp_path / "new").model_names == ["base", "b", "c"]
    assert Artifact.open(art).model_names == ["base", "a", "b", "c"]
    assert_exports_bit_exact(tmp_path / "new", family, tmp_path)


def test_cli_refusals(family, tmp_path):
    art = family / "art"
    one_error_line(run_main("add", art, f"c={family / 'c'}"), "exactly one of -o NEW", "--in-place")
    one_error_line(run_main("add", art, f"c={family / 'c'}", "-o", tmp_path / "x", "--in-place"), "exactly one of")
    one_error_line(run_main("add", art, f"a={family / 'c'}", "-o", tmp_path / "x"), "already holds a model named 'a'")
    one_error_line(run_main("remove", art, "nope", "-o", tmp_path / "x"), "no model named 'nope'")
    one_error_line(
        run_main("add", art, f"c={family / 'c'}", "-o", tmp_path / "x", "--calibration", "c=cal.txt"),
        "--calibration applies to calibrated artifacts",
    )
    one_error_line(run_main("add", art, f"c={family / 'c'}", "-o", art), "an input of this command")
    # a checkpoint of another shape cannot join
    tok = tiny_tokenizer()
    save_model(tiny_mixtral(seed=1, intermediate_size=24), tmp_path / "wide", tok)
    one_error_line(run_main("add", art, f"w={tmp_path / 'wide'}", "-o", tmp_path / "x"), "shape mismatch", "w1")
    # the only model cannot be removed; a budget artifact cannot grow yet (said so)
    merge(open_checkpoints([f"base={family / 'base'}"]), tmp_path / "one")
    one_error_line(run_main("remove", tmp_path / "one", "base", "--in-place"), "only model")
    merge(
        open_checkpoints([f"base={family / 'base'}", f"a={family / 'a'}"]),
        tmp_path / "avg",
        MergeSettings(mode="average"),
    )
    one_error_line(run_main("add", tmp_path / "avg", f"c={family / 'c'}", "--in-place"), "mode 'average'", "re-merge")
    one_error_line(
        run_main("add", art, f"c={family / 'c'}", "-o", tmp_path / "x", "--replan"), "--replan", "not supported"
    )
    one_error_line(
        run_main("add", art, f"c={family / 'c'}", "-o", tmp_path / "x", "--budget", "0.5"), "--budget applies"
    )
    assert not (tmp_path / "x").exists()


# -- any sequence of changes -----------------------------------------------------------------


def test_any_sequence_of_adds_and_removes_stays_verifiable_and_bit_exact(family):
    """A hypothesis state machine: add and remove variants (in place or into a new directory,
    compacting or not) in any order; after every step the artifact verifies, holds exactly
    the variants added and not removed, and every one exports bit-exact."""
    import shutil
    import tempfile

    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

    pool = ["base", "a", "b", "c", "d"]

    class Changes(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.tmp = Path(tempfile.mkdtemp(prefix="grow-states-"))
            self.art = copy_artifact(family / "art", self.tmp / "art0")
            self.held = ["base", "a", "b"]
            self.n = 0

        def _target(self, elsewhere: bool) -> Path | None:
            self.n += 1
            return self.tmp / f"art{self.n}" if elsewhere else None

        @precondition(lambda self: len(self.held) < len(pool))
        @rule(data=st.data(), elsewhere=st.booleans())
        def add(self, data, elsewhere):
            name = data.draw(st.sampled_from([n for n in pool if n not in self.held]))
            out = self._target(elsewhere)
            add_variant(self.art, f"{name}={family / name}", out)
            self.art = out or self.art
            self.held.append(name)

        @precondition(lambda self: len(self.held) > 1)
        @rule(data=st.data(), elsewhere=st.booleans(), compact=st.booleans())
        def remove(self, data, elsewhere, compact):
            name = data.draw(st.sampled_from(self.held))
            out = self._target(elsewhere)
            remove_variant(self.art, name, out, compact=compact)
            self.art = out or self.art
            self.held.remove(name)

        @invariant()
        def verifies_and_exports_bit_exact(self):
            assert Artifact.open(self.art).model_names == self.held
            assert_exports_bit_exact(self.art, family, self.tmp)

        def teardown(self):
            shutil.rmtree(self.tmp, ignore_errors=True)

    run_state_machine_as_test(
        Changes,
        settings=settings(
            max_examples=6, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
