#!/usr/bin/env bash
# Whole-model speed: unmodified vs ToMe vs the token-drop bound, one process per model.
# CPU (default):  bash benchmarks/speed.sh
# GPU:            DEVICE=cuda bash benchmarks/speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then
    $BIN/tokenmerge bench vit_small_patch16_224 --r 13 --batch-size 32 --threads 2 --repeats 10 --json > "$OUT/cpu_vit_s.json"
    $BIN/tokenmerge bench vit_base_patch16_224 --r 13 --batch-size 16 --threads 2 --repeats 8 --json > "$OUT/cpu_vit_b.json"
else
    for compile in "" "--compile"; do
        tag=${compile:+_compiled}
        $BIN/tokenmerge bench vit_small_patch16_224 --r 13 --batch-size 256 --device cuda --dtype bf16 --repeats 30 $compile --json > "$OUT/gpu_vit_s$tag.json"
        $BIN/tokenmerge bench vit_base_patch16_224 --r 13 --batch-size 256 --device cuda --dtype bf16 --repeats 30 $compile --json > "$OUT/gpu_vit_b$tag.json"
        $BIN/tokenmerge bench vit_large_patch16_224 --r 7 --batch-size 128 --device cuda --dtype bf16 --repeats 20 $compile --json > "$OUT/gpu_vit_l$tag.json"
        $BIN/tokenmerge bench vit_base_patch16_224 --r 13 --batch-size 1 --device cuda --dtype bf16 --repeats 100 $compile --json > "$OUT/gpu_vit_b_bs1$tag.json"
    done
fi
