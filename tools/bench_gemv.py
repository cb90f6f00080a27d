"""Decode GEMV sweep: every word-layout GEMV variant/config of ``VARIANTS`` vs cuBLAS bf16 and tinygemm, one run.

    python tools/bench_gemv.py [--out bench/results/gemv.json] [--ms 1,16] [--shapes 4096x11008,...]
                               [--budget-s 120] [--workers 8] [--only cc_t,tc_t,...] [--smoke] [--group 128]

M in ``--ms`` (default 1, 16; above 16 the prefill family ``tc_m``) x (K, N) in ``SHAPES`` (int4 g128 asymmetric, bf16 activations): per shape cuBLAS bf16 ``F.linear``,
``torch._weight_int4pack_mm`` (tinygemm) and the op's current default (``op_default``: what
``lowbit::weight_only_linear`` picks on the layout ``pack_words`` makes by default, as the triton backend deploys), then every config of the
variants ``VARIANTS`` lists for that M: ``cc_k``/``tc_k`` on the K-major words (``pack_words``), ``cc_t``/``tc_t``/
``tc_p`` on the N-major words (``pack_words(..., n_major=True)``); ``cc_f`` (N-major), ``cc_kf`` (K-major) and
``op_fused`` (M = 1) launch with a decode block's norm fusion, so split-K pays the reduce launch and ``FOLD`` configs
fold it in; ``--k-major-max-k`` sets ``weight_only.K_MAJOR_MAX_K`` for the op's rows. Times: CUDA-graph
replay of calls over weight copies that span ~2x L2 (``bench_kernels.bench_graph``, L2 cold as in a model),
medians. Each config's output is checked against the reference (``rel_err``; a row with ``rel_err`` > 1e-2 is marked
``wrong``). Kernels are compiled first
by ``--workers`` subprocesses in parallel (they fill Triton's on-disk cache), so the timing loop does not pay
compile time serially. Per-config exceptions become rows; ``--budget-s`` stops the timing loop (rows after it say
``skipped``). ``best`` marks the fastest correct config per (M, K, N) and variant family; rows go to ``--out`` via
tools/results_io.py (``kernel`` = ``gemv_sweep/<variant>``).

``--smoke``: tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (every config runs once, checked, no timing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import load_results, machine, merge_rows

from lowbit.calibration.gptq import weight_qparams
from lowbit.ir.quant import get_qdtype, quantize
from lowbit.kernels import weight_only as wo

SHAPES = ((4096, 11008), (11008, 4096), (4096, 4096), (4096, 12288), (4096, 22016))
GROUP = 128
"""The scale group every weight of the run has (``--group``: 64 for SmolLM2's K = 576, which 128 does not divide)."""


def _cc(bn, u, w, sk, pf=0, st=1):
    return {"BLOCK_N": bn, "U": u, "num_warps": w, "num_stages": st, "SPLIT_K": sk, "PREFETCH": pf}


def _r(bn, rows, w, sk, pf=0, st=1):
    return {"BLOCK_N": bn, "ROWS": rows, "num_warps": w, "num_stages": st, "SPLIT_K": sk, "PREFETCH": pf}


def _tc(bn, sw, w, sk, pf=0, st=2):
    return {"BLOCK_N": bn, "SWAP": sw, "num_warps": w, "num_stages": st, "SPLIT_K": sk, "PREFETCH": pf}


def _tm(bm, bn, w, st, sk, sw=False, pf=0):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "SWAP": sw, "num_warps": w, "num_stages": st, "SPLIT_K": sk, "PREFETCH": pf}


PREFILL_CONFIGS = [_tm(*c) for c in (
    (32, 64, 4, 2, 1), (32, 64, 4, 2, 2), (32, 128, 4, 2, 1), (32, 128, 4, 3, 2), (32, 64, 4, 3, 4),
    (32, 128, 8, 3, 1), (32, 128, 4, 2, 1, True), (32, 64, 4, 2, 2, True),
    (64, 64, 4, 2, 1), (64, 128, 4, 2, 1), (64, 128, 4, 3, 1), (64, 128, 8, 3, 1), (64, 256, 8, 3, 1),
    (64, 64, 4, 3, 2), (64, 128, 4, 3, 2), (64, 128, 8, 2, 2),
    (128, 64, 4, 2, 1), (128, 128, 4, 2, 1), (128, 128, 8, 2, 1), (128, 128, 8, 3, 1), (128, 256, 8, 2, 1),
    (128, 64, 4, 3, 2), (128, 128, 8, 3, 2), (128, 128, 4, 3, 2))]
