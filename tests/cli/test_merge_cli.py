"""The merge/export/inspect/verify commands: exit codes, one-line errors, interrupted merges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, one_error_line
from safetensors import safe_open

from moeconsol.cli import main
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=3)
    save_model(base, root / "base", tok, max_shard_size="100KB")
    save_model(derive_variant(base, 4, [(0, 2)]), root / "ft", tok, fused=True)
    return root


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Bigger tiny models (about 100 MB each) so a merge lasts long enough to interrupt."""
    root = tmp_path_factory.mktemp("big")
    kw = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_local_experts=8, vocab_size=320)
    base = tiny_mixtral(seed=0, **kw)
    save_model(base, root / "a")
    save_model(derive_variant(base, 1, [(i, 0) for i in range(4)], change_non_experts=False), root / "b")
    return root


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`moeconsol ARGS` in process, through the same `main()` as the console script."""
    monkeypatch.setattr(sys, "argv", ["moeconsol", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_inspect_verify_export(family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "art"
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "merge",
        f"base={family / 'base'}",
        f"ft={family / 'ft'}",
        "-o",
        out,
        "--shard-size",
        "50KB",
        "--json",
    )
    assert code == 0
    s = json.loads(stdout)
    assert s["bank"] == {"model.layers.0": 5, "model.layers.1": 4}
    assert s["consolidation"]["mode"] == "lossless"
    assert s["bytes"]["artifact"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert len(list(out.glob("bank-*.safetensors"))) > 1

    code, stdout, _ = run(monkeypatch, capsys, "inspect", out)
    assert code == 0 and "model.layers.0" in stdout and "expert memory saved" in stdout
    code, stdout, _ = run(monkeypatch, capsys, "verify", out)
    assert code == 0 and stdout.startswith("ok:")

    code, _, _ = run(monkeypatch, capsys, "export", out, "ft", "-o", tmp_path / "ft")
    assert code == 0
    with (
        safe_open(family / "ft" / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "ft" / "model.safetensors", "pt") as b,
    ):
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    code, _, err = run(monkeypatch, capsys, "export", out, "ft", "-o", tmp_path / "ft")
    assert code == 2
    one_error_line(err, "already exists", "force")
    code, _, err = run(monkeypatch, capsys, "export", out, "nope", "-o", tmp_path / "x")
    assert code == 2
    one_error_line(err, "no model named 'nope'")

    code, _, err = run(monkeypatch, capsys, "merge", family / "base", family / "ft", "-o", out)
    assert code == 2
    one_error_line(err, "already exists")
    code, _, _ = run(
        monkeypatch,
        capsys,
        "merge",
        family / "base",
        family / "ft",
        "-o",
        out,
        "--force",
        "--mode",
        "threshold",
        "--threshold",
        "0",
        "--json",
    )
    assert code == 0
    code, stdout, _ = run(monkeypatch, capsys, "inspect", out, "--json")
    assert json.loads(stdout)["consolidation"]["threshold"] == 0.0
    assert sorted(os.listdir(tmp_path)) == ["art", "ft"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--mode", "threshold", "--threshold", "1.5"], ["--threshold 1.5 out of range for cosine"]),
        (["--mode", "threshold", "--metric", "l2", "--threshold", "-1"], ["out of range for l2"]),
        (["--mode", "budget", "--budget", "0.25"], ["--budget too small", "8 experts"]),
        (["--mode", "budget", "--budget", "10KB"], ["--budget too small"]),
        (["--mode", "budget", "--budget", "lots"], ["bad size 'lots'"]),
        (["--mode", "budget"], ["--mode budget needs a --budget"]),
        (["--shard-size", "5XB"], ["bad size"]),
        (["--representative", "median"], ["unknown --representative 'median'"]),
    ],
)
def test_bad_options_one_line_exit_2(family, tmp_path, monkeypatch, capsys, args, fragments):
    code, _, err = run(monkeypatch, capsys, "merge", family / "base", family / "ft", "-o", tmp_path / "o", *args)
    assert code == 2
    one_error_line(err, *fragments)
    assert os.listdir(tmp_path) == []


def test_subprocess_exit_codes(family, tmp_path):
    # bad input: missing model and missing artifact -> 2, one line, no traceback
    r = cli("merge", family / "base", tmp_path / "missing", "-o", tmp_path / "o")
    assert r.returncode == 2
    one_error_line(r.stderr, "no such directory")
    r = cli("verify", tmp_path / "nothing")
    assert r.returncode == 2
    one_error_line(r.stderr, "no such artifact")


def test_verify_and_export_of_damaged_artifacts(family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "art"
    assert run(monkeypatch, capsys, "merge", family / "base", family / "ft", "-o", out)[0] == 0
    shard = sorted(out.glob("bank-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    r = cli("verify", out)
    assert r.returncode == 1
    assert f"{shard.name}: sha256 mismatch" in r.stdout and "Traceback" not in r.stderr
    code, _, err = run(monkeypatch, capsys, "export", out, "base", "-o", tmp_path / "exp")
    assert code == 2
    one_error_line(err, "damaged artifact", shard.name)
    assert not (tmp_path / "exp").exists()

    with open(shard, "r+b") as f:
        f.truncate(100)
    code, stdout, _ = run(monkeypatch, capsys, "verify", out, "--json")
    assert code == 1
    assert json.loads(stdout)["problems"][0].startswith(f"{shard.name}: size 100 bytes")

    (out / "manifest.json").write_text('{"format": "moeconsol-artifact", "format_version": 1}')
    for command in (["inspect", out], ["export", out, "base", "-o", tmp_path / "exp"], ["verify", out]):
        code, _, err = run(monkeypatch, capsys, *command)
        assert code == 2
        one_error_line(err, "corrupt manifest")
    assert sorted(os.listdir(tmp_path)) == ["art"]


def interrupt_mid_write(big_family: Path, out: Path, sig: int) -> subprocess.Popen:
    """Start a merge, wait until its temporary directory holds a shard, send `sig`."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeconsol",
            "merge",
            big_family / "a",
            big_family / "b",
            "-o",
            out,
            "--shard-size",
            "2MB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C at its default, whatever this test runner inherited (a shell starts background
        # jobs with SIGINT ignored, and an ignored signal stays ignored across exec)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        tmp = [p for p in out.parent.glob(f".{out.name}.tmp-*")]
        if tmp and any(tmp[0].glob("bank-*")):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    else:
        proc.kill()
        pytest.fail("merge never started writing")
    assert proc.poll() is None, "merge finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def test_sigkill_mid_merge_leaves_no_output(big_family, tmp_path):
    out = tmp_path / "art"
    interrupt_mid_write(big_family, out, signal.SIGKILL)
    assert not out.exists()
    # only the hidden temporary directory may remain
    assert all(name.startswith(".art.tmp-") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_merge_says_so_and_cleans_up(big_family, tmp_path, sig):
    """SIGTERM and Ctrl-C mid-write: the documented line and exit code, nothing left behind."""
    out = tmp_path / "art"
    proc = interrupt_mid_write(big_family, out, sig)
    assert proc.returncode == 130
    assert os.listdir(tmp_path) == []
    assert proc.stderr.read().splitlines()[-1] == "moeconsol: interrupted"


def test_force_never_replaces_a_directory_moeconsol_did_not_write(family, tmp_path, monkeypatch, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = run(monkeypatch, capsys, "merge", family / "base", family / "ft", "-o", precious, "--force")
    assert code == 2
    one_error_line(err, "neither a moeconsol artifact nor a checkpoint", "not replacing it")
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["notes"]  # no temporary directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run(monkeypatch, capsys, "merge", family / "base", family / "ft", "-o", empty, "--force")
    assert code == 0 and (empty / "manifest.json").is_file()
