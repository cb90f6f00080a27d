"""Offline sm_90 compile of the decode-attention split kernels (v2 and v3) and a count of the SASS instructions in
their main loop per K/V code, without a GPU: Triton's bundled ptxas and cuobjdump (issue 18: the kernels are bound
by instruction issue, so this is the number the GPU rounds check).

    python tools/sass_attention.py                    # the default table (v2 vs v3, int4/int2/int8, MHA and GQA)
    python tools/sass_attention.py --v3 '{"st": false, "num_warps": 4}' --bits 4 --groups 4
    PYTHONPATH=/path/to/triton-3.6 python tools/sass_attention.py   # the H200's Triton (counts differ by version)

Per row: registers, spills (stack bytes), shared memory, main-loop instructions and instructions per code per
thread (a code = one K or one V field; the loop's tokens x head_dim x 2 / threads), and the instruction mix.
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


def compile_v3(bits: int, groups: int, d: int = 128, k_block: int = 32, v_group: int | None = None, **cfg):
    import triton

    from lowbit.kernels import decode_attention_tc as T

    v_group = v_group or (16 if bits == 2 else 32)
    num_stages = cfg.get("num_stages", 1)
    natural = cfg.get("natural")
    natural = bits != 4 if natural is None else natural
    gp = triton.next_power_of_2(groups)
    jb = cfg.get("blocks") or max(1, min(4, 16 // gp))
    num_warps = cfg.get("num_warps") or (8 if jb * k_block * d >= 128 * 128 else 4)  # as launch_tc
    asm = cfg.get("asm", 1)
    kp, kc = T.codes_asm_packed(bits, natural) if asm == 2 else T.dequant_asm(bits, scaled=False, natural=natural)
    vp, vc = T.dequant_asm(bits, natural=natural)
    const = dict(HQ=32, GROUPS=groups, GP=gp, JB=jb, RM=max(16, jb * gp), D=d, BITS=bits, K_BLOCK=k_block,
                 V_GROUP=v_group, ASM=asm, NAT=natural, VT=cfg.get("vt", False), ST=cfg.get("st", True), KPTX=kp,
                 KCON=kc, VPTX=vp, VCON=vc)
    sig = {**_pointers("fp16"), **dict.fromkeys(STRIDES_V2 + ["s_ab", "s_ah", "s_as", "s_mb", "s_mh"], "i32"),
           "qk_scale": "fp32", "split": "i32"}
    k = _compile(T._split_kernel_tc, sig, const, num_warps, num_stages, cfg.get("maxnreg"))
    return k, jb * k_block * d * 2 / (num_warps * 32)


def compile_v2(bits: int, groups: int, d: int = 128, k_block: int = 32, v_group: int | None = None, **cfg):
    from lowbit.kernels import decode_attention as da

    v_group = v_group or (16 if bits == 2 else 32)
    num_warps = cfg.get("num_warps", 1)
    g = da.v2_geometry(d, bits, k_block, v_group, groups, block_n=cfg.get("block_n", 32), num_warps=num_warps,
                       chunk=cfg.get("chunk", 16), heads=cfg.get("heads"), vchain=cfg.get("vchain", True))
    const = dict(HQ=32, GROUPS=groups, GH=g["GH"], D=d, BITS=bits, K_BLOCK=k_block, V_GROUP=v_group, N0=g["N0"],
                 TT=g["TT"], CWW=g["CWW"], CV=g["CV"], ROWS=g["ROWS"])
    sig = {**_pointers("fp16"), **dict.fromkeys(STRIDES_V2 + ["s_ab", "s_ah", "s_as", "s_mb", "s_mh"], "i32"),
           "qk_scale": "fp32", "split": "i32", "exp_bits": "i32"}
    k = _compile(da._split_kernel_v2, sig, const, num_warps, cfg.get("num_stages"))
    return k, k_block * d * 2 / (num_warps * 32)


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
    body: list[str] = []
    for addr, txt in ins:  # the longest backward branch's body is the main loop
        t = re.search(r"BRA .*?0x([0-9a-f]+)", txt)
        if t and int(t.group(1), 16) < addr:
            cand = [x for a, x in ins if int(t.group(1), 16) <= a <= addr]
            body = cand if len(cand) > len(body) else body
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {"regs": int(usage.get("REG", 0)), "stack": int(usage.get("STACK", 0)),
            "smem": k.metadata.shared, "loop": len(body), "per_code": round(len(body) / codes_per_thread, 2),
            "mix": dict(mix.most_common(12))}


DEFAULT_TABLE = [("v2", 4, 1, {}), ("v3", 4, 1, {}), ("v2", 4, 4, {}), ("v3", 4, 4, {}), ("v3", 4, 8, {}),
                 ("v2", 2, 4, {}), ("v3", 2, 4, {}), ("v2", 8, 4, {}), ("v3", 8, 4, {}),
                 ("v3", 4, 4, {"maxnreg": 128}), ("v3", 4, 4, {"st": False, "num_warps": 4})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", default=None, help="one v3 launch (JSON) instead of the default table")
    ap.add_argument("--v2", default=None, help="one v2 launch (JSON)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    a = ap.parse_args()
    import triton

    rows = DEFAULT_TABLE
    if a.v3 is not None or a.v2 is not None:
        rows = [("v3" if a.v3 is not None else "v2", a.bits, a.groups, json.loads(a.v3 or a.v2))]
    print(f"triton {triton.__version__}, sm_90, head_dim 128, key blocks of 32", flush=True)
    for variant, bits, groups, cfg in rows:
        try:
            k, cpt = (compile_v3 if variant == "v3" else compile_v2)(bits, groups, **cfg)
            st = loop_stats(k, cpt)
            head_codes = f" ({st['per_code'] / groups:.2f} per code and head)" if variant == "v3" and groups > 1 \
                else ""
            gh = "" if variant == "v3" else " (heads per program: <= 4)"
            print(f"{variant} int{bits} group {groups}{gh} {json.dumps(cfg)}: regs {st['regs']} stack {st['stack']} "
                  f"smem {st['smem']} loop {st['loop']} -> {st['per_code']} per code{head_codes}; {st['mix']}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a line
            print(f"{variant} int{bits} group {groups} {json.dumps(cfg)}: {type(exc).__name__}: {exc}"[:400], flush=True)


if __name__ == "__main__":
    main()
