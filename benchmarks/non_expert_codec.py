"""Non-expert tensors stored as lossless deltas: bytes on disk, encode/decode speed against a
plain memcpy of the same bytes, merge time and runtime load time, codec on and off.

Inputs (each figure says which):

- a realistic-width pair (default), built here and kept with `--keep`: a Mixtral-shaped
  model (hidden 1024, 2 layers, 4 experts, vocab 8192, bf16 on disk) and a real fine-tune of
  it: AdamW (lr 1e-5, no weight decay, fp32 master weights) for `--steps` steps on random
  token ids (batch 4 x 128), then stored in bf16, as a full fine-tune is shipped;
- `--family DIR`: the example family (examples/build_family.py --out DIR): for its Mixtral
  and Switch families, lossless merges of all four models with the codec and without.

Per tensor pair (every non-expert tensor that the fine-tune changed), in the same run:
xor-zstd as moeconsol stores it (level 1), xor-zstd level 3, zstd of the raw bytes (no
delta), xor + zstd without the byte shuffle, and xor + zipnn when zipnn is importable (it is
source-only on this machine's index: run this file with a venv where it was built, with
`--codecs-only`, which needs only torch, numpy and zstandard). Speeds are MB/s of the
uncompressed bytes; memcpy is `copy_` of the same bytes into a preallocated tensor.

Usage: python benchmarks/non_expert_codec.py [--keep DIR] [--steps 50] [--family DIR]
       [--codecs-only] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moeconsol.artifact import nonexpert_codec as codec  # noqa: E402
from moeconsol.io.safetensors_file import read_header, read_tensor  # noqa: E402

HIDDEN, LAYERS, EXPERTS, VOCAB = 1024, 2, 4, 8192


def build_pair(root: Path, steps: int) -> tuple[Path, Path]:
    """base and a real fine-tune of it (see the module docstring), saved in bf16."""
    import copy

    from moeconsol.testing import save_model, tiny_mixtral

    base_dir, ft_dir = root / "base", root / "ft"
    if (ft_dir / "config.json").exists():
        return base_dir, ft_dir
    torch.manual_seed(0)
    base = tiny_mixtral(
        seed=0,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_local_experts=EXPERTS,
        vocab_size=VOCAB,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    ft = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 128), generator=g)
        ft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_model(base.to(torch.bfloat16), base_dir)
    save_model(ft.to(torch.bfloat16), ft_dir)
    return base_dir, ft_dir


def non_expert_tensors(path: Path) -> dict[str, object]:
    """Name -> TensorInfo of every tensor that is not an expert's (per-expert Mixtral layout)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update({n: i for n, i in read_header(file)[0].items() if ".experts." not in n})
    return out


def _timed(fn, repeat: int = 2):
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def _xor_bytes(t: torch.Tensor, r: torch.Tensor) -> np.ndarray:
    return np.bitwise_xor(t.reshape(-1).view(torch.uint8).numpy(), r.reshape(-1).view(torch.uint8).numpy())


def _methods() -> dict:
    """name -> (encode(t, r) -> bytes, decode(blob, r) -> tensor)."""
    z1, z3, d = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()

    def unxor(raw: bytes, r: torch.Tensor) -> torch.Tensor:
        x = np.bitwise_xor(np.frombuffer(raw, np.uint8), r.reshape(-1).view(torch.uint8).numpy())
        return torch.from_numpy(x).view(r.dtype).reshape(r.shape)

    methods = {
        "xor-zstd (moeconsol, level 1)": (
            lambda t, r: codec.encode(t, r, 1),
            lambda b, r: codec.decode(b, r, r.dtype, tuple(r.shape)),
        ),
        "xor-zstd level 3": (
            lambda t, r: codec.encode(t, r, 3),
            lambda b, r: codec.decode(b, r, r.dtype, tuple(r.shape)),
        ),
        "zstd level 1, no delta": (
            lambda t, r: z1.compress(t.reshape(-1).view(torch.uint8).numpy()),
            lambda b, r: torch.frombuffer(bytearray(d.decompress(b)), dtype=r.dtype).reshape(r.shape),
        ),
        "xor + zstd level 1, no shuffle": (
            lambda t, r: z1.compress(_xor_bytes(t, r)),
            lambda b, r: unxor(d.decompress(b), r),
        ),
        "xor + zstd level 3, no shuffle": (
            lambda t, r: z3.compress(_xor_bytes(t, r)),
            lambda b, r: unxor(d.decompress(b), r),
        ),
    }
    try:
        import zipnn
    except ImportError:
        return methods

    def zipnn_of(r: torch.Tensor):
        kind = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(r.dtype, "bfloat16")
        return zipnn.ZipNN(input_format="byte", bytearray_dtype=kind)

    methods["xor + zipnn (byte grouping, huffman/zstd)"] = (
        lambda t, r: zipnn_of(r).compress(_xor_bytes(t, r).tobytes()),
        lambda b, r: unxor(bytes(zipnn_of(r).decompress(b)), r),
    )
    return methods


