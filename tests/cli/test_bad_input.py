"""Every unexpected input is one line and exit 2, never a traceback;
NaN is never written; what the safetensors library refuses is refused; a damaged bank is
never served."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, one_error_line, run_main

from moeconsol import cli as cli_module
from moeconsol.artifact.reader import Artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import (
    ArtifactError,
    CheckpointError,
    DamagedArtifactError,
    MoeconsolWarning,
    SafetensorsError,
    SettingsError,
)
from moeconsol.io.checkpoint import open_checkpoint
from moeconsol.io.safetensors_file import read_header


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def rewrite_header(path: Path, edit) -> None:
    """Let `edit` change the JSON header of a safetensors file; the data stays as it was."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def first_expert(header: dict) -> str:
    return next(k for k in header if ".experts." in k)


def set_entry(field, value, pick=first_expert):
    def edit(header):
        header[pick(header)][field] = value

    return edit


# -- item 5: every listed trigger is one line, exit 2 ---------------------------------------


@pytest.mark.parametrize(
    "config, fragment",
    [("[1, 2]", "must be a JSON object"), ("null", "must be a JSON object"), ('{"model_type": 7}', "model_type")],
)
def test_config_that_is_not_an_object(small_family, tmp_path, config, fragment):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    (ckpt / "config.json").write_text(config)
    for command in ("merge", "analyze"):
        args = [small_family / "base", ckpt] + (["-o", tmp_path / "out"] if command == "merge" else [])
        one_error_line(run_main(command, *args), "config.json", fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit",
    [
        set_entry("shape", "ab"),
        set_entry("shape", [64.0, 32.0]),
        set_entry("shape", [-64, -32]),
        set_entry("data_offsets", ["0", "8192"]),
        set_entry("data_offsets", [0]),
        set_entry("dtype", "F128"),
        set_entry("dtype", None),
        lambda h: h.__setitem__(first_expert(h), "not an entry"),
    ],
    ids=[
        "shape-string",
        "shape-floats",
        "shape-negative",
        "offsets-strings",
        "offsets-one",
        "dtype-unknown",
        "dtype-null",
        "entry-string",
    ],
)
def test_corrupt_header_entries(small_family, tmp_path, edit):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    rewrite_header(ckpt / "model.safetensors", edit)
    one_error_line(run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out"), "corrupt safetensors header")
    with pytest.raises(SafetensorsError):
        read_header(ckpt / "model.safetensors")


def test_expert_of_shape_empty_in_a_valid_file(small_family, tmp_path):
    """A well-formed file whose expert tensor is a scalar: refused as a checkpoint problem."""
    from safetensors.torch import load_file, save_file

    ckpt = copy(small_family / "ft", tmp_path / "ft")
    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k in tensors if ".experts." in k)
    tensors[name] = torch.tensor(1.0)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    one_error_line(run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out"), "2-D matrix")
    with pytest.raises(CheckpointError, match="2-D"):
        open_checkpoint(str(ckpt))


@pytest.mark.parametrize("value", [7, None, ["model-00001-of-00002.safetensors"], {"a": 1}])
def test_non_string_index_entry(small_family, tmp_path, value):
    ckpt = copy(small_family / "base", tmp_path / "base")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = value
    index_path.write_text(json.dumps(index))
    one_error_line(run_main("merge", ckpt, small_family / "ft", "-o", tmp_path / "out"), "corrupt index")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m.__setitem__("files", ["bank.safetensors"]), "files is a list, expected an object"),
        (lambda m: m.__setitem__("files", None), "files is null"),
        (lambda m: m["layers"][0]["slot_map"].__setitem__("ft", ["0", "1", "2", "3"]), "expected an integer"),
        (lambda m: m["layers"][0]["slot_map"].__setitem__("ft", "0123"), "expected a list"),
        (lambda m: m["models"][0].__setitem__("files", "config.json"), "expected a list"),
        (lambda m: m["models"][0].__setitem__("layout", "llama"), "layout"),
        (lambda m: m["models"][0].__setitem__("config", [1, 2]), "config is a list"),
        (lambda m: m["shapes"][next(iter(m["shapes"]))].__setitem__("shape", "ab"), "expected a list"),
        (lambda m: m.__setitem__("experts_per_layer", True), "expected an integer"),
        (lambda m: m.__setitem__("models", {}), "expected a list"),
        (lambda m: m["layers"][0].__setitem__("slot_map", {"base": [0, 1, 2, 3]}), "slot_map names models"),
        (lambda m: m.__setitem__("dtype", "F99"), "not a safetensors dtype"),
        (lambda m: m["models"][1].__setitem__("layout", "switch"), "does not store mixtral experts"),
        (lambda m: m.__setitem__("architecture", "llama"), "architecture"),
        (lambda m: m["part_shapes"].__setitem__("w1", []), "2-D"),
    ],
)
def test_manifest_of_wrong_types(small_family, tmp_path, edit, fragment):
    art = copy(small_family / "art", tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    for command in (["verify", art], ["inspect", art], ["export", art, "base", "-o", tmp_path / "out"]):
        one_error_line(run_main(*command), "corrupt manifest", fragment)
    assert not (tmp_path / "out").exists()


def test_manifest_dtype_that_disagrees_with_the_bank(small_family, tmp_path):
    """Found by the property test below: a manifest whose expert dtype is not the bank
    tensors' dtype is named by verify and export, not left to fail in the writer."""
    art = copy(small_family / "art", tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["dtype"] == "F32"
    manifest["dtype"] = "F16"
    (art / "manifest.json").write_text(json.dumps(manifest))
    r = run_main("verify", art)
    assert r.returncode == 1 and "must be F16 [64, 32] (the manifest's expert dtype" in r.stdout, r.stdout + r.stderr
    one_error_line(run_main("export", art, "base", "-o", tmp_path / "out"), "damaged artifact", "must be F16")
    assert not (tmp_path / "out").exists()


def test_manifest_with_nan_refused(small_family, tmp_path):
    art = copy(small_family / "art", tmp_path / "art")
    text = (art / "manifest.json").read_text().replace('"experts_per_layer": 4', '"experts_per_layer": NaN')
    (art / "manifest.json").write_text(text)
    one_error_line(run_main("inspect", art), "corrupt manifest", "NaN")


def test_dangling_output_symlink_refused_up_front(small_family, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    one_error_line(run_main("merge", small_family / "base", small_family / "ft", "-o", link), "symbolic link")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_catch_all_handler_shows_the_bug_not_a_crash_of_its_own(monkeypatch, capsys):
    """An unexpected exception (a bug) propagates as itself: one traceback, not a second one
    from inside the handler (typer's vendored click has no `Abort`)."""

    def boom(**kwargs):
        raise RuntimeError("a bug")

    cli_module.load_commands()  # registered on the real app before it is replaced
    monkeypatch.setattr(cli_module, "app", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_module.main()
    import typer

    def abort(**kwargs):
        raise typer.Abort()

    monkeypatch.setattr(cli_module, "app", abort)
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "moeconsol: aborted"


def test_console_script_bad_config_no_traceback(small_family, tmp_path):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    (ckpt / "config.json").write_text("[1, 2]")
    r = cli("merge", small_family / "base", ckpt, "-o", tmp_path / "out")
    one_error_line(r, "must be a JSON object")


# -- item 6: NaN and infinities -------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_scale_and_density_must_be_finite(small_family, tmp_path, value):
    for option in ("--scale", "--density"):
        r = run_main(
            "merge",
            small_family / "base",
            small_family / "ft",
            "-o",
            tmp_path / "out",
            "--mode",
            "ties",
            "--base",
            small_family / "base",
            option,
            value,
        )
        one_error_line(r, "finite")
    with pytest.raises(SettingsError, match="finite"):
        from moeconsol.io.checkpoint import open_checkpoints

        merge(
            open_checkpoints([str(small_family / "base"), str(small_family / "ft")]),
            tmp_path / "out",
            MergeSettings(mode="task-arithmetic", base=str(small_family / "base"), scale=float(value)),
        )
    assert not (tmp_path / "out").exists()


def test_threshold_nan_refused(small_family, tmp_path):
    r = run_main(
        "merge",
        small_family / "base",
        small_family / "ft",
        "-o",
        tmp_path / "out",
        "--mode",
        "threshold",
        "--threshold",
        "nan",
    )
    one_error_line(r, "finite")


def _poison_expert(ckpt: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    tensors[name] = (
        torch.full_like(tensors[name], value)
        if value == 0
        else tensors[name].clone().index_fill_(0, torch.tensor([0]), value)
    )
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(
    "value, what", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (0.0, "all zero")]
)
def test_unusual_experts_warn(small_family, tmp_path, value, what):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    _poison_expert(ckpt, value)
    r = run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("moeconsol: warning:")]
    assert (
        len(warnings) == 1 and what in warnings[0] and "model.layers.1" in warnings[0] and "expert 3" in warnings[0]
    ), r.stderr
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"manifest holds {c}"))
    with pytest.warns(MoeconsolWarning, match=what):
        from moeconsol.io.checkpoint import open_checkpoints

        merge(
            open_checkpoints([str(small_family / "base"), str(ckpt)]), tmp_path / "out2", MergeSettings(mode="average")
        )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_unusual_values_checked_in_every_float_dtype(dtype):
    from moeconsol.io.checkpoint import warn_unusual_values

    with pytest.warns(MoeconsolWarning, match="NaN or infinite"):
        warn_unusual_values("m", "layer", 0, "w1", torch.full((4, 4), float("nan")).to(dtype))
    with pytest.warns(MoeconsolWarning, match="all zero"):
        warn_unusual_values("m", "layer", 0, "w1", torch.zeros(4, 4, dtype=dtype))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unusual_values("m", "layer", 0, "w1", torch.ones(4, 4).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_flags_against_elementwise_checks(dtype):
    """`value_flags` (one L1-norm pass) agrees with isfinite/any element by element, also
    where the norm itself overflows although every value is finite, and for one tiny value."""
    from moeconsol.io.digest import value_flags

    big = torch.finfo(dtype).max
    cases = [
        torch.full((64,), big, dtype=dtype),
        torch.zeros(64, dtype=dtype),
        torch.randn(64).to(dtype),
        torch.zeros(64, dtype=dtype).index_fill_(0, torch.tensor([7]), torch.finfo(dtype).tiny),
        torch.randn(64).to(dtype).index_fill_(0, torch.tensor([3]), float("-inf")),
    ]
    for t in cases:
        assert value_flags(t) == (bool(torch.isfinite(t).all()), bool(t.any())), t


# -- item 7: FIFOs, overlapping offsets, metadata, config that disagrees with the tensors ----


def finishes(fifo: Path, work, timeout: float = 60):
    """Run `work()` in a thread; if it is still blocked on `fifo` after `timeout`, unblock it
    (open and close the writing end) and fail: the code under test opened a FIFO."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=work()), daemon=True)
    thread.start()
    thread.join(timeout=timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=30)
        pytest.fail(f"blocked on the FIFO {fifo.name}")
    return result.get("value")


def test_fifo_named_model_safetensors_does_not_hang(small_family, tmp_path):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    r = finishes(
        ckpt / "model.safetensors", lambda: run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out")
    )
    one_error_line(r, "not a regular file")


def test_fifo_config_does_not_hang(small_family, tmp_path):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")

    def open_it():
        with pytest.raises(CheckpointError, match="not a regular file"):
            open_checkpoint(str(ckpt))
        return True

    assert finishes(ckpt / "config.json", open_it)


def test_overlapping_offsets_refused_like_the_safetensors_library(small_family, tmp_path):
    from safetensors import SafetensorError, safe_open

    ckpt = copy(small_family / "ft", tmp_path / "ft")
    path = ckpt / "model.safetensors"

    def overlap(header):  # two experts of one shape: the second now points at the first's bytes
        a = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
        b = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    rewrite_header(path, overlap)
    with pytest.raises(SafetensorError):
        safe_open(path, "pt")
    with pytest.raises(SafetensorsError, match="overlaps|gap"):
        read_header(path)
    one_error_line(run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out"), "corrupt safetensors")


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"format": None}])
def test_non_string_metadata_refused(small_family, tmp_path, metadata):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    rewrite_header(ckpt / "model.safetensors", lambda h: h.__setitem__("__metadata__", metadata))
    one_error_line(run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out"), "__metadata__")


def test_trailing_bytes_refused(small_family, tmp_path):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    with open(ckpt / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(SafetensorsError, match="after the last tensor"):
        read_header(ckpt / "model.safetensors")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"num_hidden_layers": 3}, "MoE layers"),
        ({"num_local_experts": 8}, "[8, 32] by the config"),
        ({"intermediate_size": 48}, "in the weights"),
        ({"vocab_size": 400}, "embed_tokens"),
        ({"num_attention_heads": 5}, "q_proj"),
        ({"hidden_act": "no-such-function"}, "transformers cannot build"),
    ],
)
def test_config_disagreeing_with_tensors_refused_at_merge(small_family, tmp_path, change, fragment):
    ckpt = copy(small_family / "ft", tmp_path / "ft")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(change)
    (ckpt / "config.json").write_text(json.dumps(config))
    one_error_line(run_main("merge", small_family / "base", ckpt, "-o", tmp_path / "out"), "config.json", fragment)
    assert not (tmp_path / "out").exists()


# -- item 8: a flipped bit is never served ---------------------------------------------------


def _flip_bank_bit(art: Path) -> str:
    shard = sorted(art.glob("bank-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard.name


def test_loader_finds_a_flipped_bit_before_returning_any_tensor(small_family, tmp_path):
    art_path = copy(small_family / "art", tmp_path / "art")
    name = _flip_bank_bit(art_path)
    art = Artifact.open(art_path)
    layer = art.layers[0]
    with pytest.raises(DamagedArtifactError, match=f"{name}: sha256 mismatch"):
        art.bank_expert(layer, 0)
    # without checksums the size and header are still checked
    with open(art_path / name, "r+b") as f:
        f.truncate((art_path / name).stat().st_size - 8)
    with pytest.raises(DamagedArtifactError, match="size"):
        Artifact.open(art_path, checksums=False).bank_expert(layer, 0)


def test_loader_checks_side_files_of_a_model(small_family, tmp_path):
    art_path = copy(small_family / "art", tmp_path / "art")
    (art_path / "models" / "ft" / "tokenizer.json").write_text("{}")
    with pytest.raises(DamagedArtifactError, match="tokenizer.json"):
        Artifact.open(art_path).model_dir("ft")
    assert Artifact.open(art_path).model_dir("base").is_dir()


def test_serve_local_refuses_a_flipped_bit(small_family, tmp_path):
    art_path = copy(small_family / "art", tmp_path / "art")
    name = _flip_bank_bit(art_path)
    r = run_main("serve-local", art_path, "--prompt", "hello", "--max-new-tokens", "2")
    one_error_line(r, "damaged artifact", name)


# -- the error hierarchy -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        MergeSettings(mode="threshold"),
        MergeSettings(mode="budget"),
        MergeSettings(mode="reference"),
        MergeSettings(mode="ties"),
        MergeSettings(mode="average", base="x"),
        MergeSettings(threshold=0.5),
        MergeSettings(mode="budget", budget="0.5", threshold=0.5),
        MergeSettings(representative="best"),
        MergeSettings(mode="ties", base="x", density=2.0),
        MergeSettings(mode="calibrated", budget="0.5"),
        MergeSettings(mode="task-arithmetic", base="x", scale=float("nan")),
    ],
)
def test_library_settings_errors_name_no_cli_flags(small_family, tmp_path, settings):
    """A library caller gets a SettingsError whose message speaks of settings, not flags."""
    from moeconsol.io.checkpoint import open_checkpoints

    ckpts = open_checkpoints([str(small_family / "base"), str(small_family / "ft")])
    with pytest.raises(SettingsError) as e:
        merge(ckpts, tmp_path / "out", settings)
    assert "--" not in str(e.value)


def test_errors_are_told_apart_and_keep_their_cause(small_family, tmp_path):
    from moeconsol.errors import IncompatibleModelsError, MoeconsolError, OutputError, UnknownModelError
    from moeconsol.io.checkpoint import open_checkpoints
    from moeconsol.testing import save_model, tiny_mixtral

    save_model(tiny_mixtral(seed=0, intermediate_size=48), tmp_path / "wide")
    with pytest.raises(IncompatibleModelsError, match="shape mismatch"):
        open_checkpoints([str(small_family / "base"), str(tmp_path / "wide")])
    with pytest.raises(UnknownModelError, match="no model named 'nope'"):
        Artifact.open(small_family / "art").config("nope")
    with pytest.raises(OutputError, match="already exists"):
        merge(open_checkpoints([str(small_family / "base")]), small_family / "art")
    bad = copy(small_family / "ft", tmp_path / "ft")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(bad))
    assert isinstance(e.value.__cause__, ValueError)
    art = copy(small_family / "art", tmp_path / "art")
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError) as e:
        Artifact.open(art)
    assert isinstance(e.value.__cause__, ValueError)
    assert all(
        issubclass(c, MoeconsolError)
        for c in (IncompatibleModelsError, UnknownModelError, OutputError, CheckpointError, ArtifactError)
    )