"""``tc_m``: ``_tc_t`` at prefill M (16 < M <= 256) with 32/64/128-row tiles; a config runs only at the M whose
bucket (``weight_only.prefill_bucket``) is its ``BLOCK_M``."""


def _tcc(bm, bn, ps, w, st, sk, swap=False):
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "PS": ps, "num_warps": w, "num_stages": st, "SPLIT_K": sk}
    return dict(cfg, SWAP=True) if swap else cfg


CHUNK_CONFIGS = [_tcc(*c) for c in (
    (16, 64, 4, 4, 2, 2), (16, 64, 8, 4, 2, 4), (16, 128, 4, 4, 2, 2), (16, 64, 4, 4, 3, 4), (16, 128, 4, 8, 3, 2),
    (16, 32, 8, 4, 2, 4),
    (32, 64, 4, 4, 2, 2), (32, 128, 4, 4, 3, 1), (32, 64, 8, 4, 3, 2), (32, 128, 4, 8, 3, 2),
    (64, 64, 4, 4, 3, 1), (64, 128, 4, 4, 3, 1), (64, 128, 8, 8, 3, 1), (64, 128, 4, 8, 2, 2), (64, 64, 8, 4, 3, 2),
    (128, 64, 4, 4, 3, 1), (128, 128, 4, 8, 3, 1), (128, 128, 8, 8, 3, 1), (128, 128, 4, 8, 4, 1),
    (128, 256, 4, 8, 3, 1), (128, 128, 2, 4, 3, 1), (128, 64, 8, 4, 3, 2),
    # session 17: every 128-row config above ran out of shared memory in run S8b (233-356 KB of 227): the same tiles
    # with Triton's pipeline at 2 stages or none
    (128, 64, 4, 4, 2, 1), (128, 64, 2, 4, 2, 1), (128, 128, 2, 4, 2, 1), (128, 128, 4, 8, 2, 1),
    (128, 64, 8, 4, 2, 1), (128, 64, 4, 4, 1, 1), (128, 128, 4, 8, 1, 1), (128, 64, 4, 4, 2, 2),
    # session 18: SWAP (the dequantized weights as the dot's register operand, the activations through shared
    # memory); not yet run on the GPU
    (128, 64, 4, 4, 2, 1, True), (128, 128, 4, 8, 2, 1, True), (128, 128, 8, 8, 2, 1, True),
    (128, 64, 2, 4, 3, 1, True), (64, 128, 4, 4, 3, 1, True), (64, 64, 8, 4, 3, 2, True),
    (128, 128, 4, 8, 3, 1, True), (128, 64, 4, 4, 3, 2, True))]
"""``tc_c``: ``_tc_chunk`` (``PS`` code positions per dot) at M = 16 (16-row tiles) and prefill M (the bucket's)."""


def _fold(bn, tile, w, pf=0):
    return {"BLOCK_N": bn, "TILE": tile, "num_warps": w, "num_stages": 1, "SPLIT_K": 1, "PREFETCH": pf, "FOLD": True}


FOLD_CONFIGS = [_fold(*c) for c in (
    # one split, the reduce's work in the GEMV's programs: ``weight_only.FOLD_T`` (16 columns, a 2048-word tile,
    # 4 warps) and its neighbours; ``TILE``: the tile's words, ``U`` from it per shape (``weight_only.fold_chunks``)
    (16, 2048, 4), (16, 2048, 8), (16, 1024, 2), (16, 1024, 4), (16, 512, 2), (16, 2048, 4, 1), (16, 1024, 4, 1),
    (32, 2048, 4), (32, 1024, 4), (32, 1024, 2, 1), (64, 2048, 4), (64, 2048, 8),
    # 8 columns: twice the programs at SmolLM2's widths (72 at N = 576), a quarter to half the tile
    (8, 1024, 1), (8, 1024, 2), (8, 1024, 4), (8, 512, 1), (8, 512, 2))] + [
    # split-K + _splitk_reduce with the same fusion: ``_t_rule``'s tiles at SmolLM2's splits (its op default there)
    # and a 16-column tile split in two
    _cc(64, 1, 2, 16), _cc(64, 1, 2, 8), _cc(64, 1, 2, 4), _cc(16, 4, 4, 2), _cc(16, 2, 4, 4)]
