#!/usr/bin/env bash
# The moeconsol pipeline on the example family built by examples/build_family.py.
#
#   python examples/build_family.py --out examples/family
#   bash examples/demo.sh examples/family
#
# Reports land in FAMILY_DIR/reports/. Set MOECONSOL to use another moeconsol executable.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 FAMILY_DIR   (build it first: python examples/build_family.py --out FAMILY_DIR)" >&2
    exit 2
fi
FAMILY=${1%/}
MOECONSOL=${MOECONSOL:-.venv/bin/moeconsol}
# The example models are tiny: torch's threads only wait for each other on them, and on a busy
# machine they spin against the other jobs. One thread each is faster everywhere (the
# calibrated merge below: 60 s instead of 26 min on a loaded 2-core machine, the same artifact).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
REPORTS="$FAMILY/reports"

for model in mixtral/base mixtral/code mixtral/math mixtral/story switch/base switch/reverse switch/upper switch/prefix; do
    if [[ ! -f "$FAMILY/$model/config.json" ]]; then
        echo "$0: $FAMILY/$model is missing; build the family first: python examples/build_family.py --out $FAMILY" >&2
        exit 2
    fi
done
mkdir -p "$REPORTS"

MIXTRAL=(base="$FAMILY/mixtral/base" code="$FAMILY/mixtral/code" math="$FAMILY/mixtral/math" story="$FAMILY/mixtral/story")
SWITCH=(base="$FAMILY/switch/base" reverse="$FAMILY/switch/reverse" upper="$FAMILY/switch/upper" prefix="$FAMILY/switch/prefix")

STARTED=$SECONDS
step() { printf '\n== %s  [%ds]\n' "$*" $((SECONDS - STARTED)); }

# --- 1. analyze: how similar are the experts across the variants? ------------------------------
# `code` (Mixtral) and `upper` (Switch) trained only non-expert layers: their experts are
# bit-identical to the base, which the report should show as distance 0 / cosine 1.
step "analyze: Mixtral family (cosine on weights, CKA on the family's held-out text)"
"$MOECONSOL" analyze "${MIXTRAL[@]}" --metric cosine --metric cka \
    --calibration "$FAMILY/data/eval/mixtral-mixed.txt" \
    --json "$REPORTS/mixtral-analyze.json" --heatmap "$REPORTS/mixtral-heatmap.png"

step "analyze: Switch family (cosine on weights, CKA on Gaussian probes)"
"$MOECONSOL" analyze "${SWITCH[@]}" --metric cosine --metric cka \
    --json "$REPORTS/switch-analyze.json" --heatmap "$REPORTS/switch-heatmap.png"

# --- 2. merge: one artifact per family -----------------------------------------------------
ARTIFACTS="$FAMILY/artifacts"
mkdir -p "$ARTIFACTS"
step "merge: Mixtral family, lossless (only bit-identical experts shared: exports are bit-exact)"
"$MOECONSOL" merge "${MIXTRAL[@]}" -o "$ARTIFACTS/mixtral-lossless" --force

step "merge: Mixtral family, memory budget 50% of all experts (closest experts shared first)"
"$MOECONSOL" merge "${MIXTRAL[@]}" -o "$ARTIFACTS/mixtral-budget50" --mode budget --budget 0.5 --force

step "merge: Switch family, threshold cosine >= 0.999"
"$MOECONSOL" merge "${SWITCH[@]}" -o "$ARTIFACTS/switch-threshold" --mode threshold --metric cosine \
    --threshold 0.999 --force

step "inspect + verify the lossless Mixtral artifact"
"$MOECONSOL" inspect "$ARTIFACTS/mixtral-lossless"
"$MOECONSOL" verify "$ARTIFACTS/mixtral-lossless"

step "export: the math variant back to a standard Hugging Face checkpoint"
"$MOECONSOL" export "$ARTIFACTS/mixtral-lossless" math -o "$ARTIFACTS/math-exported" --force
ls "$ARTIFACTS/math-exported"

# --- 3. serve-local: every variant from one artifact ---------------------------------------
# The bank stays resident; each --model swaps in only that variant's non-expert layers.
step "serve-local: two Mixtral variants from one artifact, greedy"
"$MOECONSOL" serve-local "$ARTIFACTS/mixtral-lossless" --model code --model math \
    --prompt "12 + 7 =" --max-new-tokens 16

step "serve-local: a Switch variant"
"$MOECONSOL" serve-local "$ARTIFACTS/switch-threshold" --model upper --prompt "hello world" --max-new-tokens 12

# --- 4. eval: what consolidation costs in quality ----------------------------------------------
# A calibrated artifact at 30% of the expert memory of the four Mixtral variants (each variant's
# own training text decides which experts share; a slot served by another model's expert may
# carry a compressed correction towards its own, and the budget counts bank + delta bytes),
# then every variant's perplexity on its own held-out text: original vs. consolidated vs. base,
# and the share of its fine-tuning gain kept.
step "eval: Mixtral family at 30% of the expert memory (calibrated + expert deltas), perplexity on held-out text"
mkdir -p "$FAMILY/artifacts"
"$MOECONSOL" merge "${MIXTRAL[@]}" -o "$FAMILY/artifacts/mixtral-calibrated" --force --mode calibrated --budget 0.3 --deltas \
    --representative best --calibration base="$FAMILY/data/train/mixtral-mixed.txt" \
    --calibration code="$FAMILY/data/train/mixtral-code.txt" --calibration math="$FAMILY/data/train/mixtral-math.txt" \
    --calibration story="$FAMILY/data/train/mixtral-story.txt" --json > "$REPORTS/mixtral-calibrated-merge.json"
"$MOECONSOL" eval "$FAMILY/artifacts/mixtral-calibrated" --base "$FAMILY/mixtral/base" \
    --data base="$FAMILY/data/eval/mixtral-mixed.txt" --data code="$FAMILY/data/eval/mixtral-code.txt" \
    --data math="$FAMILY/data/eval/mixtral-math.txt" --data story="$FAMILY/data/eval/mixtral-story.txt" \
    --json "$REPORTS/mixtral-eval.json"

# --- 5. a modern family: Qwen3-MoE (random tiny weights; every family of the registry works the same) --
# Built with transformers' own classes; variant b is saved in transformers 5's fused layout.
PYTHON=${PYTHON:-.venv/bin/python}
step "Qwen3-MoE: build a tiny base and two variants, analyze, merge losslessly, verify, serve"
"$PYTHON" examples/build_tiny_family.py qwen3_moe "$FAMILY/qwen3_moe"
QWEN3=(base="$FAMILY/qwen3_moe/base" a="$FAMILY/qwen3_moe/a" b="$FAMILY/qwen3_moe/b")
"$MOECONSOL" analyze "${QWEN3[@]}" --metric cosine --metric cka --json "$REPORTS/qwen3_moe-analyze.json" \
    --heatmap "$REPORTS/qwen3_moe-heatmap.png"
"$MOECONSOL" merge "${QWEN3[@]}" -o "$ARTIFACTS/qwen3_moe-lossless" --force
"$MOECONSOL" verify "$ARTIFACTS/qwen3_moe-lossless"
"$MOECONSOL" serve-local "$ARTIFACTS/qwen3_moe-lossless" --model b --prompt "Once upon a time" --max-new-tokens 8

step "done: reports in $REPORTS"
ls -l "$REPORTS"
