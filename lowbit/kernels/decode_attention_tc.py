"""Decode attention over the packed KV cache on tensor cores (``decode_attention(..., variant="v3")``): one program
per (sequence, kv head, chunk of the context) computes every query head of the kv head's group at once, so each
key/value block is read and dequantized once for the whole group (issue 18: the v2 kernel's grouped form re-did
the per-code FFMAs for each head and ran 32 q / 8 kv heads at 0.36x bf16 SDPA).

A step reads ``JB`` key blocks (``T = JB * K_BLOCK`` tokens). The MMA's query rows are (key block of the step,
head of the group): ``JB * GP`` rows (``GP``: the group padded to a power of two; at least 16), so with a group
of 4 every row is real and 4 key blocks share the per-step work on the ``[rows, D]`` query (a group of 1 keeps 4
real rows of 16). Each row's query carries its key block's per-channel scales (and the fields' ``2**-e``), its
zero points become one correction per row, it attends only to its block's tokens and keeps its own online
softmax; a head's rows merge after the loop.

* keys: each int32 word -> float16 ``2**e * u`` (``_codes``: per pair of codes one PRMT + one LOP3 that put two
  fields in the mantissas of ``1024.0``, one HSUB2 of ``1024.0``: exact), then ``S^T = K Q^T`` (``st``, the
  default: the tokens are the MMA's M, a warpgroup MMA on Hopper; ``st=False``: ``S = Q K^T``);
* values: the same with the token's zero (HSUB2 of ``1024 + 2**e z``, exact) and scale (HMUL2 by ``s / 2**e``)
  per pair (``_dequant``), then ``O^T += V^T P^T`` (channels as M).

``natural`` (default): pair r of a word is channels (2r, 2r + 1); ``natural=False``: channels (r, r + R), one
PRMT less per pair, with the query, scales and output permuted to match. Operands are float16 (11-bit
significands: a score's error is ~1e-4 of its size; the interpreter reproduces the rounding exactly), products
accumulate in float32. The kernel writes flash-decoding partials in ``decode_attention``'s format;
``_reduce_kernel`` merges them with the float buffer. ``ASM=0`` (the interpreter, and a sweep option) computes
the same float16 values with Triton integer ops and float16 arithmetic instead of the inline PTX.

The softmax's running sum is kept per token slot (``l_s``) and summed once after the loop: only the running max
needs a reduction over the step's tokens.

Offline sm_90 compiles (Triton 3.6, the H200's; ``tools/gpu_round_attention.sh`` has the GPU round that decides
the default): SASS instructions per code per program in the main loop, 8 warps: int4 GQA 4 4.26 (~1.07 per code
and query head; v2 2.9), int4 MHA 4.08 (v2 5.2), int2 4.36, int8 4.34, int4 GQA 8 6.9 (0.87 per code and head);
180 registers (one program of 8 warps per SM; ``maxnreg=128``: two, 4.47 per code).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def pair_spec(bits: int, natural: bool) -> list[tuple[int, int, int, int, int]]:
    """Per output register pair of a word: (PRMT selector or -1, shift, mask, low channel's multiplier ``2**e``,
    high channel's), in output order. ``natural``: pair r = channels (2r, 2r + 1) (a PRMT copies a byte to both
    halves, or for 8 bits moves two bytes under 1024.0's exponent); else pair r = channels (r, r + R) of the word
    (one shift shared by the word, then one LOP3 per pair)."""
    fm = (1 << bits) - 1
    per_byte = 8 // bits
    out = []
    for r in range(16 // bits):
        if natural and bits == 8:  # byte 5 of (word, bias) is 0x64
            out.append((0x5050 | ((2 * r + 1) << 8) | (2 * r), 0, 0, 1, 1))
        elif natural:
            k, p = divmod(r, per_byte // 2)
            lo, hi = 2 * p * bits, (2 * p + 1) * bits
            out.append((0x4040 | (k << 8) | k, 0, (fm << lo) | ((fm << hi) << 16), 1 << lo, 1 << hi))
        else:
            sh = 8 * (r // per_byte)
            e = bits * (r % per_byte)
            out.append((-1, sh, (fm << e) | ((fm << e) << 16), 1 << e, 1 << e))
    return out


def _pair_lines(bits: int, natural: bool, w: str, dst) -> list[str]:
    lines = [".reg .b32 hw, zr, bias;", "mov.b32 zr, 0;", "mov.b32 bias, 0x64006400;", f"shr.u32 hw, {w}, 8;"]
    for r, (sel, sh, mask, _, _) in enumerate(pair_spec(bits, natural)):
        if natural and bits == 8:
            lines.append(f"prmt.b32 {dst(r)}, {w}, bias, {sel:#06x};")
        elif natural:
            lines.append(f"prmt.b32 {dst(r)}, {w}, zr, {sel:#06x};")
            lines.append(f"lop3.b32 {dst(r)}, {dst(r)}, {mask:#010x}, bias, 0xEA;")
        else:
            lines.append(f"lop3.b32 {dst(r)}, {w if sh == 0 else 'hw'}, {mask:#010x}, bias, 0xEA;")
    return lines


def dequant_asm(bits: int, scaled: bool = True, natural: bool = False) -> tuple[str, str]:
    """PTX and constraints of one word's dequantization: inputs ``$w`` (the int32 word), one biased-zero pair and
    one scale pair per output register pair; outputs the ``32 / bits`` codes as float16 bits in ``pair_spec``'s
    order. ``scaled=False``: one input pair (the bias ``1024.0``) subtracted from every pair, no scales."""
    perw = 32 // bits
    r_n = perw // 2
    n_out = perw
    lines = ["{", ".reg .b32 " + ", ".join(f"t{r}" for r in range(r_n)) + ";"]
    lines += _pair_lines(bits, natural, f"${n_out}", lambda r: f"t{r}")
    for r in range(r_n):
        lines.append(f"sub.f16x2 t{r}, t{r}, ${n_out + 1 + (r if scaled else 0)};")
    for r in range(r_n if scaled else 0):
        lines.append(f"mul.f16x2 t{r}, t{r}, ${n_out + 1 + r_n + r};")
    for r in range(r_n):
        lines.append(f"mov.b32 {{${2 * r}, ${2 * r + 1}}}, t{r};")
    lines.append("}")
    constraints = ",".join(["=h"] * n_out + ["r"] * (1 + (2 * r_n if scaled else 1)))
    return "\n".join(lines), constraints


def codes_asm_packed(bits: int, natural: bool = False) -> tuple[str, str]:
    """``dequant_asm(bits, scaled=False)`` for ``inline_asm_elementwise(pack=32 / bits)``: the word comes in as
    ``32 / bits`` copies (only the first is read), the codes leave as ``16 / bits`` packed float16 pairs."""
    perw = 32 // bits
    r_n = perw // 2
    lines = ["{"] + _pair_lines(bits, natural, f"${r_n}", lambda r: f"${r}")
    for r in range(r_n):
        lines.append(f"sub.f16x2 ${r}, ${r}, bias;")
    lines.append("}")
    return "\n".join(lines), ",".join(["=r"] * r_n + ["r"] * perw)


if triton is not None:
    ONE2 = tl.constexpr(0x3C003C00)  # float16 pair (1.0, 1.0)

    @triton.jit
    def _pair_mult(r, BITS: tl.constexpr):
        """``2**e`` of pair ``r``'s fields (int32): pair r's low field sits at bit ``BITS * (r % (8 / BITS))``."""
        PB: tl.constexpr = 8 // BITS
        return 1 << (BITS * (r % PB))

    @triton.jit
    def _half_bits(x):
        """float32 ``x`` -> its float16 bits in the low half of an int32."""
        return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _pair_ref(w, zbp, sp, r: tl.constexpr, BITS: tl.constexpr, NAT: tl.constexpr):
        """Pair ``r`` of ``_dequant`` in Triton ops: the same float16 values as the PTX (``pair_spec``)."""
        PB: tl.constexpr = 8 // BITS
        FM: tl.constexpr = (1 << BITS) - 1
        if NAT and BITS == 8:
            t = ((w >> (16 * r)) & 0xFF) | (((w >> (16 * r + 8)) & 0xFF) << 16) | 0x64006400
        elif NAT:
            K: tl.constexpr = r // (PB // 2)
            P: tl.constexpr = r % (PB // 2)
            byte = (w >> (8 * K)) & 0xFF
            MASK: tl.constexpr = (FM << (2 * P * BITS)) | ((FM << ((2 * P + 1) * BITS)) << 16)
            t = ((byte | (byte << 16)) & MASK) | 0x64006400
        else:
            SH: tl.constexpr = 8 * (r // PB)
            FIELD: tl.constexpr = FM << (BITS * (r % PB))
            t = ((w >> SH) & (FIELD | (FIELD << 16))) | 0x64006400
        lo = (t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        zlo = (zbp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        zhi = (zbp >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        slo = (sp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        shi = (sp >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return (lo - zlo) * slo, (hi - zhi) * shi

    @triton.jit
    def _cat(a, b):
        """``[..., n]`` twice -> ``[..., 2n]`` alternating (in-thread): a list ``L`` comes out in order as
        ``_cat(order(L[0::2]), order(L[1::2]))``, recursively."""
        return tl.interleave(a, b)

    @triton.jit
    def _dequant(w, z0, z1, z2, z3, z4, z5, z6, z7, s0, s1, s2, s3, s4, s5, s6, s7, BITS: tl.constexpr,
                 ASM: tl.constexpr, PTX: tl.constexpr, CON: tl.constexpr, NAT: tl.constexpr):
        """int32 words ``[...]`` -> float16 ``[..., 32 / BITS]`` in ``PERM`` order: pair ``r`` (fields ``r`` and
        ``r + R``) minus its biased zeros ``z_r`` and times its scales ``s_r`` (both packed float16 pairs, shaped
        like ``w``; pairs past ``R = 16 / BITS`` are ignored)."""
        if BITS == 8:
            if ASM:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(PTX, CON, [w, z0, z1, s0, s1],
                                                           dtype=(tl.int16,) * 4, is_pure=True, pack=1)
                a0, b0 = o0.to(tl.float16, bitcast=True), o1.to(tl.float16, bitcast=True)
                a1, b1 = o2.to(tl.float16, bitcast=True), o3.to(tl.float16, bitcast=True)
            else:
                a0, b0 = _pair_ref(w, z0, s0, 0, BITS, NAT)
                a1, b1 = _pair_ref(w, z1, s1, 1, BITS, NAT)
            out = _cat(_cat(a0, a1), _cat(b0, b1))
        elif BITS == 4:
            if ASM:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    PTX, CON, [w, z0, z1, z2, z3, s0, s1, s2, s3], dtype=(tl.int16,) * 8, is_pure=True,
                    pack=1)
                a0, b0 = o0.to(tl.float16, bitcast=True), o1.to(tl.float16, bitcast=True)
                a1, b1 = o2.to(tl.float16, bitcast=True), o3.to(tl.float16, bitcast=True)
                a2, b2 = o4.to(tl.float16, bitcast=True), o5.to(tl.float16, bitcast=True)
                a3, b3 = o6.to(tl.float16, bitcast=True), o7.to(tl.float16, bitcast=True)
            else:
                a0, b0 = _pair_ref(w, z0, s0, 0, BITS, NAT)
                a1, b1 = _pair_ref(w, z1, s1, 1, BITS, NAT)
                a2, b2 = _pair_ref(w, z2, s2, 2, BITS, NAT)
                a3, b3 = _pair_ref(w, z3, s3, 3, BITS, NAT)
            out = _cat(_cat(_cat(a0, a2), _cat(a1, a3)), _cat(_cat(b0, b2), _cat(b1, b3)))
        else:
            if ASM:
                o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = tl.inline_asm_elementwise(
                    PTX, CON, [w, z0, z1, z2, z3, z4, z5, z6, z7, s0, s1, s2, s3, s4, s5, s6, s7],
                    dtype=(tl.int16,) * 16, is_pure=True, pack=1)
                a0, b0 = o0.to(tl.float16, bitcast=True), o1.to(tl.float16, bitcast=True)
                a1, b1 = o2.to(tl.float16, bitcast=True), o3.to(tl.float16, bitcast=True)
                a2, b2 = o4.to(tl.float16, bitcast=True), o5.to(tl.float16, bitcast=True)
                a3, b3 = o6.to(tl.float16, bitcast=True), o7.to(tl.float16, bitcast=True)
                a4, b4 = o8.to(tl.float16, bitcast=True), o9.to(tl.float16, bitcast=True)
                a5, b5 = o10.to(tl.float16, bitcast=True), o11.to(tl.float16, bitcast=True)
                a6, b6 = o12.to(tl.float16, bitcast=True), o13.to(tl.float16, bitcast=True)
                a7, b7 = o14.to(tl.float16, bitcast=True), o15.to(tl.float16, bitcast=True)
            else:
                a0, b0 = _pair_ref(w, z0, s0, 0, BITS, NAT)
                a1, b1 = _pair_ref(w, z1, s1, 1, BITS, NAT)
                a2, b2 = _pair_ref(w, z2, s2, 2, BITS, NAT)
                a3, b3 = _pair_ref(w, z3, s3, 3, BITS, NAT)
                a4, b4 = _pair_ref(w, z4, s4, 4, BITS, NAT)
                a5, b5 = _pair_ref(w, z5, s5, 5, BITS, NAT)
                a6, b6 = _pair_ref(w, z6, s6, 6, BITS, NAT)
                a7, b7 = _pair_ref(w, z7, s7, 7, BITS, NAT)
            out = _cat(_cat(_cat(_cat(a0, a4), _cat(a2, a6)), _cat(_cat(a1, a5), _cat(a3, a7))),
                       _cat(_cat(_cat(b0, b4), _cat(b2, b6)), _cat(_cat(b1, b5), _cat(b3, b7))))
        return out

    @triton.jit
    def _codes_packed(w, BITS: tl.constexpr, PTX: tl.constexpr, CON: tl.constexpr):
        """``_codes`` with the word repeated ``32 / BITS`` times in-thread (``tl.join``) and one packed asm per
        word: the codes come out as float16 pairs already in the registers a 128-bit shared store takes."""
        w2 = tl.reshape(tl.join(w, w), [w.shape[0], w.shape[1] * 2])
        w4 = tl.reshape(tl.join(w2, w2), [w.shape[0], w.shape[1] * 4])
        if BITS == 8:
            out = tl.inline_asm_elementwise(PTX, CON, [w4], dtype=tl.float16, is_pure=True, pack=4)
        else:
            w8 = tl.reshape(tl.join(w4, w4), [w.shape[0], w.shape[1] * 8])
            if BITS == 4:
                out = tl.inline_asm_elementwise(PTX, CON, [w8], dtype=tl.float16, is_pure=True, pack=8)
            else:
                w16 = tl.reshape(tl.join(w8, w8), [w.shape[0], w.shape[1] * 16])
                out = tl.inline_asm_elementwise(PTX, CON, [w16], dtype=tl.float16, is_pure=True, pack=16)
        return out

    @triton.jit
    def _codes(w, BITS: tl.constexpr, ASM: tl.constexpr, PTX: tl.constexpr, CON: tl.constexpr, NAT: tl.constexpr):
        """int32 words ``[...]`` -> float16 ``[..., 32 / BITS]`` in ``PERM`` order: each field's ``u * 2**e``
        (exact; the query carries the scales and ``2**-e``): one LOP3 and one HSUB2 per pair."""
        c = 0x64006400 + tl.zeros_like(w)
        if ASM:
            if BITS == 8:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(PTX, CON, [w, c], dtype=(tl.int16,) * 4,
                                                           is_pure=True, pack=1)
                out = _cat(_cat(o0, o2), _cat(o1, o3))
            elif BITS == 4:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(PTX, CON, [w, c],
                                                                           dtype=(tl.int16,) * 8, is_pure=True, pack=1)
                out = _cat(_cat(_cat(o0, o4), _cat(o2, o6)), _cat(_cat(o1, o5), _cat(o3, o7)))
            else:
                o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = tl.inline_asm_elementwise(
                    PTX, CON, [w, c], dtype=(tl.int16,) * 16, is_pure=True, pack=1)
                out = _cat(_cat(_cat(_cat(o0, o8), _cat(o4, o12)), _cat(_cat(o2, o10), _cat(o6, o14))),
                           _cat(_cat(_cat(o1, o9), _cat(o5, o13)), _cat(_cat(o3, o11), _cat(o7, o15))))
            out = out.to(tl.float16, bitcast=True)
        else:
            one = ONE2 + tl.zeros_like(w)
            out = _dequant(w, c, c, c, c, c, c, c, c, one, one, one, one, one, one, one, one, BITS, False, PTX, CON,
                           NAT)
        return out

    @triton.jit
    def _value_pair(vz, vs, r: tl.constexpr, BITS: tl.constexpr, NAT: tl.constexpr):
        """Pair ``r``'s packed biased zeros and scales from a token group's zero ``vz`` (int32) and scale ``vs``
        (float32), each half divided by its field's ``2**e`` (``pair_spec``)."""
        PB: tl.constexpr = 8 // BITS
        if NAT and BITS < 8:
            P: tl.constexpr = r % (PB // 2)
            ML: tl.constexpr = 1 << (2 * P * BITS)
            MH: tl.constexpr = 1 << ((2 * P + 1) * BITS)
        elif NAT:
            ML: tl.constexpr = 1
            MH: tl.constexpr = 1
        else:
            ML: tl.constexpr = 1 << (BITS * (r % PB))
            MH: tl.constexpr = ML
        lo = _half_bits(vs * (1.0 / ML))
        hi = _half_bits(vs * (1.0 / MH))
        return 0x64006400 + ML * vz + ((MH * vz) << 16), lo | (hi << 16)

    @triton.jit
    def _perm_chan(l, BITS: tl.constexpr):
        """Logical column ``l`` of a dequantized tile -> its channel (``PERM`` within each word)."""
        PERW: tl.constexpr = 32 // BITS
        R: tl.constexpr = PERW // 2
        j = l % PERW
        return (l - j) + j // 2 + (j % 2) * R

    @triton.jit
    def _pair_order(x, RM: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, NAT: tl.constexpr):
        """``[RM, D]`` in channel order -> the kernel's column order (``_perm_chan``; unchanged when ``NAT``): within
        each word, (2, R) -> (R, 2), a register permutation when the word is in one thread."""
        if NAT:
            return x
        else:
            PERW: tl.constexpr = 32 // BITS
            x4 = tl.reshape(x, [RM, D // PERW, 2, PERW // 2])
            return tl.reshape(tl.permute(x4, (0, 1, 3, 2)), [RM, D])

    @triton.jit(do_not_specialize=["s_ab", "s_ah", "s_as", "s_mb", "s_mh"])
    def _split_kernel_tc(
        Q, KW, KS, KZ, VW, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh,
        s_ab, s_ah, s_as, s_mb, s_mh, qk_scale, split,
        HQ: tl.constexpr, GROUPS: tl.constexpr, GP: tl.constexpr, JB: tl.constexpr, RM: tl.constexpr,
        D: tl.constexpr, BITS: tl.constexpr, K_BLOCK: tl.constexpr, V_GROUP: tl.constexpr, ASM: tl.constexpr,
        NAT: tl.constexpr, VT: tl.constexpr, ST: tl.constexpr, KPTX: tl.constexpr, KCON: tl.constexpr, VPTX: tl.constexpr, VCON: tl.constexpr,
    ):
        """One (sequence, kv head, chunk): the group's ``GROUPS`` query heads (``GP``: padded to a power of two)
        over the chunk's quantized tokens in ``[lo, hi)``, ``JB`` key blocks per step. MMA row ``i`` is (key block
        ``i // GP`` of the step, head ``i % GP``): its query carries that block's key scales, it attends only to
        that block's tokens and keeps its own online softmax; the rows of one head merge after the loop. With
        ``JB * GP`` = 16 every row of the MMA is real (the per-step work on the ``[RM, D]`` query and accumulator
        is shared by ``JB`` key blocks); ``RM`` = max(16, JB * GP) rows."""
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        HKV: tl.constexpr = HQ // GROUPS
        b = pid_h // HKV
        kvh = pid_h % HKV
        PERW: tl.constexpr = 32 // BITS
        DW: tl.constexpr = D // PERW
        NG: tl.constexpr = D // V_GROUP
        WPG: tl.constexpr = DW // NG  # words of one value group
        T: tl.constexpr = JB * K_BLOCK  # tokens per step
        rows = tl.arange(0, RM)
        rj = rows // GP  # the row's key block in a step
        rh = rows % GP  # its head in the group
        live = (rh < GROUPS) & (rj < JB)
        heads = kvh * GROUPS + rh
        if NAT:
            cols = tl.arange(0, D)
        else:
            cols = _perm_chan(tl.arange(0, D), BITS)  # [D] logical column -> channel
        tn = tl.arange(0, T)
        word = tl.arange(0, DW)[None, :]  # [1, DW]
        kw_off = tn[:, None] * DW + word  # [T, DW]
        g3 = tl.arange(0, NG)[None, :, None]
        vw_off = tn[:, None, None] * DW + g3 * WPG + tl.arange(0, WPG)[None, None, :]  # [T, NG, WPG]
        vg_off = tn[:, None, None] * NG + g3  # [T, NG, 1]
        own = (tn[None, :] // K_BLOCK) == rj[:, None]  # [RM, T]: a row's tokens
        lo = tl.load(LO + b)
        hi = tl.load(HI + b)
        start = (tl.maximum(pid_s * split, lo) // K_BLOCK) * K_BLOCK
        end = tl.minimum(pid_s * split + split, hi)
        kw_base = KW + b * s_kcb + kvh * s_kch
        vw_base = VW + b * s_vcb + kvh * s_vch
        ks_base = KS + b * s_ksb + kvh * s_ksh
        kz_base = KZ + b * s_ksb + kvh * s_ksh
        vs_base = VS + b * s_vsb + kvh * s_vsh
        vz_base = VZ + b * s_vsb + kvh * s_vsh
        nat_cols = tl.arange(0, D)  # loads in memory order (vectorized), permuted in registers when not NAT
        q = _pair_order(tl.load(Q + b * s_qb + heads[:, None] * s_qh + nat_cols[None, :], mask=live[:, None],
                                other=0.0), RM, D, BITS, NAT)
        qf = q.to(tl.float32) * qk_scale  # [RM, D]
        if NAT:  # channel c is field c % (8 / BITS) of its byte
            mcol = (1 << (BITS * (tl.arange(0, D) % (8 // BITS)))).to(tl.float32)
        else:
            mcol = _pair_mult(((tl.arange(0, D) % PERW) // 2) % (16 // BITS), BITS).to(tl.float32)  # [D] 2**e
        inv_m = 1.0 / mcol
        m_i = tl.full([RM], -float("inf"), dtype=tl.float32)
        if ST:  # per token slot: summed over the slots once, after the loop (no reduction per step)
            l_s = tl.zeros([T, RM], dtype=tl.float32)
        else:
            l_i = tl.zeros([RM], dtype=tl.float32)
        if VT or ST:
            acc = tl.zeros([D, RM], dtype=tl.float32)
        else:
            acc = tl.zeros([RM, D], dtype=tl.float32)
        vzero = tl.zeros([T, NG, 1], dtype=tl.int32)
        for n0 in range(start, end, T):
            tok = n0 + tn
            valid = (tok >= lo) & (tok < end)
            # keys: each row's block scales (and the fields' 2**-e) folded into its query, the block's zeros
            # into one correction per row (from the same float16 query, so the two cancel exactly)
            if JB == 1:  # one scale row for every row
                kb = (n0 // K_BLOCK) * D + nat_cols[None, :]
                ks = _pair_order(tl.load(ks_base + kb).to(tl.float32), 1, D, BITS, NAT)
                kzm = _pair_order(tl.load(kz_base + kb).to(tl.float32), 1, D, BITS, NAT) * mcol[None, :]
            else:
                rowok = live & (n0 + rj * K_BLOCK < end)
                kb = (n0 // K_BLOCK + rj)[:, None] * D + nat_cols[None, :]  # [RM, D]
                ks = _pair_order(tl.load(ks_base + kb, mask=rowok[:, None], other=0.0).to(tl.float32), RM, D, BITS,
                                 NAT)
                kzm = _pair_order(tl.load(kz_base + kb, mask=rowok[:, None], other=0).to(tl.float32), RM, D, BITS,
                                  NAT) * mcol[None, :]
            qs = (qf * ks * inv_m[None, :]).to(tl.float16)  # [RM, D]
            corr = tl.sum(qs.to(tl.float32) * kzm, 1)  # [RM]
            kx = tl.load(kw_base + n0 * DW + kw_off, mask=valid[:, None], other=0)  # [T, DW]
            if ASM == 2:
                k16 = tl.reshape(_codes_packed(kx, BITS, KPTX, KCON), [T, D])  # u * 2**e
            else:
                k16 = tl.reshape(_codes(kx, BITS, ASM, KPTX, KCON, NAT), [T, D])
            if ST:  # S^T = K Q^T: the tokens as the MMA's M (a warpgroup MMA on Hopper)
                s = tl.dot(k16, tl.trans(qs)) - corr[None, :]  # [T, RM], log2 units
                if JB == 1:
                    s = tl.where(valid[:, None], s, -float("inf"))
                else:
                    s = tl.where(tl.trans(own) & valid[:, None], s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[None, :])  # [T, RM]
                l_s = l_s * alpha[None, :] + p
            else:
                s = tl.dot(qs, tl.trans(k16)) - corr[:, None]  # [RM, T], log2 units
                if JB == 1:
                    s = tl.where(valid[None, :], s, -float("inf"))
                else:
                    s = tl.where(own & valid[None, :], s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            # values: per (token, group) pairs, shared by the fields of one multiplier
            vmask = valid[:, None, None]
            vx = tl.load(vw_base + n0 * DW + vw_off, mask=vmask, other=0)  # [T, NG, WPG]
            vz = tl.load(vz_base + n0 * NG + vg_off, mask=vmask, other=0).to(tl.int32)  # [T, NG, 1]
            vs = tl.load(vs_base + n0 * NG + vg_off, mask=vmask, other=0.0).to(tl.float32)
            vz0, vp0 = _value_pair(vz, vs, 0, BITS, NAT)
            if BITS == 8:
                vz1, vp1 = vz0, vp0
                vz2, vp2, vz3, vp3 = vzero, vzero, vzero, vzero
            else:
                vz1, vp1 = _value_pair(vz, vs, 1, BITS, NAT)
                if BITS == 4:
                    vz2, vp2, vz3, vp3 = vz0, vp0, vz1, vp1
                else:
                    vz2, vp2 = _value_pair(vz, vs, 2, BITS, NAT)
                    vz3, vp3 = _value_pair(vz, vs, 3, BITS, NAT)
            bv: tl.constexpr = [T, NG, WPG]
            z0, z1, z2, z3 = (tl.broadcast_to(vz0, bv), tl.broadcast_to(vz1, bv), tl.broadcast_to(vz2, bv),
                              tl.broadcast_to(vz3, bv))
            p0, p1, p2, p3 = (tl.broadcast_to(vp0, bv), tl.broadcast_to(vp1, bv), tl.broadcast_to(vp2, bv),
                              tl.broadcast_to(vp3, bv))
            v16 = _dequant(vx, z0, z1, z2, z3, z0, z1, z2, z3, p0, p1, p2, p3, p0, p1, p2, p3, BITS, ASM, VPTX,
                           VCON, NAT)
            v16 = tl.reshape(v16, [T, D])
            if ST:  # p is already P^T
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v16), p.to(tl.float16))
            elif VT:  # O^T = V^T P^T: the values as the A operand
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v16), tl.trans(p.to(tl.float16)))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v16)
        if VT or ST:
            acc = tl.trans(acc)
        if ST:
            l_i = tl.sum(l_s, 0)
        if JB == 1:
            a_ptr = ACC + b * s_ab + pid_s * s_as + heads[:, None] * s_ah + cols[None, :]
            tl.store(a_ptr, acc, mask=live[:, None])
            tl.store(M + b * s_mb + heads * s_mh + pid_s, m_i, mask=live)
            tl.store(L + b * s_mb + heads * s_mh + pid_s, l_i, mask=live)
        else:  # the JB rows of each head: one softmax
            NR: tl.constexpr = RM // GP
            m3 = tl.reshape(m_i, [NR, GP])
            m_h = tl.max(m3, 0)  # [GP]
            c = tl.exp2(m3 - tl.where(m_h == -float("inf"), 0.0, m_h)[None, :])  # [NR, GP]
            out = tl.sum(tl.reshape(acc, [NR, GP, D]) * c[:, :, None], 0)  # [GP, D]
            den = tl.sum(tl.reshape(l_i, [NR, GP]) * c, 0)
            hg = tl.arange(0, GP)
            hh = kvh * GROUPS + hg
            hm = hg < GROUPS
            a_ptr = ACC + b * s_ab + pid_s * s_as + hh[:, None] * s_ah + cols[None, :]
            tl.store(a_ptr, out, mask=hm[:, None])
            tl.store(M + b * s_mb + hh * s_mh + pid_s, m_h, mask=hm)
            tl.store(L + b * s_mb + hh * s_mh + pid_s, den, mask=hm)


def tc_supported(d: int, bits: int, k_block: int, v_group: int) -> str | None:
    """Why the v3 kernel cannot read this layout (None: it can)."""
    if k_block < 16 or d < 16:
        return f"k_block {k_block} and head_dim {d} must be >= 16 (tensor-core tiles)"
    if v_group * bits < 32:
        return f"a value group of {v_group} {bits}-bit codes is less than one 32-bit word"
    return None


def launch_tc(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, *, bits, k_block, v_group, groups,
              qk_scale, split, num_warps, num_stages, asm, waves, blocks=None, natural=True, vt=False, st=False,
              maxnreg=None):
    """Run ``_split_kernel_tc``: grid ``(B * Hkv, chunks)``; returns ``decode_attention``'s partials."""
    import os

    import torch

    from lowbit.kernels._common import default_split

    b, hq, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    why = tc_supported(d, bits, k_block, v_group)
    if why:
        raise ValueError(f"decode_attention variant v3: {why}")
    for name, t, row in (("k_codes", k_codes, d * bits // 8), ("v_codes", v_codes, d * bits // 8),
                         ("k_scale", k_scale, d), ("v_scale", v_scale, d // v_group)):
        if t.stride(-2) != row:
            raise ValueError(f"decode_attention: {name} {tuple(t.shape)} stride {t.stride()}: rows must be packed")
    gp = triton.next_power_of_2(groups)
    jb = blocks or max(1, min(4, 16 // gp))  # key blocks per step: fill the 16 MMA rows, at most 128 tokens
    step = jb * k_block
    if not num_warps:  # 8 warps for a 128 x 128 step tile, else 4 (offline sm_90: int4 GQA 4 at head_dim 128: 4.3
        # SASS instructions per code at 8 warps, 4.6 at 4; GQA 8 (64-token steps) 4.9 at 4, 6.9 at 8; head_dim 64
        # 5.3 at 4, 6.4 at 8)
        num_warps = 8 if step * d >= 128 * 128 else 4
    if split is None:
        split = default_split(s, b * hkv, step, target=waves * 132)
    split = max(step, triton.cdiv(split, step) * step)
    n_split = triton.cdiv(s, split)
    acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    kw, vw = k_codes.view(torch.int32), v_codes.view(torch.int32)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if natural is None:  # int4: 4.5 SASS instructions per code in pair order, 4.9 natural; int2 4.6 / 4.8, int8 4.6 / 4.9
        natural = bits != 4
    kptx, kcon = codes_asm_packed(bits, natural) if asm == 2 else dequant_asm(bits, scaled=False, natural=natural)
    vptx, vcon = dequant_asm(bits, natural=natural)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _split_kernel_tc[(b * hkv, n_split)](
        q, kw, k_scale, k_zero, vw, v_scale, v_zero, lo32, hi32, acc, m, den,
        q.stride(0), q.stride(1), kw.stride(0), kw.stride(1), k_scale.stride(0), k_scale.stride(1),
        vw.stride(0), vw.stride(1), v_scale.stride(0), v_scale.stride(1),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), qk_scale, split,
        HQ=hq, GROUPS=groups, GP=gp, JB=jb, RM=max(16, jb * gp), D=d, BITS=bits, K_BLOCK=k_block,
        V_GROUP=v_group, ASM=0 if interpret else int(asm), NAT=bool(natural), VT=bool(vt), ST=bool(st), KPTX=kptx, KCON=kcon, VPTX=vptx,
        VCON=vcon, num_warps=num_warps, **extra)
    return acc, m, den, n_split