"""``cc_f`` (M = 1, N-major words): every config launched with a decode block's fusion (the norm of the input from
``FOLD_NORM_PARTIALS`` partial sums of squares, as q/k/v and gate/up read it), so split-K needs the reduce launch
and ``FOLD`` configs fold it in: folded vs split + reduce at SmolLM2's shapes (``--shapes 576x1536,1536x576,
576x192,576x3072 --group 64 --ms 1 --only cc_f``). Offline sm_90 builds: 2048-word tiles spill at 2 warps."""

K_FOLD_CONFIGS = [_fold(*c) for c in (
    # ``_gemv_words`` with ``FOLD`` on the K-major words (``weight_only.FOLD_K``: 2 rows, a 512-word tile = a row of
    # K <= 2048 in one step, 1 warp) and its neighbours: fewer chunks a step (more steps, no masked chunks: K = 576
    # is 9 chunks of 8 words, a 512-word tile loads 16), 4 / 8 rows, 2 warps, prefetch
    (2, 512, 1), (2, 256, 1), (2, 128, 1), (2, 64, 1), (2, 512, 2), (2, 256, 2), (4, 512, 1), (4, 1024, 1),
    (4, 512, 2), (4, 1024, 2), (8, 1024, 2), (2, 128, 1, 1), (2, 64, 1, 2), (4, 256, 1, 1))] + [
    # one split + _splitk_reduce with the same fusion: ``weight_only.K_MAJOR_CC`` (the unfused op's config)
    _cc(2, 4, 1, 1), _cc(4, 8, 2, 1)]
"""``cc_kf`` (M = 1, K-major words): ``cc_f``'s fusion on ``_gemv_words``, folded (``FOLD``) or one split + the
reduce launch, for ``weight_only.K_MAJOR_MAX_K`` (``--shapes 576x960,576x3072,1536x576,576x576 --group 64 --ms 1
--only cc_kf,cc_f``)."""

FOLDED_FAMILIES = {"cc_f", "cc_kf"}
"""Families launched with ``fold_fusion`` (their reference is halved: ``reference``)."""

FOLD_NORM_PARTIALS = 36
"""``cc_f``'s norm partials: o_proj's folded launch at SmolLM2's hidden 576 writes 36 (16-column programs);
``--norm-partials`` sets it (72: ``FOLD_ONE_STEP``'s 8-column programs; 288: ``FOLD_K``'s 2-row ones, which every
program of the next K-major GEMV reads as one 512-wide vector)."""


