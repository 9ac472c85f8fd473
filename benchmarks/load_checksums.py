"""What checking sha256 on load costs: every tensor of an artifact read through `Artifact`
(the path serve-local and eval take) with checksums (the default) and without (sizes and
headers only), next to the artifact's size and a plain sha256 of the same bytes.

    python benchmarks/load_checksums.py ARTIFACT [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from moeconsol.artifact.reader import Artifact


def read_everything(path: Path, checksums: bool) -> float:
    """Seconds to open the artifact and read every bank expert and non-expert tensor once."""
    start = time.perf_counter()
    art = Artifact.open(path, checksums=checksums)
    for layer in art.layers:
        for k in range(art.bank_size(layer)):
            art.bank_expert(layer, k)
    for name in art.model_names:
        art.model_dir(name)
        for key in set(art.non_expert_keys(name).values()):
            art.read(key)
    return time.perf_counter() - start


def plain_sha256(path: Path) -> float:
    start = time.perf_counter()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        hashlib.sha256(f.read_bytes()).hexdigest()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = sum(p.stat().st_size for p in args.artifact.rglob("*") if p.is_file())
    print(f"artifact: {args.artifact} ({size / 1e6:.1f} MB)")
    for _ in range(args.repeat):
        off, on, sha = (
            read_everything(args.artifact, False),
            read_everything(args.artifact, True),
            plain_sha256(args.artifact),
        )
        print(
            f"read all, sizes+headers: {off:.3f} s   with sha256: {on:.3f} s   plain sha256 of the files: {sha:.3f} s"
        )


if __name__ == "__main__":
    main()
