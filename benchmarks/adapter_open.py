"""Opening a LoRA adapter variant: peak memory and time of the merge on read.

Builds a Mixtral-shaped base (hidden 1024, expert FFN 2048, 4 MoE layers x 8 experts, vocab
8192, bf16, one file) and a peft LoRA adapter on it (r 16) on attention (`q_proj`, `v_proj`)
and on every expert (`target_parameters` = `gate_up_proj`, `down_proj`), B random. Then, in
a fresh subprocess polled for RSS every 5 ms, `open_checkpoints([base, adapter])` (what
analyze and merge do first), against:

- the bytes of the whole model (what a merge that loads it would hold) and of one expert's
  products (float32, as peft computes them): the merge holds one base tensor and the
  products in use. The base's transformers model built on the meta device (to resolve the
  adapter's module names: no weights, but the modeling code's imports) is measured apart;
- a plain `os.preadv` of the bytes the adapter changes (page-cached) and a write of as many
  bytes, for the time: the merge reads them, computes the products and writes them once.

Usage: python benchmarks/adapter_open.py [--keep DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN, INTERMEDIATE, LAYERS, EXPERTS, VOCAB, RANK = 1024, 2048, 4, 8, 8192, 16
MiB = 1024**2


def build(root: Path) -> tuple[Path, Path]:
    """The base and the adapter (see the module docstring), built once under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from moeconsol.testing import save_model, tiny_mixtral

    base_dir, adapter_dir = root / "base", root / "adapter"
    if (adapter_dir / "adapter_model.safetensors").exists():
        return base_dir, adapter_dir
    model = tiny_mixtral(
        0,
        dtype=torch.bfloat16,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_local_experts=EXPERTS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=HIDDEN // 8,
        vocab_size=VOCAB,
    )
    save_model(model, base_dir, max_shard_size="4GB")
    config = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def measure(base: Path, adapter: Path) -> dict:
    """In this (fresh) process: RSS after the imports, peak RSS while opening, time."""
    import psutil

    from moeconsol.io.adapter import _meta_model
    from moeconsol.io.checkpoint import open_checkpoint, open_checkpoints

    proc = psutil.Process()
    import torch  # noqa: F401  (the imports are part of the baseline, not of the open)
    import transformers  # noqa: F401

    imports = proc.memory_info().rss
    b = open_checkpoint(f"base={base}")
    _meta_model(b.config, b.layout.record)  # the modeling code's imports, once per process
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ckpts = open_checkpoints([f"base={base}", f"adapter={adapter}"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    thread.join()
    variant = ckpts[1]
    changed = [n for n, info in variant.tensors.items() if info != ckpts[0].tensors[n]]
    return {
        "rss_imports": imports,
        "rss_meta_model": before,
        "rss_peak": peak[0],
        "wall_s": wall,
        "cpu_s": cpu,
        "changed_tensors": len(changed),
        "changed_bytes": sum(variant.tensors[n].nbytes for n in changed),
        "model_bytes": sum(info.nbytes for info in ckpts[0].tensors.values()),
    }


def plain_io(base: Path, nbytes: int, scratch: Path) -> float:
    """Seconds to pread `nbytes` of the base (page-cached: the second pass is timed) and write as many."""
    from moeconsol.io.safetensors_file import CHUNK_BYTES

    file = base / "model.safetensors"
    buf = bytearray(CHUNK_BYTES)
    for _ in range(2):  # the first pass brings the bytes into the page cache
        t0 = time.perf_counter()
        fd = os.open(file, os.O_RDONLY)
        out = open(scratch / "plain.bin", "wb")
        try:
            pos = 0
            while pos < nbytes:
                n = os.preadv(fd, [memoryview(buf)[: min(CHUNK_BYTES, nbytes - pos)]], pos)
                out.write(memoryview(buf)[:n])
                pos += n
        finally:
            os.close(fd)
            out.close()
        elapsed = time.perf_counter() - t0
        (scratch / "plain.bin").unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="build the models here and keep them")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-adapter-bench-"))
    try:
        base, adapter = build(root)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(base), str(adapter)],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(child.stdout.strip().splitlines()[-1])
        m["plain_io_s"] = plain_io(base, m["changed_bytes"], root)
        m["one_expert_products"] = 3 * INTERMEDIATE * HIDDEN * 4  # gate_up and down of one expert, float32
        grown = m["rss_peak"] - m["rss_meta_model"]
        print(
            f"{os.cpu_count()} CPUs; model {m['model_bytes'] / MiB:.0f} MiB; the adapter changes "
            f"{m['changed_tensors']} tensors, {m['changed_bytes'] / MiB:.0f} MiB; imports {m['rss_imports'] / MiB:.0f} MiB, "
            f"the model on the meta device {(m['rss_meta_model'] - m['rss_imports']) / MiB:.0f} MiB more"
        )
        print()
        print("| | measured | bound | ratio |")
        print("|---|---|---|---|")
        print(
            f"| memory of the merge (peak RSS above imports and meta model) | {grown / MiB:.0f} MiB | whole model "
            f"{m['model_bytes'] / MiB:.0f} MiB | {grown / m['model_bytes']:.2f}x |"
        )
        print(
            f"| | | one expert's products {m['one_expert_products'] / MiB:.0f} MiB "
            f"| {grown / m['one_expert_products']:.2f}x |"
        )
        print(
            f"| time of the open | {m['wall_s']:.2f} s wall, {m['cpu_s']:.2f} s CPU | pread + write of the "
            f"changed bytes {m['plain_io_s']:.2f} s | {m['wall_s'] / m['plain_io_s']:.1f}x |"
        )
        print(f"\nload average {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(json.dumps(m, indent=1) + "\n")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