VARIANTS: dict[str, list[dict]] = {
    # CUDA cores, M = 1, N-major words: [U, CW, BLOCK_N] tiles, 4 rows per thread, split-K partials + reduce
    "cc_t": [_cc(*c) for c in (
        (32, 1, 1, 1), (32, 2, 2, 1), (64, 1, 2, 1), (64, 1, 2, 2), (64, 1, 2, 4), (64, 1, 4, 2),
        (64, 2, 4, 2), (64, 1, 2, 2, 1), (128, 1, 4, 1), (128, 1, 4, 2), (128, 1, 4, 4),
        (128, 1, 4, 8), (128, 2, 8, 4), (128, 1, 4, 4, 1), (128, 1, 2, 4), (256, 1, 8, 2),
        (256, 1, 8, 4), (256, 1, 4, 4), (128, 1, 4, 4, 0, 3),
        # many short K slices (gemlite's GEMV_REVSPLITK regime: 1-2 warps, wide N, one chunk per program)
        (128, 1, 1, 8), (128, 1, 2, 8), (256, 1, 2, 8), (128, 1, 4, 16), (64, 1, 2, 16), (256, 1, 4, 16),
        (512, 1, 4, 4), (512, 1, 8, 8), (256, 1, 2, 4), (128, 1, 1, 4))] + [
        # RED: per-group sums into a [BLOCK_N] accumulator (warps along N: the sums stay in a thread)
        dict(_cc(*c), RED=True) for c in (
            (128, 1, 1, 4), (128, 1, 1, 8), (256, 1, 2, 4), (256, 1, 2, 8), (512, 1, 4, 4), (512, 1, 4, 8),
            (64, 1, 1, 8), (128, 1, 1, 2), (128, 1, 4, 4), (256, 1, 2, 16))],
    # CUDA cores, M = 1, N-major words, ``_gemv_r``: ROWS word rows in a thread, codes by and-xor at 3 exponents
    "cc_r": [_r(*c) for c in (
        (128, 8, 1, 8), (128, 8, 1, 16), (128, 8, 1, 24), (128, 8, 1, 32), (128, 8, 1, 64), (128, 4, 1, 16),
        (128, 4, 1, 32), (128, 4, 1, 64), (128, 16, 1, 8), (128, 16, 1, 16), (256, 8, 2, 8), (256, 8, 2, 16),
        (256, 4, 2, 16), (256, 4, 2, 32), (256, 4, 1, 8), (256, 4, 1, 16), (512, 4, 4, 16), (64, 8, 1, 16),
        (64, 8, 1, 32), (128, 2, 1, 64))],
    # tensor cores, M = 2..16, N-major words: per chunk [CW, BLOCK_N] codes, one dot per code position
    "tc_t": [_tc(*c) for c in (
        (64, True, 4, 1), (64, True, 4, 2), (64, True, 4, 4), (64, False, 4, 2), (64, False, 4, 4),
        (128, True, 4, 2), (128, True, 4, 4), (128, True, 8, 4), (128, False, 4, 4), (128, False, 8, 4),
        (32, False, 2, 4), (32, False, 4, 8), (64, True, 4, 4, 0, 3), (64, True, 4, 4, 0, 1), (64, True, 4, 4, 1),
        (128, True, 4, 4, 1), (256, True, 8, 2), (256, False, 8, 2))],
    # tc_t with int4 codes unpacked in pairs by lop3 + sub.bf16x2 (``_tc_pairs``)
    "tc_p": [dict(_tc(*c), PAIRS=True) for c in (
        (64, True, 4, 2), (64, True, 4, 4), (128, True, 4, 4), (128, True, 8, 4), (64, False, 4, 4),
        (128, False, 4, 4), (32, False, 4, 8), (64, True, 4, 8), (256, True, 8, 2))],
    # the K-major kernels' previous sweep winners (run C), for the same-run comparison
    "cc_k": [_cc(2, 4, 1, 1), _cc(4, 8, 2, 1, 0, 3), _cc(2, 4, 1, 1, 2)],
    "cc_f": FOLD_CONFIGS,
    "cc_kf": K_FOLD_CONFIGS,
    "tc_k": [_tc(128, True, 4, 4), _tc(64, True, 4, 8)],
    # ``_tc_chunk`` on the K-major words (``weight_only.K_MAJOR_MAX_K``' 2 <= M <= 16 at CW = 8): tc_c's 16-row tiles
    "tc_kc": [c for c in CHUNK_CONFIGS if c["BLOCK_M"] == 16] + [_tcc(16, 64, 8, 4, 2, 1), _tcc(16, 64, 8, 4, 2, 2)],
    "tc_m": PREFILL_CONFIGS,
    "tc_c": CHUNK_CONFIGS,
}
ROW_KEY = ("run", "kernel", "variant", "M", "K", "N", "device")
N_MAJOR = {"cc_t", "cc_r", "tc_t", "tc_p", "tc_m", "tc_c", "cc_f"}
"""Variants that run on the N-major words (``pack_words(..., n_major=True)``); the others on the K-major ones."""
FINAL: dict[str, list[dict]] = {
    # R8/R9's winners and neighbours (R9 also ran them with the split-K reduce fused into the last program of each
    # column tile: correct, not faster; removed)
    "cc_r": [_r(*c) for c in (
        (128, 16, 1, 16), (128, 16, 1, 8), (64, 16, 1, 32), (64, 16, 1, 16), (128, 16, 1, 16, 0, 2), (64, 8, 1, 32),
        (128, 8, 1, 16), (128, 16, 1, 32))],
    "cc_t": [_cc(64, 1, 2, 4), _cc(64, 1, 2, 16), _cc(64, 1, 2, 2), _cc(256, 1, 4, 16), _cc(64, 1, 4, 4),
             _cc(64, 1, 8, 4), _cc(64, 1, 2, 2, 2), _cc(64, 1, 4, 2, 2), _cc(32, 1, 2, 8),
             _cc(64, 4, 8, 4), _cc(64, 2, 4, 8)],  # a program's whole K slice in one load (latency hidden by warps)
    "tc_t": [_tc(64, True, 4, 4, 1), _tc(64, True, 4, 2, 1), _tc(64, True, 8, 4, 1)],
    "tc_p": [dict(_tc(*c), PAIRS=True) for c in ((64, True, 4, 4), (64, True, 4, 3), (128, True, 4, 4))],
    "cc_k": [_cc(4, 8, 2, 1, 0, 3), _cc(2, 4, 1, 1)],
    "tc_k": [_tc(64, True, 4, 8)],
    "tc_m": PREFILL_CONFIGS,
    "tc_c": CHUNK_CONFIGS,
    "cc_f": FOLD_CONFIGS,
    "cc_kf": K_FOLD_CONFIGS,
}
"""``--set final``: the op's table entries and their neighbours (the variants' full lists are ``VARIANTS``)."""
SMOKE_SHAPES = ((768, 40), (512, 64))


