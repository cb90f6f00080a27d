"""Offline sm_90 compile of the decode-attention split kernels (v2, v3, v4) and a count of the SASS instructions in
their main loop per K/V code, without a GPU: Triton's bundled ptxas and cuobjdump (issue 18: the kernels are bound
by instruction issue, so this is the number the GPU rounds check).

    python tools/sass_attention.py                    # the default table (int4/int2/int8, MHA and GQA, v2 to v4)
    python tools/sass_attention.py --v2 '{"heads": 1}' --bits 4 --groups 4
    python tools/sass_attention.py --variant v3 --v2 '{"num_warps": 2}' --bits 2 --groups 1
    PYTHONPATH=/path/to/triton-3.6 python tools/sass_attention.py   # the H200's Triton (counts differ by version)

Per row: registers, spills (stack bytes), shared memory, main-loop instructions and instructions per code per
thread (a code = one K or one V field; the loop's tokens x head_dim x 2 / threads, an iteration's tokens being
``num_warps`` key blocks with v4's ``warp_blocks``), the same for every loop of the kernel (v3/v4 with ``interior``:
the masked first block, the unmasked middle, the masked last block), and the longest loop's instruction mix. v4's
``raw_scores`` and ``warp_blocks`` follow ``decode_attention``'s defaults unless the launch JSON names them;
``"merge": true`` (v3/v4) builds the split kernel with its own merge (``merge_in_split``: the decode step's form).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRIDES_V2 = ["s_qb", "s_qh", "s_kcb", "s_kch", "s_ksb", "s_ksh", "s_vcb", "s_vch", "s_vsb", "s_vsh"]


def _compile(fn, sig: dict, const: dict, num_warps: int, num_stages: int | None, maxnreg: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **dict.fromkeys(const, "constexpr")}
    names = list(sig)
    div = [i for i, n in enumerate(names) if sig[n].startswith("*") or n in STRIDES_V2 + ["split"]]
    opts = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {}),
            **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(fn, sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in div}),
                          target=GPUTarget("cuda", 90, 32), options=opts)


def _pointers(scale: str) -> dict:
    return {"Q": "*bf16", "KW": "*i32", "KS": f"*{scale}", "KZ": "*u8", "VW": "*i32", "VS": f"*{scale}", "VZ": "*u8",
            "LO": "*i32", "HI": "*i32", "ACC": "*fp32", "M": "*fp32", "L": "*fp32"}


def compile_v2(bits: int, groups: int, d: int = 128, k_block: int = 32, v_group: int | None = None,
               variant: str = "v2", **cfg):
    """The v2 (or v3 / v4: same tile and arguments) split kernel for one launch, compiled for sm_90; and the codes a
    thread reads per main-loop iteration (one key block)."""
    from lowbit.kernels import decode_attention as da

    v_group = v_group or (16 if bits == 2 else 32)
    num_warps = cfg.get("num_warps", 1)
    warp_blocks = variant != "v2" and cfg.get("warp_blocks", variant == "v4" and da.V4_WARP_BLOCKS)
    g = da.v2_geometry(d, bits, k_block, v_group, groups, block_n=cfg.get("block_n", 32), num_warps=num_warps,
                       chunk=cfg.get("chunk", 16), heads=cfg.get("heads"), vchain=cfg.get("vchain", True),
                       warp_blocks=warp_blocks)
    const = dict(HQ=32, GROUPS=groups, GH=g["GH"], D=d, BITS=bits, K_BLOCK=k_block, V_GROUP=v_group, N0=g["N0"],
                 TT=g["TT"], CWW=g["CWW"], CV=g["CV"])
    if variant == "v2":
        const["ROWS"] = g["ROWS"]
    else:
        const["DEN"] = variant == "v4"
        const["INTERIOR"] = cfg.get("interior", True)
        const["ALIBI"] = False  # ALiBi's slopes (Bloom) are off in the counted launches
        const["ROUND"] = 0
        const["RAW"] = variant == "v4" and cfg.get("raw_scores", da.V4_RAW_SCORES)
        const["WB"] = g["WB"]
    sig = {**_pointers("fp16"), **dict.fromkeys(STRIDES_V2 + ["s_ab", "s_ah", "s_as", "s_mb", "s_mh"], "i32"),
           "qk_scale": "fp32", "split": "i32", "exp_bits": "i32"}
    if variant != "v2":  # v3/v4's ALiBi slopes pointer follows exp_bits, then the merge's operands (MERGE)
        sig["SLOPES"] = "*fp32"
        sig |= {"CNT": "*i32", "OUT": "*bf16", "KF": "*bf16", "VF": "*bf16", "FV": "*i8", "FPOS": "*i32",
                **dict.fromkeys(["s_fb", "s_fh", "s_fs", "s_vb", "s_vh", "s_vs", "s_valid", "s_ob", "s_oh",
                                 "n_float"], "i32")}
        merge = bool(cfg.get("merge", False))  # the decode step's own merge (merge_in_split): float window, bf16
        const |= {"MERGE": merge, "NS": da._merge_chunks(d, num_warps), "F": 32, "HAS_FLOAT": merge,
                  "FLOAT_ALIBI": False, "OUT_BF16": merge, "OUT_FP16": False}
    kernel = da._split_kernel_v2 if variant == "v2" else da._split_kernel_v3
    k = _compile(kernel, sig, const, num_warps, cfg.get("num_stages"))
    return k, g["WB"] * k_block * d * 2 / (num_warps * 32)  # warp_blocks: an iteration reads WB key blocks


def loop_stats(k, codes_per_thread: float) -> dict:
    """Registers / stack / shared memory of the cubin and the longest loop's SASS instruction count and mix."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(k.asm["cubin"])
        res = subprocess.run([str(tool), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", cubin], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s*(.*?);", sass)]
    loop: list[tuple[int, str]] = []
    for addr, txt in ins:  # the longest backward branch's body is the main loop
        t = re.search(r"BRA .*?0x([0-9a-f]+)", txt)
        if t and int(t.group(1), 16) < addr:
            cand = [(a, x) for a, x in ins if int(t.group(1), 16) <= a <= addr]
            loop = cand if len(cand) > len(loop) else loop
    body = [x for _, x in loop]
    loops = []  # every loop's length in address order (v3/v4 INTERIOR: masked head, unmasked middle, masked tail)
    for addr, txt in ins:
        t = re.search(r"BRA .*?0x([0-9a-f]+)", txt)
        if t and int(t.group(1), 16) < addr:
            loops.append(sum(1 for a, _ in ins if int(t.group(1), 16) <= a <= addr))
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {"regs": int(usage.get("REG", 0)), "stack": int(usage.get("STACK", 0)),
            "smem": k.metadata.shared, "loop": len(body), "per_code": round(len(body) / codes_per_thread, 2),
            "loops_per_code": [round(n / codes_per_thread, 2) for n in loops],
            "mix": dict(mix.most_common(12))}


