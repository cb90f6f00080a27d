#!/usr/bin/env bash
# Issue 21's open GPU measurements (pruning), ready for the next H200 round; written in session 5, which had no
# GPU round. Run from the repository root with SmolLM2 installed; every part writes rows into $OUT/pruning.json
# (a copy of bench/results/pruning.json, so rows merge) and prints compact JSON rows.
#
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh oneshot   # ~2.5 min: which one-shot start is best (x40)
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh speed     # ~1.2 min: heads + MLP pruned speed (goal B)
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh datafree  # ~1.7 min: 30 s recovery with sampled text added
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh profile   # ~1 min: where a distill step's GPU time goes
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh recover   # 9.5 min: the goal-A run (best start, ~7 min recovery)
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh pdlspeed  # ~9 min: compiled pruned speed with PDL + GEMV sweep
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh headsrecover  # 9.8 min: heads + MLP structured-20, best recovered
#   OUT=/tmp/out bash tools/gpu_round_pruning.sh smolspeed  # ~2.5 min: that cut's speed on the real SmolLM2
#
# Expected (what would say the code works; numbers from the CPU at wt2-512x8 and the session-4 H200 run):
# - oneshot: the float row 28.74 (x40); the FLAP baseline row "uniform 25% + 64 more in blocks 8-20" 1.85x;
#   the OBS rows lower (CPU x8, calib 32 windows, obs_step 8: see bench/results/pruning.json's cpu rows); no
#   error rows; the 30 s recovery of the best row prints recover_holdout_kl falling.
# - speed: 8 rows per scheme, area pruned-speed-20-heads-mlp, kv_heads 26 of 32 and mlp_width 8704 in the
#   pruned rows, params_removed_frac_blocks ~0.20, a speedup per pruned row (MLP-only measured 1.05x decode,
#   1.15x prefill float); an error row names the failing configuration.
# - datafree: one recovered row whose variant ends "+ 98304 generated tokens"; compare its ratio with the
#   oneshot part's 30 s recovery of the same row (same seconds, same start).
# - recover: one one-shot row per candidate, then one recovered row (the best start), recover_seconds <= 420,
#   the whole run < 9.5 min; goal A is met if its ratio <= 1.25.
# - pdlspeed: the compiled W4A16 + int4-head rows with PDL on, the pruned prefill row included (session 17: decode
#   0.337 -> 0.321 ms at batch 1, 1.05x; 0.743 -> 0.658 at batch 16, 1.13x; prefill 6.49 -> 5.56 ms, 1.17x; measured
#   before _R_TABLE took the 9984 x 4096 and 4096 x 3328 entries, so a re-run shows what those give), then the M = 1
#   GEMV sweep at the pruned widths (run S11 measured it before: R_RULE within 8% of each shape's best).
# - headsrecover: issue 21's accuracy goal with the cut that reaches its speed goal (~a quarter of it in attention):
#   the two "mlp channels (uniform 320 of 1536) + 16 of 90 kv groups" OBS rows (params_removed_frac_blocks 0.2007,
#   "heads" with 16 groups gone: [6, 2] or [3, 1] in the cut layers, [9, 3] elsewhere; widths [1216]), ~30-40 s
#   each one-shot, then the better one recovered ~440 s (--deadline shortens the 480 to fit) on the whole
#   validation split, as the MLP-only row that met the goal (1.4951 one-shot -> 1.2043 after 480 s, session 10);
#   the whole stage < 590 s. CPU x8 (calib 32, obs_step 8; session 46): the first heads + MLP row 1.7756 against
#   the MLP-only row's 1.6141 (the attention quarter costs ~0.16x one-shot), so expect ~1.6-1.7x one-shot at x40
#   (MLP-only 1.4951) and a recovered ratio near or above the MLP-only 1.2043; goal A is met if it is <= 1.25 (the
#   heads + MLP cut is the one the >= 1.2x speed goal needs; the MLP-only cut decodes 1.05-1.09x faster).
# - smolspeed: issue 21's speed goal on the model that met the accuracy goal: SmolLM2-135M bf16, unpruned against the
#   headsrecover row's one-shot pipeline (OBS on the 117 shipped windows, pruned once, ~30-60 s; the speed does not
#   depend on the recovery, which only moves weights), float-bf16 and w4a16-g64 (64 divides the pruned 1216; 576 and
#   1216 are not multiples of 128, so the W4 decode word layout does not apply to either model: the row's kernels
#   line says what ran), decode at batch 1 and 16 (prompt 512, 128 new) and the 1x2048 prefill: 12 rows in area
#   pruned-speed-20-heads-mlp-smollm2, the pruned ones with kv_heads a list of 30 (16 groups gone: 74 of 90 left),
#   mlp_width 1216, params_removed_frac_blocks ~0.20, a speedup each; no error row, whole stage < 170 s (it stops
#   at --speed-budget 140: later configurations become "skipped" rows). Batch-1 decode under CUDA graphs is
#   launch-bound (30 layers of ~1-3 us kernels), so expect ~1.0-1.1x there; the >= 1.2x goal is for the 1x2048
#   prefill and the batch-16 decode, which are closer to compute/bandwidth bound (the 7B-shaped stack reached it).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT to a folder for the results}"
[ -f "$OUT/pruning.json" ] || cp bench/results/pruning.json "$OUT/pruning.json"
quiet() { grep -v -i -E "warn|Loading weights" | cut -c1-900; }
# the one-shot candidates: the FLAP baseline and the whole-column OBS rows (MLP-only, 20.1% of the blocks)
CANDIDATES='structured-20:(obs:mlp channels, whole-column|flap:mlp channels, fluctuation \+ bias compensation, uniform)'
RECOVER=(--recover-tokens 100000000 --recover-seq 1024 --recover-batch 16 --recover-lr 2e-4
         --recover-schedule cosine --recover-warmup 0.03 --recover-offsets --recover-holdout 6)

