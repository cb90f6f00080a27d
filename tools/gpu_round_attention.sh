#!/usr/bin/env bash
# Issue 18 (decode attention over the packed KV cache): the H200 round session 5 could not run (no device time
# left). Run from the repository root on the GPU machine; each mode finishes in < 5 minutes and writes under $OUT.
#
#   OUT=/tmp/out bash tools/gpu_round_attention.sh check    # 1. correctness of every variant on the GPU (~1 min)
#   OUT=/tmp/out bash tools/gpu_round_attention.sh sweep    # 2. v2 (default) vs v3 launches vs bf16 SDPA (~4.5 min)
#   OUT=/tmp/out bash tools/gpu_round_attention.sh final    # 3. the README rows, merged into attention.json (~4 min)
#   bash tools/gpu_round_attention.sh sass                  # offline, no GPU: SASS instructions per code
#
# Expected (offline sm_90 compiles, Triton 3.6; tools/sass_attention.py): v3 runs 4.1-4.4 SASS instructions per K/V
# code per program without spills (int4 GQA 4: 1.07 per code and query head), v2 5.2 per code for MHA and 11.7 per
# code with 992 bytes of spills for GQA 4 (int8: 1360, int2: 320 bytes -- the order of v2's measured GQA times,
# 2489 / 1411 / 783 us). So at 16 x 32/8 x 32K the sweep should show v3 well under v2's 1411 us (int4), and at
# MHA a smaller gain (4.1 vs 5.2 per code, but v3 holds 180 registers x 256 threads: one program per SM).
#
# Decisions the numbers make (lowbit/kernels/decode_attention.py):
#   * v3 faster than v2 at 16x32/8x32K int4 and int2 (graph_us and us) and at 1x32/8 4K/32K
#       -> GROUPED_VARIANT = "v3" (grouped heads take v3 when the caller names no variant)
#   * v3 also faster at 16x32/32x32K, 1x32/32 (4K, 32K) AND the generation shapes (1 and 16 x 32/32 x 768)
#       -> DEFAULT_CONFIG = {"variant": "v3", **VARIANT_CONFIGS["v3"]}
#   * best v3 launch (maxnreg=128, num_stages=2, num_warps=4, blocks, natural, asm=2) -> VARIANT_CONFIGS["v3"]
#   * the "step_part" rows say where a generation step's cache attention spends its time (cache_update vs the
#     kernel): issue 18's float+kv4 2.155 vs 0.992 ms/step at batch 1.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attention_round}
mkdir -p "$OUT"
mode=${1:-sweep}
case "$mode" in
  check)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
    timeout 280 python3 -m pytest -x -q tests/test_decode_attention.py 2>&1 | tail -15
    ;;
  sweep)
    timeout 285 python3 tools/sweep_attention.py --out "$OUT/sweep.jsonl" --budget 240 2>&1 \
      | tee "$OUT/sweep.log" | cut -c1-400
    ;;
  final)
    cp bench/results/attention.json "$OUT/attention.json"
    timeout 285 python3 tools/bench_attention.py --budget 235 --sweep v3 --scales float16 \
      --shapes 16x32x32x32768,16x32x8x32768,1x32x32x32768,1x32x8x32768,16x32x32x4096,16x32x8x4096,1x32x32x4096,1x32x8x4096,1x32x32x768,16x32x32x768 \
      --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log" | cut -c1-300
    ;;
  sass)
    python3 tools/sass_attention.py
    ;;
  *)
    echo "usage: $0 check|sweep|final|sass" >&2
    exit 2
    ;;
esac
