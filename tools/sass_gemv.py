"""Offline sm_90 SASS of the decode GEMV kernels, no GPU: registers, spills, instructions per int4 word.

    python tools/sass_gemv.py [--out bench/results/gemv_sass.json] [--only op_default,cc_t,...] [--shape 4096x11008]
                              [--group 128]

Each config is launched through ``weight_only._launch_words`` on ``meta`` tensors with a recording launcher, so the
kernel, its arguments and its constexprs are exactly those of a real launch; it is then compiled by Triton for
sm_90 (``triton.compile``, ``GPUTarget("cuda", 90, 32)``, Triton's bundled ptxas) with the specializations the
JIT would make on the GPU (integers equal to 1 become constants, pointers and integers divisible by 16 are marked
so). Per config (int4 g128 asymmetric, bf16 activations, ``--shape`` K x N at M = 1 and 16): registers, local
memory spill instructions, and the dynamic instructions per word per thread: the loop body (the span of the
backward branch) times the program's chunk steps plus the rest, over the words one thread handles in the program
with the mix of that count; ``loads_first``: how many of the 16-byte loads precede the first FMA/MMA of the loop body or kernel (all
of a program's word loads up front means one memory round trip per program).

What it cannot say: time. The lead's ncu of the default path (H200) found it issue-bound at low occupancy
(``_gemv_t``: 168 registers, 18.75% theoretical occupancy, Compute (SM) 43.5%, 20.4 µs at 4096x11008), so
instructions per word and registers are the levers this measures; ``tools/bench_gemv.py`` times them. What it
measures is not what decides: the split-K atomic kernels of session 5 had 26-31 instructions per word here against
40-53 for the looped ones and were slower on the H200 (27-29 µs against 18-24 µs at 4096x11008, session 6).
Rows go to ``--out`` (``kernel`` = ``gemv_sass/<variant>``; device ``sm_90 offline``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gemv as bg
from results_io import merge_rows, versions

from lowbit.kernels import weight_only as wo

ROW_KEY = ("kernel", "variant", "M", "K", "N", "device")
DEVICE = "sm_90 offline (triton.compile + bundled ptxas)"
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int8: "*i8", torch.uint8: "*u8"}


def record(m: int, k: int, n: int, variant: str, cfg: dict) -> list[tuple]:
    """The launches ``bench_gemv.launch`` makes for ``cfg`` (kernel, positional args, keyword args), on meta
    tensors: nothing runs."""
    calls = []

    class Rec:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.kernel, grid, a, kw))

    x = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    words = torch.empty(k // 8, n, device="meta", dtype=torch.int32)
    n_major = wo.words_n_major(n, k) if variant == "op_default" else variant in bg.N_MAJOR
    words = words.t() if n_major else words.t().contiguous()
    s = torch.empty(k // bg.GROUP, n, device="meta").t()
    z = torch.empty(k // bg.GROUP, n, device="meta", dtype=torch.int8).t()
    out = torch.empty(m, n, device="meta", dtype=torch.bfloat16)
    saved = wo.launcher
    wo.launcher = lambda t, kernel: Rec(kernel)
    try:
        if variant == "op_default":
            c = wo.words_config(m, n, k, 4, wo.chunk_words(k, bg.GROUP, 4), wo.is_n_major(words), bg.GROUP)
            wo._launch_words(x, words, s, z, None, out, "int4", bg.GROUP, c)
        else:
            bg.launch(x, words, s, z, out, variant, cfg)
    finally:
        wo.launcher = saved
    return calls


def compile_sass(kernel, args: tuple, kwargs: dict) -> tuple[str, str]:
    """(SASS text, ``cuobjdump -res-usage`` text) of ``kernel`` specialized as the JIT would for these args."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    opts = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
            **({"maxnreg": kwargs["maxnreg"]} if kwargs.get("maxnreg") else {})}
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i < len(args):
            v = args[i]
        elif name in kwargs:
            v = kwargs[name]
        else:
            v = params[name].default
        if params[name].is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and v == 1:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if isinstance(v, int) and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(kernel, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    return sass, res


_INSTR = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def analyze(sass: str, iters: int, words: int) -> dict:
    """Dynamic instructions per word per thread and their mix, the loop body's span, loads_first."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _INSTR.findall(sass)]
    body = (0, -1)
    for addr, op, rest in ins:  # the widest backward branch is the chunk loop
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and t and int(t.group(1), 16) < addr and addr - int(t.group(1), 16) > body[1] - body[0]:
            body = (int(t.group(1), 16), addr)
    count: Counter = Counter()
    for addr, op, _ in ins:
        if op == "NOP":
            continue
        count[op.split(".")[0]] += iters if body[0] <= addr <= body[1] else 1
    span = [x for x in ins if body[0] <= x[0] <= body[1]] if body[1] >= 0 else ins
    first = next((i for i, x in enumerate(span) if x[1].startswith(("FFMA", "HGMMA", "HMMA"))), len(span))
    wide = [i for i, x in enumerate(span) if x[1].startswith("LDG.E.128")]
    total = sum(count.values())
    return {"instr_per_word": round(total / (words * iters), 2), "loop_body": body[1] >= 0,
            "mix_per_word": {op: round(c / (words * iters), 2) for op, c in count.most_common(10)},
            "loads_first": f"{sum(i < first for i in wide)}/{len(wide)}"}


def words_per_step(kernel, kw: dict) -> tuple[int, int]:
    """(words one thread handles per chunk step, chunk steps per program) of a recorded launch."""
    threads = 32 * kw["num_warps"]
    cw, bn = kw["CW"], kw["BLOCK_N"]
    if "ROWS" in kw:  # _gemv_r: a step is ROWS word rows of the column tile (STEP_SPLIT steps per program)
        return kw["ROWS"] * bn // threads, 0
    return kw.get("U", 1) * cw * bn // threads, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gemv_sass.json")
    ap.add_argument("--only", default="op_default,cc_t,tc_t,tc_p", help="variants (bench_gemv's names) and/or "
                    "op_default (what the op launches today)")
    ap.add_argument("--shape", default="4096x11008", help="KxN")
    ap.add_argument("--set", choices=("all", "final"), default="all")
    ap.add_argument("--group", type=int, default=bg.GROUP, help="scale group (64: SmolLM2's K = 576)")
    args = ap.parse_args()
    bg.GROUP = args.group  # record() and bench_gemv.launch read it
    k, n = map(int, args.shape.split("x"))
    variants = bg.FINAL if args.set == "final" else bg.VARIANTS
    date = datetime.date.today().isoformat()
    rows = []
    for m in (1, 16):
        todo = [("op_default", 0, {})] if "op_default" in args.only.split(",") else []
        todo += [(v, i, c) for v in bg.kinds_for(m, set(args.only.split(","))) for i, c in enumerate(variants[v])]
        for v, i, cfg in todo:
            row = {"kernel": f"gemv_sass/{v}", "variant": f"{v}#{i}", "M": m, "K": k, "N": n, "group": bg.GROUP,
                   "config": cfg,
                   "device": DEVICE, "date": date}
            try:
                kernel, grid, a, kw = record(m, k, n, v, cfg)[0]
                sass, res = compile_sass(kernel, a, kw)
                per, steps = words_per_step(kernel, kw)
                if not steps:  # chunk loop: CH_SPLIT chunks in steps of U (_gemv_r: STEP_SPLIT steps)
                    names = kernel.arg_names
                    ch = a[names.index("CH_SPLIT" if "CH_SPLIT" in names else "STEP_SPLIT")]
                    steps = -(-ch // kw.get("U", 1))
                reg = re.search(r"REG:(\d+)", res)
                row.update(name=kernel.__name__, grid=list(grid), regs=int(reg.group(1)) if reg else None,
                           spill_instr=len(re.findall(r"\b(?:STL|LDL)\b", sass)), words_per_thread=per * steps,
                           **analyze(sass, steps, per))
            except Exception as e:  # noqa: BLE001 - one config that does not compile is a row
                row["error"] = repr(e)[:300]
            rows.append(row)
            print(" ".join(f"{key}={val}" for key, val in row.items() if key not in ("device", "date")), flush=True)
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": DEVICE, "versions": versions()}
    merge_rows(Path(args.out), header, rows, key=ROW_KEY)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