DEFAULT_TABLE = [(v, bits, groups, cfg) for v in ("v2", "v3", "v4")
                 for bits, groups, cfg in ((4, 1, {}), (4, 4, {}), (4, 4, {"heads": 1}), (2, 1, {}), (2, 4, {}),
                                           (8, 4, {}), (2, 1, {"num_warps": 2}))]
DEFAULT_TABLE += [("v4", 2, 1, {"num_warps": 2, "warp_blocks": False}), ("v4", 2, 1, {"raw_scores": True}),
                  ("v4", 2, 1, {"num_warps": 2, "raw_scores": True}), ("v4", 4, 1, {"raw_scores": True})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v2", default=None, help="one v2 launch (JSON) instead of the default table")
    ap.add_argument("--variant", default="v2", choices=["v2", "v3", "v4"], help="the kernel of the --v2 launch")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    a = ap.parse_args()
    import triton

    rows = DEFAULT_TABLE
    if a.v2 is not None:
        rows = [(a.variant, a.bits, a.groups, json.loads(a.v2))]
    print(f"triton {triton.__version__}, sm_90, head_dim 128, key blocks of 32", flush=True)
    for variant, bits, groups, cfg in rows:
        try:
            k, cpt = compile_v2(bits, groups, variant=variant, **cfg)
            st = loop_stats(k, cpt)
            print(f"{variant} int{bits} group {groups} (heads per program: <= 4) {json.dumps(cfg)}: regs {st['regs']} "
                  f"stack {st['stack']} smem {st['smem']} loop {st['loop']} -> {st['per_code']} per code (each loop: "
                  f"{st['loops_per_code']}); {st['mix']}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a line
            print(f"{variant} int{bits} group {groups} {json.dumps(cfg)}: {type(exc).__name__}: {exc}"[:400], flush=True)


if __name__ == "__main__":
    main()