def codec_table(base_dir: Path, ft_dir: Path) -> dict:
    """Every method on every changed non-expert tensor pair; bytes and seconds summed."""
    base, ft = non_expert_tensors(base_dir), non_expert_tensors(ft_dir)
    methods = _methods()
    totals = {m: {"bytes": 0, "encode_s": 0.0, "decode_s": 0.0} for m in methods}
    whole = memcpy = 0.0
    pairs = unchanged = 0
    for name in sorted(base):
        r, t = read_tensor(base[name]), read_tensor(ft[name])
        if torch.equal(r.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
            unchanged += 1
            continue
        pairs += 1
        whole += t.numel() * t.element_size()
        dst = torch.empty_like(t)
        memcpy += _timed(lambda: dst.copy_(t), 3)[0]
        for m, (enc, dec) in methods.items():
            seconds, blob = _timed(lambda: enc(t, r))
            back_s, back = _timed(lambda: dec(blob, r))
            assert (
                back.reshape(-1).view(torch.uint8).numpy().tobytes()
                == t.reshape(-1).view(torch.uint8).numpy().tobytes()
            ), (m, name)
            totals[m]["bytes"] += len(blob)
            totals[m]["encode_s"] += seconds
            totals[m]["decode_s"] += back_s
    rows = [
        {
            "method": m,
            "ratio": v["bytes"] / whole,
            "encode_mb_s": whole / v["encode_s"] / 1e6,
            "decode_mb_s": whole / v["decode_s"] / 1e6,
        }
        for m, v in totals.items()
    ]
    return {
        "changed_tensors": pairs,
        "unchanged_tensors": unchanged,
        "changed_bytes": int(whole),
        "memcpy_mb_s": whole / memcpy / 1e6,
        "rows": rows,
    }


def merged(models: list[str], root: Path, label: str) -> dict:
    """Lossless merges with the codec and without: non-expert bytes, merge and load seconds."""
    from moeconsol.consolidate import MergeSettings, merge
    from moeconsol.io.checkpoint import open_checkpoints
    from moeconsol.serving.runtime import Runtime

    out = {"inputs": label}
    for model in models:  # inputs page-cached before timing, as benchmarks/merge.py does
        for file in Path(model.split("=", 1)[-1]).iterdir():
            file.read_bytes()
    for rep in range(2):  # interleaved, best of two: the first run of anything pays for warm-up
        for choice in (codec.NONE, codec.XOR_ZSTD):
            art = root / f"art-{label.replace('/', '-').replace(' ', '-')}-{choice}"
            shutil.rmtree(art, ignore_errors=True)
            ckpts = open_checkpoints(models)
            seconds, result = _timed(lambda: merge(ckpts, art, MergeSettings(non_expert_codec=choice), force=True), 1)
            load, rt = _timed(lambda: Runtime.from_artifact(art), 1)
            b = result.manifest["bytes"]
            row = {
                "non_expert": b["non_expert"],
                "non_expert_whole": b["non_expert_whole"],
                "artifact": result.artifact_bytes,
                "merge_s": round(seconds, 3),
                "load_s": round(load, 3),
                "encoded": len(result.manifest["encodings"]),
            }
            if rep:
                row.update(
                    merge_s=min(row["merge_s"], out[choice]["merge_s"]),
                    load_s=min(row["load_s"], out[choice]["load_s"]),
                )
            out[choice] = row
            del rt
            shutil.rmtree(art)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="build the pair here and keep it (reused when present)")
    ap.add_argument("--steps", type=int, default=50, help="AdamW steps of the fine-tune")
    ap.add_argument("--family", type=Path, help="the example family (examples/build_family.py --out DIR)")
    ap.add_argument(
        "--codecs-only",
        action="store_true",
        help="only the per-tensor table (torch, numpy, zstandard; zipnn if present)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-codec-bench-"))
    torch.set_num_threads(1)  # one core, as the merge's encoding runs; the machine is shared
    try:
        root.mkdir(parents=True, exist_ok=True)
        base_dir, ft_dir = build_pair(root, args.steps) if not args.codecs_only else (root / "base", root / "ft")
        result = {
            "pair": f"Mixtral-shaped hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, bf16; fine-tune: "
            f"AdamW lr 1e-5, {args.steps} steps",
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        result["codecs"] = codec_table(base_dir, ft_dir)
        if not args.codecs_only:
            result["merges"] = [merged([f"base={base_dir}", f"ft={ft_dir}"], root, "pair")]
            for fam in ("mixtral", "switch") if args.family else ():
                dirs = sorted(p for p in (args.family / fam).iterdir() if (p / "config.json").exists())
                dirs.sort(key=lambda p: p.name != "base")
                result["merges"].append(merged([f"{p.name}={p}" for p in dirs], root, f"example {fam}"))
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        report(result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(result: dict) -> None:
    c = result["codecs"]
    print(f"{result['pair']}; load average {result['load_average']} -> {result['load_average_after']}")
    print(
        f"{c['changed_tensors']} changed non-expert tensors ({c['changed_bytes'] / 1e6:.1f} MB), {c['unchanged_tensors']} unchanged; "
        f"memcpy {c['memcpy_mb_s']:.0f} MB/s"
    )
    print("| method | stored / whole | encode MB/s | decode MB/s | encode / memcpy | decode / memcpy |")
    print("|---|---|---|---|---|---|")
    for r in c["rows"]:
        print(
            f"| {r['method']} | {r['ratio']:.1%} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | "
            f"{c['memcpy_mb_s'] / r['encode_mb_s']:.1f}x slower | {c['memcpy_mb_s'] / r['decode_mb_s']:.1f}x slower |"
        )
    for m in result.get("merges", []):
        n, x = m[codec.NONE], m[codec.XOR_ZSTD]
        print(
            f"{m['inputs']}: non-expert {x['non_expert'] / 1e6:.2f} MB stored of {x['non_expert_whole'] / 1e6:.2f} MB whole "
            f"({x['non_expert'] / x['non_expert_whole']:.1%}; {x['encoded']} tensors encoded); artifact {n['artifact'] / 1e6:.2f} -> "
            f"{x['artifact'] / 1e6:.2f} MB; merge {n['merge_s']:.2f} -> {x['merge_s']:.2f} s; runtime load {n['load_s']:.2f} -> {x['load_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