def kinds_for(m: int, only: set[str]) -> list[str]:
    """The variant families run at ``m`` (CUDA cores at M = 1, tensor cores from ``WORDS_TC_MIN_M``, the prefill
    tiles above 16)."""
    if m > 16:
        names: tuple[str, ...] = ("tc_m", "tc_c")
    else:
        names = (("tc_t", "tc_p", "tc_k", "tc_c", "tc_kc") if m >= wo.WORDS_TC_MIN_M
                 else ("cc_r", "cc_t", "cc_k", "cc_f", "cc_kf"))
    return [v for v in names if not only or v in only]


def make_weight(n: int, k: int, device: str) -> dict:
    """A random weight's int4 g128 asymmetric codes in both decode layouts (False: K-major, True: N-major) and
    the stored form (``"stored"``, the reference's input)."""
    w = torch.randn(n, k, device=device)
    s, z = weight_qparams(w, get_qdtype("int4"), False, GROUP)
    q = quantize(w, s, z, qdtype="int4", axis=1, block_size=GROUP)
    return {nm: wo.pack_words(q, s, z, "int4", GROUP, n_major=nm) for nm in (False, True)} | {"stored": (q, s, z)}


_NORM_PARTIALS: dict[tuple, torch.Tensor] = {}


def fold_fusion(x: torch.Tensor) -> wo.ReduceFusion:
    """``cc_f``'s fusion: the input's norm from ``FOLD_NORM_PARTIALS`` partial sums of squares of mean 4 (the output
    halved: ``reference``), made once per device and K so a timed launch allocates and fills nothing."""
    key = (x.device, x.shape[-1], FOLD_NORM_PARTIALS)
    if key not in _NORM_PARTIALS:
        _NORM_PARTIALS[key] = torch.full((1, FOLD_NORM_PARTIALS), 4.0 * x.shape[-1] / FOLD_NORM_PARTIALS,
                                         device=x.device)
    return wo.ReduceFusion(sumsq=_NORM_PARTIALS[key], eps=0.0)


def reference(ref: torch.Tensor, variant: str) -> torch.Tensor:
    """The output ``variant``'s launches should give: ``cc_f``'s / ``cc_kf``'s norm halves it (exact in bf16)."""
    return ref / 2 if variant in FOLDED_FAMILIES else ref


