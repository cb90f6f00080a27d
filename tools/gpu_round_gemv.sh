#!/usr/bin/env bash
# The H200 round for the split-K decode GEMVs (issue 17): _gemv_sk (M = 1) / _tc_sk (M <= 16) vs cuBLAS bf16,
# tinygemm and the op's current default, in ONE process; then an ncu profile; then the kernels' tests on the GPU.
# Not yet run on a GPU (session 5 had no device round); everything below was checked under TRITON_INTERPRET=1
# and compiled offline for sm_90 (tools/sass_gemv.py, bench/results/gemv_sass.json).
#
#   OUT=/some/dir bash tools/gpu_round_gemv.sh           # ~4.7 min on one H200; OUT defaults to /tmp/gemv_round
#
# Self-checking: every config's output is compared with weight_only_linear_ref before timing (rel_err) and again
# after the CUDA-graph replays (rel_err_after: a workspace left dirty shows there); rows > 1e-2 are marked wrong;
# a config that fails is an error row and the sweep goes on. Rows merge into $OUT/gemv.json (a copy of
# bench/results/gemv.json: copy it back to keep them).
#
# Expected output: per (M, K, N) the rows kernel=gemv_sweep/cublas_bf16, .../tinygemm_int4_g128, .../op_default
# (today: _gemv_t / _tc_t with partials + _splitk_reduce; R1 at 4096x11008: 18.3 / 23.9 µs), then one row per
# cc_sk / tc_sk / tc_sk1 config with us, speedup (cuBLAS / it), eff_bw_frac, rel_err (~2-5e-3: bf16 output
# rounding), rel_err_after; "BEST M=.. K=.. N=.. <variant>: <us> us speedup <x>" lines per family. What decides
# the next step: the best cc_sk at M = 1 against tinygemm (15.2 µs at 4096x11008 in R1) and 7 µs (3.5x cuBLAS);
# EPI 3 (deterministic) against EPI 2 (atomics, one launch) and EPI 1 (workspace + cast); ROWS vs EARLY vs TILE
# vs WK (where the word loads sit, atomics per output); tc_sk PAIRS against 10 µs at M = 16 (2.5x cuBLAS).
# If a variant wins, put its configs into weight_only._SK_TABLE / _sk_rule (the rule uses EPI 3 today: outputs
# stay bit-reproducible, and tests/test_kernels.py compares eager and compiled outputs exactly; EPI 2's atomics
# do not), set WORDS_SK = True (tests/test_kernels.py::test_split_k_gemv_through_the_op covers that path) and rerun
# with --set final (FINAL lists) so op_default shows the new default beside the old configs.
set -u
OUT=${OUT:-/tmp/gemv_round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
cp bench/results/gemv.json "$OUT/gemv.json"
# 1) the sweep: 5 shapes x M in {1, 16}; cc_sk 28 configs, tc_sk 21 (9 PAIRS; EPI 3 = deterministic), tc_sk1 4
timeout 165 python3 tools/bench_gemv.py --only cc_sk,tc_sk,tc_sk1 --run R5a --out "$OUT/gemv.json" --budget-s 145 \
  --workers 12 2>&1 | tee "$OUT/sweep.log" | grep -v '^kernel=gemv_sweep/compiled' | cut -c1-330
echo "exit sweep: ${PIPESTATUS[0]}"
grep '^BEST' "$OUT/sweep.log"
# 2) ncu at 4096x11008: M = 1 cc_sk #1 (rows, 8x512, 2 warps), #13 (TILE 8x256, 1 warp), #18 (EARLY 8x512),
#    #21 (WK 4 slabs, 8x256, 8 warps); tc_sk #13 (PAIRS, 128 wide) at M = 1 and 16. Each config is launched
#    twice; 12 launches profiled; cc_sk at M = 16 prints an error line by design (M = 1 only).
timeout 80 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section LaunchStats --section InstructionStats --section SchedulerStats -k regex:'_gemv_sk|_tc_sk' -c 12 \
  python3 tools/bench_gemv.py --once cc_sk:1,cc_sk:13,cc_sk:18,cc_sk:21,tc_sk:13 --ms 1,16 --shapes 4096x11008 \
  > "$OUT/ncu_sk.txt" 2>&1
echo "exit ncu: $?"
grep -E '^once|_gemv_sk \(|_tc_sk \(|Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occ|Executed Ipc A|Warp Cycles Per Issued|Executed Instructions  ' \
  "$OUT/ncu_sk.txt" | cut -c1-160
# 3) the new kernels' tests on the GPU (N = 40 masks, bias, int8/uint4, EPI 0/1/2/3, cached workspace reuse)
timeout 40 python3 -m pytest -x -q tests/test_kernels.py -k "split_k and cuda" 2>&1 | tail -3