case "${1:-}" in
oneshot)
  timeout 150 python3 tools/bench_pruning.py --device cuda --windows 40 --match "$CANDIDATES" \
    "${RECOVER[@]}" --recover-seconds 30 --deadline 145 --recover-eval-every 50 --recover-best \
    --out "$OUT/pruning.json" 2>&1 | quiet ;;
speed)
  timeout 75 python3 tools/bench_pruning.py --pruned-speed --speed-heads 0.1875 --speed-budget 60 \
    --out "$OUT/pruning.json" 2>&1 | quiet ;;
datafree)
  timeout 100 python3 tools/bench_pruning.py --device cuda --windows 40 \
    --match 'structured-20:obs:mlp channels, whole-column OBS \+ refit, sequential, uniform' \
    "${RECOVER[@]}" --recover-seconds 30 --deadline 95 --recover-eval-every 50 \
    --recover-generated 98304 --recover-gen-batch 96 --out "$OUT/pruning.json" 2>&1 | quiet ;;
profile)
  timeout 60 python3 - <<'PY' 2>&1 | quiet
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.calibration.distill import distill_logits
from lowbit.ir.capture import capture
from lowbit.models import load_model
from lowbit.passes.manager import PassManager

model, tok, _ = load_model("smollm2")
dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=64), 1: torch.export.Dim.DYNAMIC(min=2, max=8192)}}
g0 = capture(model, (torch.randint(0, 49152, (2, 64)),), dynamic_shapes=dyn)
g = g0.clone()
PassManager("prune-mlp(ratio=0.25,score=fluctuation,compensate=true,calib_n=8,progress=false,device=cuda)").run(g)
ids = torch.randint(0, 49152, (40, 1024))
kw = dict(lr=2e-4, batch=16, device=torch.device("cuda"), dtype="bfloat16", progress=False)
distill_logits(g.clone(), g0, ids, steps=4, **kw)
torch.cuda.synchronize()
t = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    st = distill_logits(g.clone(), g0, ids, steps=6, **kw)
    torch.cuda.synchronize()
print("6 steps", round(time.perf_counter() - t, 2), "s (profiled), tokens/s", st.tokens_per_second)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
PY
  ;;
recover)
  # add --recover-generated 262144 if the datafree part beat the oneshot part's 30 s recovery
  timeout 570 python3 tools/bench_pruning.py --device cuda --windows 40 --match "$CANDIDATES" \
    "${RECOVER[@]}" --recover-seconds 420 --deadline 545 --recover-eval-every 100 --recover-best \
    --out "$OUT/pruning.json" 2>&1 | quiet ;;
pdlspeed)
  timeout 260 python3 tools/bench_pruning.py --pruned-speed --speed-compile --speed-schemes w4a16-g128-head4 \
    --speed-budget 230 --out "$OUT/pruning.json" 2>&1 | quiet
  [ -f "$OUT/gemv.json" ] || cp bench/results/gemv.json "$OUT/gemv.json"
  timeout 280 python3 tools/bench_gemv.py --ms 1 --shapes 4096x9984,3328x4096,4096x17408,8704x4096 \
    --budget-s 240 --run "$(date +%F)-pruned-widths" --out "$OUT/gemv.json" 2>&1 | quiet ;;
headsrecover)
  # the recovery settings of the recover stage and the text of the MLP-only row that met goal A (wikitext2-valid)
  timeout 590 python3 tools/bench_pruning.py --device cuda --windows 40 \
    --match 'structured-20:obs:mlp channels \(uniform 320 of 1536\) \+ 16 of 90 kv groups' \
    "${RECOVER[@]}" --recover-seconds 480 --deadline 560 --recover-eval-every 100 --recover-best \
    --recover-text wikitext2-valid --out "$OUT/pruning.json" 2>&1 | quiet ;;
smolspeed)
  timeout 170 python3 tools/bench_pruning.py --pruned-speed --speed-model smollm2 --speed-budget 140 \
    --out "$OUT/pruning.json" 2>&1 | quiet ;;
*)
  echo "usage: OUT=DIR bash tools/gpu_round_pruning.sh" \
    "oneshot|speed|datafree|profile|recover|pdlspeed|headsrecover|smolspeed" >&2
  exit 2 ;;
esac
