#!/usr/bin/env bash
# Every CUDA measurement of moeconsol in one run, JSON (and logs) written to ${OUT:-bench-out}.
# Meant for an offline GPU machine with torch+CUDA preinstalled; installs nothing from the
# internet. Takes under 8 minutes on one GPU (each step has its own time limit):
#   1. the runtime's logits equal transformers' on CUDA, swaps keep the bank in place, host
#      buffers are pinned, a cross-variant forward equals each row alone (tests/serving/test_runtime.py,
#      tests/serving/test_crossvariant.py: the device-parametrized tests);
#   2. swap time vs one pinned plain host-to-device copy of the same bytes, and greedy tokens/s
#      vs transformers' own model, on the tiny family and the realistic-width bf16 family;
#      the interleaved-request trace (time to first token with and without a swap)
#      (benchmarks/serve.py --device cuda --wide --json);
#   3. a short multi-model trace, turnaround of the five systems, cross-variant batching
#      included, on tiny and on realistic-width variants (benchmarks/turnaround.py; on one GPU
#      without MIG the static partition's processes time-share it: softer than MIG).
# Python packages: the machine's own; if moeconsol's dependencies are missing, wheels carried in
# ${WHEELS:-.device-wheels} (made on a connected machine with
# `pip download -d .device-wheels transformers safetensors tokenizers typer rich fastapi uvicorn scipy psutil pytest httpx`)
# are installed with --no-index.
# DEVICE=cpu REPEATS=2 KEEP=/tmp/wide runs the same steps on a CPU machine, to check the script.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device-wheels}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-9}
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
fi
if ! "$PY" -c 'import transformers, safetensors, tokenizers, typer, fastapi, scipy, pytest' 2>/dev/null; then
  test -d "$WHEELS" || { echo "moeconsol's dependencies are missing and no $WHEELS to install them from" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" transformers safetensors tokenizers typer rich fastapi uvicorn scipy psutil pytest httpx
fi
"$PY" -c 'import moeconsol' 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
"$PY" - > "$OUT/device.json" <<'PY'
import json, os, torch, transformers
gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps({"gpu": gpu and gpu.name, "gpu_memory_bytes": gpu and gpu.total_memory, "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__}))
PY

status=0
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/serving/test_runtime.py tests/serving/test_crossvariant.py -m cuda \
  --junitxml "$OUT/tests-$DEVICE.xml" > "$OUT/tests-$DEVICE.txt" 2>&1 || status=$?
tail -n 3 "$OUT/tests-$DEVICE.txt"
timeout 300 "$PY" benchmarks/serve.py --device "$DEVICE" --wide ${KEEP:+--keep "$KEEP"} --repeats "$REPEATS" --json \
  > "$OUT/serve-$DEVICE.json" 2> "$OUT/serve-$DEVICE.log" || status=$?
tail -n 3 "$OUT/serve-$DEVICE.log"
if [ -s "$OUT/serve-$DEVICE.json" ]; then
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({f"{size} {part}": {k: v for k, v in s[part].items() if k in ("bytes", "swap_s", "plain_copy_s", "ratio", "ratio_to_same_copy", "runtime_tokens_per_s", "transformers_tokens_per_s", "best_ratio")} for size, s in (("tiny", r), ("wide", r["wide"])) for part in ("swap", "generation")}, indent=1))' "$OUT/serve-$DEVICE.json"
fi
timeout 180 "$PY" benchmarks/turnaround.py --device "$DEVICE" --partition pinned --variants 2 --requests 16 --rates 4,16 \
  --json "$OUT/turnaround-$DEVICE.json" > "$OUT/turnaround-$DEVICE.txt" 2>&1 || status=$?
tail -n 12 "$OUT/turnaround-$DEVICE.txt"
timeout 200 "$PY" benchmarks/turnaround.py --device "$DEVICE" --partition pinned --size wide ${KEEP:+--keep "$KEEP/turnaround"} \
  --variants 2 --requests 24 --rates 4,16 --json "$OUT/turnaround-wide-$DEVICE.json" > "$OUT/turnaround-wide-$DEVICE.txt" 2>&1 || status=$?
tail -n 10 "$OUT/turnaround-wide-$DEVICE.txt"
exit $status
