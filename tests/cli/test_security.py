"""Nothing is ever written or read outside the directories named.

Each test tampers with a real artifact or checkpoint the way an attacker could (a crafted
manifest, index or model name) or points an output at an input, runs the real command, and
checks: one error line, exit 2, and nothing written outside (or over) what was named.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import correction_family, merge_with_corrections
from cli_helpers import cli, one_error_line, run_main
from safetensors.torch import load_file, save_file

from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.errors import ArtifactError, MoeconsolError, OutputError, UnsafePathError
from moeconsol.io.checkpoint import open_checkpoints, parse_model_ref
from moeconsol.io.safetensors_file import dtype_names
from moeconsol.serving.runtime import Runtime


@pytest.fixture(scope="module")
def family(small_family):
    return small_family


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` (and its bytes' sha256): to prove nothing changed."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def tampered(family: Path, tmp_path: Path, edit) -> Path:
    """A copy of the artifact, two levels below tmp_path, whose manifest `edit` changed."""
    art = shutil.copytree(family / "art", tmp_path / "a" / "b" / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest, art)
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


def _record(art: Path, manifest: dict, name: str) -> None:
    p = art / name
    manifest["files"][name] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def escape_model_file(manifest: dict, art: Path) -> None:
    # the attack: a side file "../../victim.txt" of model ft, listed with its sha256
    (art / "victim.txt").write_text("attacker's content")
    manifest["models"][1]["files"].append("../../victim.txt")
    _record(art, manifest, "models/ft/../../victim.txt")


def escape_source_shard(manifest: dict, art: Path) -> None:
    shards = manifest["models"][1]["source_shards"]
    shards["../../victim.safetensors"] = shards.pop("model.safetensors")


def escape_weight_map(manifest: dict, art: Path) -> None:
    key = next(iter(manifest["weight_map"]))
    manifest["weight_map"][key] = "../outside.safetensors"


def absolute_files_entry(manifest: dict, art: Path) -> None:
    manifest["files"]["../../../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}


def absolute_weight_map(manifest: dict, art: Path) -> None:
    key = next(iter(manifest["weight_map"]))
    manifest["weight_map"][key] = "/etc/passwd"


def unsafe_model_name(manifest: dict, art: Path) -> None:
    manifest["models"][1]["name"] = "../../ft"
    for layer in manifest["layers"]:
        layer["slot_map"]["../../ft"] = layer["slot_map"].pop("ft")


@pytest.mark.parametrize(
    "edit",
    [
        escape_model_file,
        escape_source_shard,
        escape_weight_map,
        absolute_files_entry,
        absolute_weight_map,
        unsafe_model_name,
    ],
)
def test_crafted_manifest_paths_refused_by_every_command(family, tmp_path, edit):
    art = tampered(family, tmp_path, edit)
    out = tmp_path / "a" / "b" / "out"
    data = tmp_path / "data.txt"
    data.write_text("some text to score")
    before = tree_digest(tmp_path)
    commands = (
        ["verify", art],
        ["inspect", art],
        ["export", art, "ft", "-o", out],
        ["export", art, "base", "-o", out],
        ["serve-local", art, "--prompt", "hello"],
        ["eval", art, "--data", f"base={data}"],
    )
    for command in commands:
        r = run_main(*command)
        one_error_line(r, "unsafe")
    if edit is escape_model_file:  # the console script itself, once
        one_error_line(cli("export", art, "ft", "-o", out), "unsafe")
    assert tree_digest(tmp_path) == before  # nothing written, in DIR or outside it
    assert not out.exists()
    with pytest.raises(ArtifactError, match="unsafe"):
        Artifact.open(art)


def test_symlink_inside_artifact_pointing_outside_is_damage(family, tmp_path):
    art = shutil.copytree(family / "art", tmp_path / "art")
    outside = tmp_path / "secret.json"
    shutil.copy(art / "models" / "ft" / "tokenizer.json", outside)  # same bytes: size and sha256 match
    (art / "models" / "ft" / "tokenizer.json").unlink()
    (art / "models" / "ft" / "tokenizer.json").symlink_to(outside)
    problems = verify_artifact(art)
    assert problems and "resolves outside" in problems[0]
    r = run_main("export", art, "ft", "-o", tmp_path / "out")
    one_error_line(r, "damaged artifact", "resolves outside")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../evilname", "/abs", ".", "..", "a/b", "x" * 65, "sp ace", ""])
def test_unsafe_model_names_refused(family, tmp_path, name):
    work = tmp_path / "x" / "y"
    work.mkdir(parents=True)
    r = run_main("merge", f"{name}={family / 'base'}", f"ft={family / 'ft'}", "-o", work / "out")
    one_error_line(r, "model" if name else "NAME=PATH")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no side file anywhere, no temp dir left
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["x", "y"]


def test_name_rule_accepts_ordinary_names():
    for name in ("base", "Mixtral-8x7B-v0.1", "code_2", "v1.5"):
        assert parse_model_ref(f"{name}=/somewhere").name == name
    with pytest.raises(UnsafePathError, match="a name must be"):
        parse_model_ref("../x=/somewhere")


def test_index_mapping_outside_the_checkpoint_refused(family, tmp_path):
    ckpt = shutil.copytree(family / "base", tmp_path / "d" / "base")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.move(ckpt / shard, tmp_path / "d" / "outside.safetensors")
    index["weight_map"] = {t: ("../outside.safetensors" if f == shard else f) for t, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    before = tree_digest(tmp_path)
    for command in (["merge", ckpt, family / "ft", "-o", tmp_path / "out"], ["analyze", ckpt, family / "ft"]):
        one_error_line(run_main(*command), "unsafe path", "outside.safetensors")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
    with pytest.raises(UnsafePathError):
        open_checkpoints([str(ckpt)])


def test_force_never_replaces_an_input_of_merge(family, tmp_path):
    base = shutil.copytree(family / "base", tmp_path / "base")
    before = tree_digest(base)
    for out in (base, base / "sub", tmp_path):  # the input, inside it, a directory holding it
        r = run_main("merge", f"base={base}", f"ft={family / 'ft'}", "-o", out, "--force")
        one_error_line(r, "an input of this command")
    assert tree_digest(base) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_force_never_replaces_the_artifact_it_exports_from(family, tmp_path):
    art = shutil.copytree(family / "art", tmp_path / "art")
    before = tree_digest(art)
    for out in (art, art / "models" / "base", art / "models" / "new"):
        one_error_line(run_main("export", art, "base", "-o", out, "--force"), "an input of this command")
        with pytest.raises(OutputError, match="input"):
            export_model(art, "base", out, force=True)
    assert tree_digest(art) == before
    assert verify_artifact(art) == []


def test_force_replaces_a_checkpoint_only_when_it_holds_nothing_else(family, tmp_path):
    art = family / "art"
    notes = shutil.copytree(family / "base", tmp_path / "notes")
    (notes / "thesis.txt").write_text("years of work")
    one_error_line(run_main("export", art, "base", "-o", notes, "--force"), "not replacing it")
    assert (notes / "thesis.txt").read_text() == "years of work"
    sub = shutil.copytree(family / "base", tmp_path / "sub")
    (sub / "data").mkdir()
    one_error_line(run_main("export", art, "base", "-o", sub, "--force"), "not replacing it")
    assert (sub / "data").is_dir()
    plain = shutil.copytree(family / "ft", tmp_path / "plain")  # only checkpoint files: replaceable
    assert run_main("export", art, "base", "-o", plain, "--force").returncode == 0
    assert (plain / "model.safetensors.index.json").is_file()  # now base's files
    other_art = shutil.copytree(art, tmp_path / "other_art")
    (other_art / "README.txt").write_text("mine")
    one_error_line(run_main("export", art, "base", "-o", other_art, "--force"), "not replacing it")


def test_output_symlink_refused_before_any_work(family, tmp_path):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    for args in (
        ["merge", family / "base", family / "ft", "-o", dangling],
        ["export", family / "art", "base", "-o", dangling],
    ):
        one_error_line(run_main(*args), "symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


# -- tampered corrections: every reader goes through one validator ------------------------------


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """Three tiny Mixtral fine-tunes merged calibrated with lowrank corrections (`--deltas`)."""
    fam = correction_family(tmp_path_factory.mktemp("corrected"), "mixtral")
    merge_with_corrections(fam, fam["root"] / "art", fmt="lowrank")
    return fam


def _first_delta(manifest: dict) -> tuple[dict, str, dict]:
    """(layer entry, model, delta) of the first delta slot."""
    return next((e, n, items[0]) for e in manifest["layers"] for n, items in e.get("deltas", {}).items() if items)


def _rewrite_component(manifest: dict, art: Path, change) -> str:
    """Replace the first delta's first component in its shard by `change(tensor)` (None: drop
    it) and make the manifest agree (shapes, weight_map, the file's size and sha256), as
    anyone who can write the artifact can; returns its key."""
    _, _, x = _first_delta(manifest)
    key = next(iter(next(iter(x["keys"].values())).values()))
    file = manifest["weight_map"][key]
    tensors = load_file(art / file)
    new = change(tensors.pop(key))
    if new is None:
        del manifest["weight_map"][key], manifest["shapes"][key]
    else:
        tensors[key] = new
        manifest["shapes"][key] = {"dtype": dtype_names()[new.dtype], "shape": list(new.shape)}
    save_file(tensors, art / file)
    _record(art, manifest, file)
    return key


def component_wrong_shape(manifest: dict, art: Path) -> list[str]:
    key = _rewrite_component(manifest, art, lambda t: torch.cat([t, t[:, :1]], dim=1))  # lowrank a: one rank more
    return [manifest["weight_map"][key], key, "must be F32"]


def component_wrong_dtype(manifest: dict, art: Path) -> list[str]:
    key = _rewrite_component(manifest, art, lambda t: t.half())
    return [manifest["weight_map"][key], key, "is F16", "must be F32"]


def component_missing(manifest: dict, art: Path) -> list[str]:
    key = _rewrite_component(manifest, art, lambda t: None)
    return [key, "weight_map does not store"]


def size_huge(manifest: dict, art: Path) -> list[str]:
    _first_delta(manifest)[2]["size"] = 10**9
    return ["size 1000000000 is outside"]


def delta_bank_out_of_range(manifest: dict, art: Path) -> list[str]:
    _first_delta(manifest)[2]["bank"] = 99
    return ["is 99, outside the layer's bank"]


def slot_map_out_of_range(manifest: dict, art: Path) -> list[str]:
    entry, name, x = _first_delta(manifest)
    e = next(i for i in range(len(entry["slot_map"][name])) if i != x["expert"])
    entry["slot_map"][name][e] = 99
    return [f"slot map of {name!r} is out of range", f"expert {e} -> bank entry 99"]


@pytest.mark.parametrize(
    "edit",
    [
        component_wrong_shape,
        component_wrong_dtype,
        component_missing,
        size_huge,
        delta_bank_out_of_range,
        slot_map_out_of_range,
    ],
)
def test_tampered_corrections_refused_by_every_reader(corrected, tmp_path, edit):
    """A correction tampered with (its file rewritten and the manifest made to agree) is
    refused the same way by every command and by the Python API: one line naming the file
    and tensor, exit 2 (verify: the problem listed, exit 1; a manifest it cannot take, 2)."""
    art = shutil.copytree(corrected["root"] / "art", tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    fragments = edit(manifest, art)
    (art / "manifest.json").write_text(json.dumps(manifest))
    name = _first_delta(manifest)[1]
    out = tmp_path / "out"
    for command in (
        ["serve-local", art, "--model", name, "--prompt", "hello", "--max-new-tokens", "2"],
        ["eval", art, "--data", f"{name}={corrected['cal']}"],
        ["export", art, name, "-o", out],
    ):
        one_error_line(run_main(*command), *fragments)
    with pytest.raises(MoeconsolError) as e:
        Runtime.from_artifact(art)
    assert all(f in str(e.value) for f in fragments), e.value
    r = run_main("verify", art)
    if r.returncode == 2:  # the manifest itself is refused
        one_error_line(r, *fragments)
    else:
        assert r.returncode == 1
        assert all(line.startswith("moeconsol: checking files") for line in r.stderr.splitlines()), r.stderr  # progress
        assert any(all(f in line for f in fragments) for line in r.stdout.splitlines()), r.stdout
    assert not out.exists()
