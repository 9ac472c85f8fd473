"""The bounds the merge and analyze benchmarks compare against, measured in the same run.

- `io_floor`: what any tool must spend to read the inputs and write the artifact's bytes:
  `cat` of every input safetensors file to /dev/null, `cp -r` of the artifact, `sync`.
- `mergekit_linear`: mergekit's linear merge of the same inputs (the peer users know),
  run from its own virtualenv (it pins other versions than moeconsol), followed by `sync`.
  Found through `--mergekit PATH` (its `mergekit-yaml`), `$MERGEKIT_YAML`, or PATH; None if
  it is not installed: `python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil


def communicate_polled(proc: subprocess.Popen) -> tuple[str | None, str | None, int]:
    """`proc.communicate()` while polling its RSS every 10 ms: (stdout, stderr, peak RSS)."""
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    return out, err, peak


def measured(cmd: list[str], cwd: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Wall seconds (including a `sync` of what it wrote) and peak RSS of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    _, err, peak = communicate_polled(proc)
    if proc.returncode not in ok_codes:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    os.sync()
    return time.perf_counter() - start, peak


def io_floor(dirs: list[Path], artifact: Path) -> dict[str, float]:
    """Seconds to read every input file and to copy the artifact (then sync)."""
    inputs = [str(f) for d in dirs for f in sorted(d.glob("*.safetensors"))]
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *inputs], check=True)
    read_s = time.perf_counter() - t0
    target = Path(tempfile.mkdtemp(prefix="floor-", dir=artifact.parent))
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(artifact), str(target / "copy")], check=True)
    os.sync()
    copy_s = time.perf_counter() - t0
    shutil.rmtree(target)
    os.sync()
    return {"read_inputs_seconds": read_s, "copy_artifact_seconds": copy_s, "floor_seconds": read_s + copy_s}


def find_mergekit(given: str | None) -> str | None:
    candidate = given or os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return candidate if candidate and Path(candidate).exists() else None


def mergekit_linear(mergekit_yaml: str, dirs: list[Path], out: Path) -> tuple[float, int]:
    """mergekit's linear merge of `dirs` (equal weights, bf16, no tokenizer): seconds, peak RSS."""
    models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in dirs)
    config = out.parent / f"{out.name}.yml"
    config.write_text(f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n")
    shutil.rmtree(out, ignore_errors=True)
    try:
        return measured([mergekit_yaml, str(config), str(out), "--no-copy-tokenizer", "--lazy-unpickle"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
        config.unlink()
