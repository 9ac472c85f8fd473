"""`moeconsol analyze` end to end: JSON schema, stdout JSON, heatmap PNG, hub cache, errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import cli

from moeconsol import testing as T
from moeconsol.analysis.similarity import layer_similarity
from moeconsol.cli import main
from moeconsol.io.checkpoint import open_checkpoints

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = T.tiny_tokenizer()
    base = T.tiny_mixtral(seed=0)
    switch = T.tiny_switch(seed=0)
    out = {
        "base": T.save_model(base, root / "base", tok),
        "code": T.save_model(
            T.derive_variant(base, 1, [(0, 1), (1, 3)]), root / "code", fused=True, max_shard_size="20KB"
        ),
        "switch": T.save_model(switch, root / "switch", tok),
        "switch-ft": T.save_model(T.derive_variant(switch, 2, [(1, 0)]), root / "switch-ft"),
        "eight": T.save_model(T.tiny_mixtral(seed=0, num_local_experts=8), root / "eight"),
        "wide": T.save_model(T.tiny_mixtral(seed=0, intermediate_size=48), root / "wide"),
    }
    # Not a checkpoint, a pickle-only checkpoint, a truncated and a corrupt safetensors file.
    (root / "empty").mkdir()
    (root / "empty" / "README.md").write_text("nothing here")
    out["empty"] = root / "empty"
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(out["base"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    out["pickled"] = pickled
    truncated = shutil.copytree(out["base"], root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = truncated
    corrupt = shutil.copytree(out["base"], root / "corrupt")
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    out["corrupt"] = corrupt
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", **(env or {})}
    return cli("analyze", *args, env=full_env)


@pytest.fixture(scope="module")
def full_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = run_cli(
        str(models["base"]),
        f"coder={models['code']}",
        "-m",
        "cosine,l2",
        "--metric",
        "relative-l2",
        "-m",
        "cka",
        "--probes",
        "32",
        "--seed",
        "7",
        "--json",
        str(out / "report.json"),
        "--heatmap",
        str(out / "heat.png"),
    )
    return proc, out


def test_full_run_exit_and_tables(full_run):
    proc, _ = full_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model.layers.0: 4 same-index pairs across 2 models" in proc.stdout
    assert "model.layers.1" in proc.stdout
    assert "could share (of 4)" in proc.stdout
    assert "bit-identical" in proc.stdout and "CKA probes: 32 gaussian per layer (seed 7)" in proc.stdout


def test_json_schema_and_values(full_run, models):
    proc, out = full_run
    doc = json.loads((out / "report.json").read_text())
    assert doc["models"] == ["base", "coder"]
    assert doc["layouts"] == ["mixtral", "mixtral-fused"] and doc["architecture"] == "mixtral"
    assert doc["experts_per_layer"] == 4 and doc["dtype"] == "F32"
    assert doc["probes"] == {"kind": "gaussian", "count": 32, "seed": 7}
    assert list(doc["metrics"]) == ["cosine", "l2", "relative-l2", "cka"]
    ckpts = open_checkpoints([str(models["base"]), f"coder={models['code']}"])
    for li, layer in enumerate(["model.layers.0", "model.layers.1"]):
        expected = layer_similarity(ckpts, layer, ["cosine", "l2", "relative-l2"])
        for metric in ("cosine", "l2", "relative-l2"):
            entry = doc["metrics"][metric]["layers"][li]
            assert entry["layer"] == layer
            matrix = np.array(entry["matrix"])
            assert matrix.shape == (8, 8)
            assert np.array_equal(matrix, expected.matrices[metric])  # JSON floats round-trip exactly
        cka = np.array(doc["metrics"]["cka"]["layers"][li]["matrix"])
        assert cka.shape == (8, 8) and np.all((cka >= 0) & (cka <= 1))
    assert doc["metrics"]["l2"]["higher_is_more_alike"] is False
    # "code" changed expert 1 of layer 0 and expert 3 of layer 1; all else bit-identical.
    pairs = {d["layer"]: d["pairs"] for d in doc["identical"]}
    assert pairs["model.layers.0"] == [[0, 4], [2, 6], [3, 7]]
    assert pairs["model.layers.1"] == [[0, 4], [1, 5], [2, 6]]
    cos0 = np.array(doc["metrics"]["cosine"]["layers"][0]["matrix"])
    assert [[int(i), int(j)] for i, j in zip(*np.nonzero(np.triu(cos0 == 1.0, 1)))] == pairs["model.layers.0"]
    summary = doc["summary"][0]
    assert summary["layer"] == "model.layers.0" and summary["pairs"] == 4 and summary["identical_pairs"] == 3
    assert {"rule": "identical", "experts": 3} in summary["shared"]
    assert set(summary["metrics"]) == {"cosine", "l2", "relative-l2", "cka"}


def test_heatmap_is_a_png(full_run):
    _, out = full_run
    data = (out / "heat.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    import matplotlib.image

    image = matplotlib.image.imread(out / "heat.png")
    assert image.shape[:2] == (height, width) and image.std() > 0.05


def test_json_to_stdout_and_switch(models):
    proc = run_cli(str(models["switch"]), f"ft={models['switch-ft']}", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but JSON on stdout
    assert doc["architecture"] == "switch_transformers" and doc["models"] == ["switch", "ft"]
    assert [entry["layer"] for entry in doc["metrics"]["cosine"]["layers"]] == [
        "encoder.block.1.layer.1",
        "decoder.block.1.layer.2",
    ]
    assert doc["probes"] is None
    cos = np.array(doc["metrics"]["cosine"]["layers"][1]["matrix"])
    assert cos[0, 4] < 1.0 and cos[1, 5] == 1.0 and cos[2, 6] == 1.0


def test_calibration_text(models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(T.SAMPLE_TEXT)
    proc = run_cli(
        str(models["base"]),
        str(models["code"]),
        "-m",
        "cka",
        "--calibration",
        str(text),
        "--probes",
        "50",
        "--json",
        "-",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["probes"] == {"kind": "calibration", "count": 50, "seed": None, "file": str(text)}


def test_hub_repo_from_local_cache(models, tmp_path):
    """`org/name` resolves offline through a Hugging Face cache laid out by hand."""
    repo = tmp_path / "hub" / "models--org--tiny-base"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(models["base"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("org/tiny-base", f"code={models['code']}", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["models"] == ["tiny-base", "code"] and doc["sources"][0] == "org/tiny-base"
    proc = run_cli("org/absent", env=env)
    assert proc.returncode == 2 and "not in the Hugging Face cache" in proc.stderr


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("moeconsol: error: ")
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("unknown-metric", "unknown --metric 'euclid'"),
        ("pickled", "only pickle weights (pytorch_model.bin)"),
    ],
)
def test_errors_in_a_subprocess(models, tmp_path, case, message):
    args = {
        "missing": [str(tmp_path / "nope"), str(models["base"])],
        "unknown-metric": [str(models["base"]), str(models["code"]), "-m", "euclid"],
        "pickled": [str(models["pickled"]), str(models["base"])],
    }[case]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in _one_error_line(proc.stderr)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "not a checkpoint (no config.json, no *.safetensors)"),
        ("truncated", "truncated: tensor"),
        ("corrupt", "corrupt safetensors header"),
        ("mixed", "mixed architectures: 'switch' vs 'base': switch_transformers vs mixtral"),
        ("experts", "expert count mismatch: 'eight' vs 'base': 8 vs 4"),
        ("shapes", "shape mismatch: 'wide' vs 'base': expert part w1 is [48, 32] vs [64, 32]"),
        ("heatmap-ext", "give a file name ending in .png"),
        ("probes", "--probes must be at least 2"),
        ("calibration", "calibration file not found"),
        ("json-dir", "does not exist"),
    ],
)
def test_errors_via_main(models, tmp_path, monkeypatch, capsys, case, message):
    """The same `main()` the console script runs, in-process (faster than a subprocess each)."""
    base = str(models["base"])
    args = {
        "empty": [str(models["empty"]), base],
        "truncated": [base, str(models["truncated"])],
        "corrupt": [base, str(models["corrupt"])],
        "mixed": [base, str(models["switch"])],
        "experts": [base, str(models["eight"])],
        "shapes": [base, str(models["wide"])],
        "heatmap-ext": [base, str(models["code"]), "--heatmap", str(tmp_path / "x.jpg")],
        "probes": [base, str(models["code"]), "-m", "cka", "--probes", "1"],
        "calibration": [base, str(models["code"]), "-m", "cka", "--calibration", str(tmp_path / "none.txt")],
        "json-dir": [base, str(models["code"]), "--json", str(tmp_path / "no" / "dir" / "r.json")],
    }[case]
    monkeypatch.setattr(sys, "argv", ["moeconsol", "analyze", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_no_models_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Missing argument" in proc.stderr
