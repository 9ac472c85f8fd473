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

step() { printf '\n== %s\n' "$*"; }

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

# --- 2. merge: one artifact per family (to be filled in by the lead) ---------------------------
# Consolidate each family into one artifact under "$FAMILY/artifacts/", e.g. a lossless
# Mixtral artifact (shares `code`'s experts with the base bit for bit) and a memory-budget one;
# then inspect / verify it and export one variant back to a Hugging Face checkpoint.

# --- 3. serve-local: every variant from one artifact (to be filled in by the lead) -------------
# Run a prompt on each Mixtral variant from the artifact (the `model` picks the variant and
# only non-expert layers are swapped), and report the swap cost.

step "done: reports in $REPORTS"
ls -l "$REPORTS"