def launch(x, words, s, z, out, variant: str, cfg: dict):
    tc = variant.startswith("tc")
    c = dict(cfg, BLOCK_M=cfg.get("BLOCK_M", 16) if tc else 1, TC=tc)
    if "TILE" in c:  # a FOLD config's tile in words: its chunks a step at this K (``weight_only.fold_chunks``)
        k = x.shape[-1]
        cw = wo.chunk_words(k, GROUP, 4)
        c["U"] = wo.fold_chunks(k // (8 * cw), cw, c["BLOCK_N"], c.pop("TILE"))
    fusion = fold_fusion(x) if variant in FOLDED_FAMILIES else None
    return wo._launch_words(x, words, s, z, None, out, "int4", GROUP, c, "", fusion)


def jobs(ms, shapes, only, variants):
    """(M, K, N, variant, config index) in the timing loop's order: shape-major, so a cut budget loses shapes last."""
    return [(m, k, n, v, i) for k, n in shapes for m in ms for v in kinds_for(m, only)
            for i in range(len(variants[v])) if runs_at(m, variants[v][i])]


def runs_at(m: int, cfg: dict) -> bool:
    """A prefill config runs only at the M of its bucket, a 16-row one at M <= 16; the decode configs (no
    ``BLOCK_M``) at every M they are listed for."""
    if m <= 16:
        return cfg.get("BLOCK_M", 16) <= 16
    return cfg.get("BLOCK_M") == wo.prefill_bucket(m)


def warm(args) -> None:
    """Worker: launch each of its jobs once (fills Triton's disk cache; errors are the timing loop's to record)."""
    idx, total = map(int, args.warm_worker.split("/"))
    ms, shapes, only = parse(args)
    variants = FINAL if args.set == "final" else VARIANTS
    todo = jobs(ms, shapes, only, variants)[idx::total]
    cache: dict = {}
    op_shapes = sorted({(m, k, n) for m, k, n, _, _ in jobs(ms, shapes, only, variants)})[idx::total]
    for m, k, n in op_shapes:  # the op's default path at each shape (what op_default times)
        try:
            w = make_weight(n, k, "cuda")[wo.words_n_major(n, k)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            torch.ops.lowbit.weight_only_linear(x, *w, None, "int4", GROUP, "auto")
        except Exception as e:  # noqa: BLE001 - the timing loop records it
            print(f"warm op M={m} K={k} N={n}: {e!r}", file=sys.stderr)
    for m, k, n, v, i in todo:
        nm = v in N_MAJOR
        key = (k, n, nm)
        if key not in cache:
            words = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
            if nm:
                words = words.t().contiguous().t()
            s = torch.rand(k // GROUP, n, device="cuda").t()
            z = torch.randint(0, 16, (k // GROUP, n), device="cuda", dtype=torch.int8).t()  # qparams_from_range's
            cache[key] = (words, s, z)
        words, s, z = cache[key]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        try:
            launch(x, words, s, z, out, v, variants[v][i])
        except Exception as e:  # noqa: BLE001 - the timing loop records it
            print(f"warm {v}#{i}: {e!r}", file=sys.stderr)
    torch.cuda.synchronize()


def once(args) -> None:
    """``--once``: each listed config launched twice per (M, shape), the second after a synchronize (so ``ncu
    --launch-skip`` / ``-c`` can pick warm launches), its error against the reference printed."""
    ms, shapes, _ = parse(args)
    variants = FINAL if args.set == "final" else VARIANTS
    picks = [(v, int(i)) for v, i in (p.split(":") for p in args.once.split(","))]
    for k, n in shapes:
        w = make_weight(n, k, "cuda")
        q, s, z = w["stored"]
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = wo.weight_only_linear_ref(x, q, s, z, None, "int4", GROUP)
            for v, i in picks:
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                words = w[v in N_MAJOR]
                try:
                    launch(x, *words, out, v, variants[v][i])
                    torch.cuda.synchronize()
                    launch(x, *words, out, v, variants[v][i])
                    torch.cuda.synchronize()
                    print(f"once M={m} K={k} N={n} {v}#{i} rel_err={rel_err(out, reference(ref, v)):.5f}",
                          flush=True)
                except Exception as e:  # noqa: BLE001 - one failing config must not stop the profile
                    print(f"once M={m} K={k} N={n} {v}#{i} error {e!r}"[:400], flush=True)


def parse(args):
    ms = [int(v) for v in args.ms.split(",") if v]
    shapes = ([tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes
              else list(SMOKE_SHAPES if args.smoke else SHAPES))
    only = {v for v in args.only.split(",") if v}
    return ms, shapes, only


def compiled_rows() -> list[dict]:
    """Registers, spills and shared memory of every word-layout GEMV kernel this process compiled (what bounds
    its occupancy), from Triton's in-memory kernel cache; best effort (the cache's shape is Triton-internal)."""
    rows = []
    for fn in (wo._gemv_r, wo._gemv_t, wo._tc_t, wo._tc_pairs, wo._gemv_words, wo._tc_words,
               wo._splitk_reduce):
        try:
            for i, cache in enumerate(fn.device_caches.values()):
                for key, ck in cache[0].items():
                    rows.append({"kernel": "gemv_sweep/compiled", "variant": f"{fn.__name__}#{i}#{len(rows)}",
                                 "name": fn.__name__, "n_regs": getattr(ck, "n_regs", None),
                                 "n_spills": getattr(ck, "n_spills", None),
                                 "num_warps": getattr(ck.metadata, "num_warps", None),
                                 "shared": getattr(ck.metadata, "shared", None), "key": str(key)[:600]})
        except Exception as e:  # noqa: BLE001 - diagnostics only
            rows.append({"kernel": "gemv_sweep/compiled", "variant": fn.__name__, "error": repr(e)[:200]})
    return rows


def baselines(bk, bw: float, base: dict, x: torch.Tensor, ref: torch.Tensor, weights: dict, nbytes: int,
              emit) -> float:
    """cuBLAS bf16, tinygemm and the op's default path at one (M, K, N), each a row; returns cuBLAS' µs (NaN if
    it failed: the rows after it then carry no speedup)."""
    m, k, n = base["M"], base["K"], base["N"]
    cublas_us = float("nan")
    try:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bk.n_copies(2 * n * k))]
        cublas_us = bk.bench_graph([lambda w=w: F.linear(x, w) for w in dense])
        del dense
        emit(dict(base, kernel="gemv_sweep/cublas_bf16", us=round(cublas_us, 2),
                  eff_bw_frac=round((2 * n * k + 2 * (m * k + m * n)) / (cublas_us * 1e-6) / bw, 3)))
        tg = [bk.tinygemm(torch.randn(n, k, device="cuda"), x) for _ in range(bk.n_copies(n * k // 2))]
        if all(f is not None for f in tg):
            t = bk.bench_graph(tg)
            emit(dict(base, kernel="gemv_sweep/tinygemm_int4_g128", us=round(t, 2), speedup=round(cublas_us / t, 3)))
        del tg
        op = torch.ops.lowbit.weight_only_linear
        dflt = weights[wo.words_n_major(n, k)]  # the layout pack_words makes for this shape
        err = rel_err(op(x, *dflt[0], None, "int4", GROUP, "auto"), ref)
        t = bk.bench_graph([lambda w=w: op(x, *w, None, "int4", GROUP, "auto") for w in dflt])
        n_major = wo.is_n_major(dflt[0][0])
        cfg = wo.words_config(m, n, k, 4, wo.chunk_words(k, GROUP, 4), n_major, GROUP)
        emit(dict(base, kernel="gemv_sweep/op_default", us=round(t, 2), speedup=round(cublas_us / t, 3),
                  eff_bw_frac=round(nbytes / (t * 1e-6) / bw, 3), rel_err=round(err, 5),
                  layout="n_major" if n_major else "k_major", config=cfg, **({"wrong": True} if err > 1e-2 else {})))
        if m == 1:  # the op as a decode block calls it: with the norm of its input (``cc_f``'s fusion)
            sumsq = fold_fusion(x).sumsq
            err = rel_err(op(x, *dflt[0], None, "int4", GROUP, "auto", "", sumsq, 0.0), reference(ref, "cc_f"))
            t = bk.bench_graph([lambda w=w: op(x, *w, None, "int4", GROUP, "auto", "", sumsq, 0.0) for w in dflt])
            cfg = wo.words_config(m, n, k, 4, wo.chunk_words(k, GROUP, 4), n_major, GROUP, fused=True)
            emit(dict(base, kernel="gemv_sweep/op_fused", us=round(t, 2),
                      speedup=round(cublas_us / t, 3), rel_err=round(err, 5), config=cfg,
                      **({"wrong": True} if err > 1e-2 else {})))
    except Exception as e:  # noqa: BLE001 - a failing baseline/default is a row, the sweep goes on
        emit(dict(base, kernel="gemv_sweep/error", error=repr(e)[:300]))
    return cublas_us


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    global GROUP, FOLD_NORM_PARTIALS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gemv.json")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", default="", help="KxN,KxN,... (default SHAPES; --smoke: SMOKE_SHAPES)")
    ap.add_argument("--only", default="", help="variants to run (default all of VARIANTS)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop timing after this many seconds in all")
    ap.add_argument("--workers", type=int, default=8, help="parallel compile processes (0: compile inline)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, correctness only")
    ap.add_argument("--set", choices=("all", "final"), default="all", help="config lists: VARIANTS or FINAL")
    ap.add_argument("--run", default="", help="a label every row carries (rows of other runs are kept)")
    ap.add_argument("--once", default="", help="variant:i,variant:i,...: launch these configs once per shape "
                    "(after one untimed launch each), no timing, no rows: a target for ncu")
    ap.add_argument("--group", type=int, default=128, help="scale group of the int4 weights (64: SmolLM2)")
    ap.add_argument("--k-major-max-k", type=int, default=None,
                    help="weight_only.K_MAJOR_MAX_K for the op_default / op_fused rows (1536: SmolLM2's K-major words)")
    ap.add_argument("--norm-partials", type=int, default=FOLD_NORM_PARTIALS,
                    help="partial sums of squares of the fused rows' norm (cc_f, cc_kf, op_fused)")
    ap.add_argument("--warm-worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    GROUP, FOLD_NORM_PARTIALS = args.group, args.norm_partials
    if args.k_major_max_k is not None:
        wo.K_MAJOR_MAX_K = args.k_major_max_k
    if args.warm_worker:
        warm(args)
        return
    if args.once:
        once(args)
        return
    t_start = time.time()
    ms, shapes, only = parse(args)
    variants = FINAL if args.set == "final" else VARIANTS
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gemv needs CUDA (or --smoke with TRITON_INTERPRET=1)")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    dev_name, date = machine(device), datetime.date.today().isoformat()
    procs = []
    if not args.smoke and args.workers > 0:
        base = [sys.executable, __file__, "--ms", args.ms, "--only", args.only, "--set", args.set,
                "--group", str(args.group), "--norm-partials", str(args.norm_partials)]
        if args.shapes:
            base += ["--shapes", args.shapes]
        if args.k_major_max_k is not None:
            base += ["--k-major-max-k", str(args.k_major_max_k)]
        procs = [subprocess.Popen(base + ["--warm-worker", f"{i}/{args.workers}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(args.workers)]
    import triton
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": dev_name, "versions": versions}
    rows: list[dict] = []
    for p in procs:
        try:
            p.wait(timeout=max(1.0, args.budget_s * 0.4 - (time.time() - t_start)))
        except subprocess.TimeoutExpired:
            p.kill()
    print(f"compile workers done at {time.time() - t_start:.0f}s", flush=True)
    bw = None
    if not args.smoke:
        import bench_kernels as bk
        bw = bk.copy_bandwidth()
        rows.append({"kernel": "copy_bandwidth", "variant": "d2d", "bytes_per_s": round(bw), "device": dev_name,
                     "date": date})
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    out_path = Path(args.out)
    run = args.run or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
    runs = load_results(out_path).get("runs", {})  # every run's command stays findable by its label
    header["runs"] = {**runs, run: {"command": header["command"], "date": date, "device": dev_name}}

    def emit(r: dict) -> None:
        r.update(run=run, device=dev_name, date=date)
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items() if k not in ("device", "date")), flush=True)

    for k, n in shapes:
        for m in ms:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            nbytes = n * k // 2 + n * k // GROUP * 8 + 2 * (m * k + m * n)  # codes, fp32 scale + zero, x, y
            base = {"M": m, "K": k, "N": n, "group": GROUP}
            copies = [make_weight(n, k, device) for _ in range(1 if args.smoke else bk.n_copies(n * k // 2))]
            weights = {nm: [c[nm] for c in copies] for nm in (False, True)}
            q, s, z = copies[0]["stored"]
            del copies
            ref = wo.weight_only_linear_ref(x, q, s, z, None, "int4", GROUP)
            cublas_us = None if args.smoke else baselines(bk, bw, base, x, ref, weights, nbytes, emit)
            for v in kinds_for(m, only):
                nm = v in N_MAJOR
                family = []
                for i, cfg in enumerate(variants[v]):
                    if not runs_at(m, cfg):
                        continue
                    r = dict(base, kernel=f"gemv_sweep/{v}", variant=f"{v}#{i}", config=cfg)
                    if time.time() - t_start > args.budget_s:
                        emit(dict(r, skipped="budget"))
                        continue
                    try:
                        w0 = weights[nm][0]
                        launch(x, w0[0], w0[1], w0[2], out, v, cfg)
                        r["rel_err"] = round(rel_err(out, reference(ref, v)), 5)
                        if r["rel_err"] > 1e-2:
                            r["wrong"] = True
                        if not args.smoke:
                            t = bk.bench_graph([lambda w=w, c=cfg, x=x, out=out, v=v: launch(x, *w, out, v, c)
                                                for w in weights[nm]], warmup=5, rep=20)
                            # again after the replays: state a launch leaves behind would show here
                            launch(x, w0[0], w0[1], w0[2], out, v, cfg)
                            r["rel_err_after"] = round(rel_err(out, reference(ref, v)), 5)
                            if r["rel_err_after"] > 1e-2:
                                r["wrong"] = True
                            r.update(us=round(t, 2), speedup=round(cublas_us / t, 3),
                                     eff_bw_frac=round(nbytes / (t * 1e-6) / bw, 3))
                    except Exception as e:  # noqa: BLE001 - a config that fails is a row, not the end of the run
                        r["error"] = repr(e)[:300]
                    emit(r)
                    family.append(r)
                ok = [r for r in family if "us" in r and not r.get("wrong")]
                if ok:
                    best = min(ok, key=lambda r: r["us"])
                    best["best"] = True
                    print(f"BEST M={m} K={k} N={n} {v}: {best['us']} us speedup {best.get('speedup')} "
                          f"{best['config']}", flush=True)
            del weights
            merge_rows(out_path, header, rows, key=ROW_KEY, append_command=True)
    if not args.smoke:
        for r in compiled_rows():
            emit(r)
    merge_rows(out_path, header, rows, key=ROW_KEY, append_command=True)
    print(f"done in {time.time() - t_start:.0f}s, {len(rows)} rows -> {out_path}", flush=True)


if __name__ == "__main__":
    main()
