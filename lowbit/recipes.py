"""Named quantization recipes: pipeline texts a user picks with ``compile_model(..., recipe=...)`` or the CLI.

A recipe is nothing but pipeline text for ``lowbit.passes.manager.parse_pipeline``; ``lowbit recipes`` lists
them and ``get_recipe(name)`` returns the text (``generation=True``: the pipeline a generation step graph runs,
where the KV accuracy model becomes the packed cache). Every pass the recipe's pipelines name is checked against
the pass registry first: should one be missing from this install, ``get_recipe`` names it instead of returning a
pipeline that would fail later with "unknown pass".

About group 128 on SmolLM2: its hidden size 576 is 4.5 × 128, so q/k/v/gate/up (input 576) cannot use group
128; only down_proj (input 1536) can. ``w4a16-g128`` therefore uses group 128 where it divides the input size
and group 64 elsewhere (``group_fallback=64``), and the pass's stats record both. Plain ``group=128`` on such a
model is an error that says so.

Weight-only 4-bit recipes are asymmetric (zero points): SmolLM2's shipped weights are Q4_1 (asymmetric, block
32) dequantized, and asymmetric RTN tracks them better than symmetric at groups 64/128 and per channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbit.passes.base import CalibrationOptions, Pass, PassError, all_passes, closest

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_passes", "list_recipes", "override_options"]


@dataclass(frozen=True)
class Recipe:
    name: str
    pipeline: str
    doc: str
    needs: tuple[str, ...] = field(default=())
    """Passes the pipeline uses, checked against the pass registry before the pipeline is handed out."""
    generation: str | None = None
    """The pipeline a generation step graph runs (``compile_model(generation=...)``, ``lowbit generate``), where it
    differs: a KV cache quantized in the accuracy model (``quantize(kv=...)``, prefill only) becomes the packed cache
    of the same layout (``kv-cache``)."""


_W8A8 = "quantize(w=int8,a=int8)"
# SmoothQuant with alpha searched per site; require_sites=false lets the recipe run on post-norm encoders
# (MiniLM), where there is no place to fold the scales and W8A8 alone is already within goal
_SQ = "smooth-quant(search=true,require_sites=false)"
# KV settings chosen on SmolLM2 wt2-512x40 (bench/results/accuracy_rtn_draft.json has the variants tried):
# keys per channel over 32-token blocks, values per token in 32-channel groups (kv_group sets both), the first
# token (attention sink) and each query's most recent tokens float.
_KV4 = "kv=int4,kv_group=32,kv_sink=1,kv_window=32"
# QuaRot's KV cache: one scale and zero point per token per head (the whole head_dim: 64 on SmolLM2; kv_group=64
# was per 64 channels on a head_dim-128 model and refused head_dims 64 does not divide), no float window
_KV4_HEAD = "kv=int4,k_gran=per_token,v_gran=per_token,kv_group=none"
_KV2 = "kv=int2,k_group=32,v_group=16,kv_sink=1,kv_window=64"
# GPTQ settings chosen on SmolLM2 (bench/results/accuracy.json, GPU rows): AWQ scales and clipping first, then
# GPTQ with act-order and static groups, light damping
_GPTQ_G64 = "gptq(w=int4,group=64,sym=false,awq=true,clip=true,damp=0.001,n_grid=40)"
# AutoRound from AWQ's start: the best group-64 int4 weights measured (H100 rows of accuracy.json)
_AUTOROUND_G64 = "autoround(w=int4,group=64,sym=false,awq=true,clip=true)"

# End-to-end scale tuning after the rotation and GPTQ (bench_rotation's *-e2e rows, H200): KL to the float logits
# on the whole shipped validation split, 8 windows held out for early stopping; a GPU step (device=cuda)
def _e2e(tokens: int = 2_000_000, lr: str = "2e-5") -> str:
    return (f"tune-qparams(calib=wikitext2-valid,calib_n=512,holdout=8,random_offsets=true,tokens={tokens},"
            f"batch_size=16,lr={lr},schedule=cosine,warmup=0.05,eval_every=25,dtype=bfloat16)")


_E2E = _e2e()
_ROT_GPTQ_G64 = "fold-norms,rotate,gptq(w=int4,group=64,sym=false,clip=true,damp=0.001,calib_n=120)"

# Measured ratios quoted below: SmolLM2-135M wt2-512x40 perplexity over float, 128 x 512 calibration tokens
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("w8a8", f"{_SQ},{_W8A8}",
           "SmoothQuant (alpha searched per site) + int8 weights per output channel + int8 activations per token "
           "(dynamic, symmetric); SmolLM2 1.008x", ("smooth-quant", "quantize")),
    Recipe("w8a8-rtn", _W8A8, "w8a8 without SmoothQuant (no calibration); SmolLM2 1.032x", ("quantize",)),
    Recipe("w8a8-g64", "quantize(w=int8,a=int8,a_group=64)",
           "w8a8 with one activation scale per 64 channels of each token (fine-grained dynamic scales, as "
           "DeepSeek-V3's 1x128 tiles): needs a GEMM that rescales per K-group; SmolLM2 1.005x", ("quantize",)),
    Recipe("w8a8-sq", "smooth-quant," + _W8A8,
           "SmoothQuant with a fixed alpha 0.5, then w8a8; SmolLM2 1.017x", ("smooth-quant", "quantize")),
    Recipe("fp8", f"{_SQ},gptq(w=fp8e4m3,group=64),quantize(a=fp8e4m3,a_group=64)",
           "SmoothQuant, fp8 e4m3 weights by GPTQ onto the fp8 grid (one scale per 64 inputs), fp8 e4m3 activations "
           "with one scale per 64 channels of each token (dynamic); SmolLM2 1.008x (wt2-2048-full 1.012x)",
           ("smooth-quant", "gptq", "quantize")),
    Recipe("fp8-rtn", "quantize(w=fp8e4m3,a=fp8e4m3)",
           "fp8 e4m3 weights per output channel + fp8 e4m3 activations per token (dynamic), no calibration; "
           "SmolLM2 1.038x", ("quantize",)),
    Recipe("fp8-block", f"{_SQ},quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)",
           "SmoothQuant + fp8 e4m3 with one scale per 64 inputs for weights and per 64 channels of each token for "
           "activations (block-scaled FP8); SmolLM2 1.018x", ("smooth-quant", "quantize")),
    Recipe("fp8-block128", "quantize(w=fp8e4m3,block=128,a=fp8e4m3,a_group=128)",
           "compressed-tensors' FP8_BLOCK layout (DeepSeek-V3's; what vLLM/SGLang serve): fp8 e4m3 weights with one "
           "scale per 128 x 128 tile (RTN, edge tiles partial), fp8 e4m3 activations with one scale per 128 channels "
           "of each token (dynamic); no calibration; SmolLM2 1.031x on wt2-512x8 (fp8 RTN groups of 64 on both sides "
           "1.017x, fp8-block 1.014x there)", ("quantize",)),
    Recipe("w4a16-g64", "quantize(w=int4,group=64,sym=false)",
           "int4 weights, asymmetric, one scale/zero point per 64 inputs (RTN); activations float; SmolLM2 1.327x",
           ("quantize",)),
    Recipe("w4a16-g128", "quantize(w=int4,group=128,group_fallback=64,sym=false)",
           "int4 weights, asymmetric, group 128 where it divides the input size, else 64 (576 = 4.5 x 128); "
           "SmolLM2 1.311x", ("quantize",)),
    Recipe("w4a16-pc", "quantize(w=int4,sym=false)",
           "int4 weights, asymmetric, one scale/zero point per output channel (RTN); SmolLM2 1.719x", ("quantize",)),
    Recipe("w4a16-pc-gptq", "gptq(w=int4,sym=false,awq=true,clip=true)",
           "per-channel int4 weights by AWQ scales + clipping + GPTQ; SmolLM2 1.211x", ("gptq",)),
    Recipe("w4a8", f"{_SQ},{_GPTQ_G64},quantize(a=int8)",
           "SmoothQuant, then int4 weights (group 64, AWQ + GPTQ), then int8 activations per token (dynamic); "
           "SmolLM2 1.114x", ("smooth-quant", "gptq", "quantize")),
    Recipe("w4a8-autoround", f"{_SQ},{_AUTOROUND_G64},quantize(a=int8)",
           "SmoothQuant, int4 group 64 weights by AutoRound (from AWQ's scales and clipping), int8 activations per "
           "token; a GPU recipe (device=cuda); SmolLM2 1.063x", ("smooth-quant", "autoround", "quantize")),
    Recipe("w4a8-rtn", "quantize(w=int4,group=64,sym=false,a=int8)",
           "int4 weights (asymmetric, group 64, RTN) + int8 activations per token (dynamic); SmolLM2 1.372x",
           ("quantize",)),
    Recipe("kv4", f"quantize({_KV4})",
           "KV cache int4, asymmetric: keys (after rotary) per channel over 32-token blocks, values per token in "
           "32-channel groups; "
           "the first token and each query's 32 most recent tokens float", ("quantize",),
           generation="kv-cache(bits=4)"),
    Recipe("kv2", f"quantize({_KV2})",
           "KV cache int2 as KIVI: keys per channel over 32-token blocks, values per token in 16-channel groups, "
           "the first token and each query's 64 most recent tokens float", ("quantize",),
           generation="kv-cache(bits=2)"),
    Recipe("w8a8kv4", f"{_SQ},quantize(w=int8,a=int8,{_KV4})", "w8a8 (with SmoothQuant) + kv4; SmolLM2 1.011x",
           ("smooth-quant", "quantize"), generation=f"{_SQ},{_W8A8},kv-cache(bits=4)"),
    Recipe("w8a8kv2", f"{_SQ},quantize(w=int8,a=int8,{_KV2})",
           "w8a8 (with SmoothQuant) + kv2; SmolLM2 1.100x on an H100, 1.104x on CPU (1.125x / 1.134x without "
           "SmoothQuant)",
           ("smooth-quant", "quantize"), generation=f"{_SQ},{_W8A8},kv-cache(bits=2)"),
    Recipe("w4a16-gptq", _GPTQ_G64,
           "int4 weights, group 64: AWQ scales and clipping, then GPTQ (act-order, static groups, damp 0.001); "
           "SmolLM2 1.082x (plain GPTQ 1.159x)", ("gptq",)),
    Recipe("w4a16-autoround", _AUTOROUND_G64,
           "int4 weights, group 64: AWQ scales and clipping, then AutoRound block tuning (200 signed-gradient steps "
           "per block against the float model's block output); a GPU recipe: add device=cuda (minutes per block on a "
           "CPU); SmolLM2 1.050x (wt2-2048-full 1.061x)", ("autoround",)),
    Recipe("w4a16-e2e", f"{_ROT_GPTQ_G64},{_e2e(4_000_000, '5e-5')}",
           "int4 weights, group 64: fold-norms + Hadamard rotation, GPTQ on the output-aware clipped grid, then the "
           "group scales distilled end to end toward the float logits (tune-qparams, 4M tokens at lr 5e-5, codes "
           "fixed); a GPU recipe (add device=cuda to gptq and tune-qparams; ~330 s on an H200, ~30 tokens/s on a "
           "CPU); SmolLM2 1.038x (2M tokens at lr 2e-5: 1.042x)",
           ("fold-norms", "rotate", "gptq", "tune-qparams")),
    Recipe("w4a8-e2e", f"{_ROT_GPTQ_G64},quantize(a=int8),{_E2E}",
           "w4a16-e2e with int8 activations per token, in the tuning's forward (straight-through); a GPU recipe; "
           "SmolLM2 1.041x", ("fold-norms", "rotate", "gptq", "quantize", "tune-qparams")),
    Recipe("w4a16-awq", "awq(w=int4,group=64,sym=false)",
           "AWQ activation-aware scales + clipping search, then int4 group 64 weights (RTN); SmolLM2 1.163x",
           ("awq",)),
    Recipe("w4a4kv4", f"fold-norms,rotate,gptq(w=int4,sym=false),quantize(a=int4,{_KV4_HEAD})",
           "QuaRot-style: fold norms, randomised Hadamard on the residual stream and per head, online Hadamards "
           "before down_proj and on q/k after rotary, GPTQ int4 weights per channel, int4 activations per token, "
           "int4 KV cache per token per head (asymmetric); SmolLM2 2.80x on 8 windows (wt2-512x8, GPTQ on 16x512 "
           "tokens; 577x without rotation)", ("fold-norms", "rotate", "gptq", "quantize")),
    Recipe("w4a4kv4-kurtail",
           f"fold-norms,rotate(kind=kurtosis,moment=16),gptq(w=int4,sym=false),quantize(a=int4,{_KV4_HEAD})",
           "w4a4kv4 with a KurTail-learned residual rotation (R1 from the randomised Hadamard, learned on 8x512 "
           "calibration tokens, ~60 s on a CPU) on the order-16 tail ratio of the normalised residual streams "
           "(moment=16: nearer the max/rms a per-token A4 scale pays than kurtosis is); SmolLM2 on wt2-512x40 (GPTQ "
           "on 16x512 tokens), seeds 0/1/2: 2.41x/2.43x/2.55x vs QuaRot's 2.83x/2.83x/2.79x (kurtosis' R1: 2.72x at "
           "seed 0; 2.58x/2.76x at seeds 1/2 with GPTQ on 32x512)", ("fold-norms", "rotate", "gptq", "quantize")),
    Recipe("w4a4kv4-kurtail-r2",
           "fold-norms,rotate(kind=kurtosis,moment=16,learn_heads=true,calib_n=120,samples=7680,steps=400,"
           f"lr_schedule=cosine),gptq(w=int4,sym=false),quantize(a=int4,{_KV4_HEAD})",
           "w4a4kv4-kurtail with each layer's head rotation R2 learned too, on 120 calibration sequences (7680 "
           "tokens kept per site), 400 steps with the step decayed on a cosine: the KurTail configuration measured "
           "best; SmolLM2 on wt2-512x40 (measured with GPTQ on 32x512 tokens, an H100), seeds 0/1/2: "
           "2.31x/2.37x/2.30x, mean 0.843x of QuaRot's perplexity (w4a4kv4-kurtail's R1 alone: 0.878x). Learning "
           "takes ~10 s on an H100 (rotate(device=cuda), e.g. --set rotate.device=cuda), the rotate pass 242 s on "
           "an idle 2-core CPU (each layer's R2 learned as calibration passes it)",
           ("fold-norms", "rotate", "gptq", "quantize")),
    Recipe("w4a4kv4-best", "fold-norms,rotate(kind=kurtosis,moment=16),quantize(a=int4,a_clip=0.9),"
           f"gptq(w=int4,sym=false,clip=true),quantize({_KV4_HEAD}),clip-activations",
           "lowbit's best W4A4KV4: a residual rotation learned KurTail's way on the order-16 tail ratio (moment=16, "
           "nearer what the per-token A4 scale pays than kurtosis); the int4 activations (clipped to 0.9) in place "
           "before GPTQ, so GPTQ calibrates on the inputs the model will see, on the output-aware clipped weight grid; "
           "then the KV4 cache and each dynamic A4 quantizer's clip ratio searched on calibration text by the error "
           "it adds to its readers' outputs (clip-activations); SmolLM2 1.79x on wt2-512x40 (GPTQ on 16x512 tokens; "
           "with kurtosis' R1 1.85x, QuaRot + GPTQ 2.83x); a clipped QDQ is not fused into qlinear (the "
           "torch backend runs it as QDQ, ONNX scales the clipped range the same way) and has no HF-checkpoint field "
           "(save format=lowbit)", ("fold-norms", "rotate", "quantize", "gptq", "clip-activations")),
    Recipe("w4a4kv4-e2e", "fold-norms,rotate(kind=kurtosis),quantize(a=int4,a_clip=0.9),"
           f"gptq(w=int4,sym=false,clip=true),quantize({_KV4_HEAD}),clip-activations,{_e2e(2_000_000, '5e-5')}",
           "w4a4kv4-best with kurtosis' R1 (moment 4, as measured), then its weight scales, norm gains and biases "
           "distilled end to end toward the float logits "
           "through the A4 and KV4 rounding (tune-qparams, straight-through, 2M tokens at lr 5e-5, codes fixed); a "
           "GPU recipe (device=cuda on the calibrating passes; 154 s of tuning on an H200); SmolLM2 1.303x on "
           "wt2-512x40 (GPTQ on 16x512 tokens; that start alone 1.90x in the same GPU setup)",
           ("fold-norms", "rotate", "quantize", "gptq", "clip-activations", "tune-qparams")),
    Recipe("sparse24", "sparsify(method=sparsegpt,pattern=2:4,calib=wikitext2-valid,calib_n=534,refit=block,"
           "refit_iters=134)",
           "2:4 sparsity by SparseGPT on every window of the shipped validation split, then each block's kept weights "
           "refitted toward the float block's output (masks fixed); a GPU recipe (device=cuda); SmolLM2 1.917x "
           "(2.846x without the refit)", ("sparsify",)),
    Recipe("sparse24-learned", "sparsify(method=learned,pattern=2:4,learn_steps=48,learn_rho_growth=1.12,"
           "learn_refit=100,calib=wikitext2-valid,calib_n=534,refit=block,refit_iters=134)",
           "2:4 sparsity with masks learned per linear (ProxSparse-style ADMM), then the block refit; a GPU recipe "
           "(device=cuda); SmolLM2 1.772x (2.165x without the refit)", ("sparsify",)),
    Recipe("sparse50", "sparsify(method=learned,sparsity=0.5,learn_steps=48,learn_rho_growth=1.12,learn_refit=100,"
           "calib=wikitext2-valid,calib_n=256)",
           "50% unstructured sparsity, masks and kept weights learned per linear; SmolLM2 1.476x (1971 s on a 2-core "
           "CPU)", ("sparsify",)),
    # TensorRT-ready (0 check_tensorrt_qdq errors on their ONNX, bench_onnx's trt-* rows): TensorRT's explicit
    # quantization takes symmetric weights (INT4 in blocks of 64/128, INT8/FP8 per channel) and static per-tensor
    # activations; every other recipe breaks one of those rules, so `-b tensorrt -r w4a16-g64` had nothing to turn to
    Recipe("trt-w4a16", "quantize(w=int4,group=64,sym=true)",
           "TensorRT-ready int4 weight-only: symmetric (TensorRT's INT4 has no zero point), blocks of 64 (RTN); "
           "activations float; SmolLM2 1.430x (bench_onnx's windows)", ("quantize",)),
    Recipe("trt-w8a8", "smooth-quant,quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor)",
           "TensorRT-ready W8A8: SmoothQuant, int8 weights per output channel, int8 activations with one calibrated "
           "(static) scale per tensor; SmolLM2 1.331x (bench_onnx's windows, 16 x 512 calibration tokens)",
           ("smooth-quant", "quantize")),
    Recipe("trt-fp8", "quantize(w=fp8e4m3,a=fp8e4m3,a_static=true,a_gran=per_tensor)",
           "TensorRT-ready FP8: fp8 e4m3 weights per output channel, fp8 e4m3 activations with one calibrated (static) "
           "scale per tensor; SmolLM2 perplexity 31.52 on 8 x 512 WikiText-2 test tokens", ("quantize",)),
    Recipe("w4a4kv4-rtn", f"fold-norms,rotate,quantize(w=int4,sym=false,a=int4,{_KV4_HEAD})",
           "w4a4kv4 without calibration (RTN weights); SmolLM2 9.40x on wt2-512x8 (508x without rotation)",
           ("fold-norms", "rotate", "quantize")),
)}


def list_recipes() -> dict[str, Recipe]:
    return dict(RECIPES)


def get_recipe(name: str, generation: bool = False) -> str:
    """The pipeline text of recipe ``name`` (``generation``: the one a generation step graph runs, where the recipe
    has one); errors name unknown recipes and passes not registered yet."""
    if name not in RECIPES:
        raise PassError(f"unknown recipe {name!r}{closest(name, sorted(RECIPES))}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    registered = all_passes()
    from lowbit.passes.manager import pipeline_pass_names

    # every pass the pipelines name, not only ``needs`` (written by hand: one missing from it went unchecked)
    named = [*r.needs, *pipeline_pass_names(r.pipeline), *pipeline_pass_names(r.generation or "")]
    missing = list(dict.fromkeys(p for p in named if p not in registered))
    if missing:
        raise PassError(f"recipe {name!r} ({r.pipeline}) needs pass(es) {', '.join(missing)}, which lowbit does not "
                        f"have yet (registered: {', '.join(sorted(registered))})")
    return r.generation if generation and r.generation is not None else r.pipeline


def generation_recipes() -> list[str]:
    """The recipes whose KV cache generation quantizes too (a ``generation`` pipeline with ``kv-cache``)."""
    return [r.name for r in RECIPES.values() if r.generation is not None and "kv-cache" in r.generation]


def recipe_passes(name: str, overrides: Mapping[str, Any] | None = None, generation: bool = False) -> list[Pass]:
    """The recipe parsed into pass objects (``generation``: its generation pipeline), with ``overrides`` applied
    (``override_options``)."""
    from lowbit.passes.manager import parse_pipeline

    passes = parse_pipeline(get_recipe(name, generation))
    return override_options(name, passes, overrides) if overrides else passes


def _unread_refusal(exc: PassError, option: str) -> bool:
    """Whether ``exc`` is ``PassOptions.refuse_unread``'s refusal of ``option`` (set, but left unread by the pass's
    other options), rather than a bad value."""
    text = str(exc)
    return f"option {option}=" in text and "is read only with" in text


def override_options(recipe: str, passes: Sequence[Pass], overrides: Mapping[str, Any]) -> list[Pass]:
    """``passes`` (recipe ``recipe``'s) with options replaced: ``{"group": 32}`` sets ``group`` on the pass of the
    recipe that has that option (any other option more than one pass has is refused as ambiguous, naming them); a
    calibration option sets it on every calibrating pass that reads it as the recipe configures it (they share the
    calibration data; ``{"calib_n": 16}`` on ``w8a8`` changes smooth-quant's, not quantize's, which reads it only
    with static activations; if no pass reads it, the refusal says what would); ``{"gptq.calib_n": 64}`` sets it
    on the ``gptq`` pass only, whatever comes before or after it (``{"calib_n": 16, "gptq.calib_n": 64}``: gptq
    64, the other calibrating passes 16) (on the passes of that name that read it, where the recipe runs several:
    ``quantize.a_clip`` on ``w4a4kv4-best`` sets the activation quantize's). Each changed pass is built
    again from the options the recipe set plus the override, so a value is validated as pipeline text is (a string,
    the CLI's ``--set KEY=VALUE``, is read as pipeline text reads it). A key no pass of the recipe takes is a
    ``PassError`` listing the options its passes have; a bad value names the pass and the option."""
    from lowbit.passes.manager import _parse_value, build_pass, check_input_files, check_order

    if not isinstance(overrides, Mapping):
        raise PassError(f"overrides= takes a dict of option -> value (e.g. {{'group': 32, 'gptq.calib_n': 64}}), "
                        f"got {type(overrides).__name__}")
    out = list(passes)
    names = list(dict.fromkeys(p.name for p in out))
    parsed: dict[tuple[str, str], tuple[str, Any]] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key.strip():
            raise PassError(f"recipe {recipe!r}: override key {key!r} is not an option name (OPTION or PASS.OPTION)")
        pass_name, _, option = key.strip().rpartition(".")
        where = (pass_name.strip(), option.strip().replace("-", "_"))
        if where in parsed:  # calib-n and calib_n: one of the two would silently win
            raise PassError(f"recipe {recipe!r}: overrides {parsed[where][0]!r} and {key!r} set the same option; "
                            "give it once")
        parsed[where] = (key, value)
    # the bare OPTION first, then PASS.OPTION: {"gptq.calib_n": 64, "calib_n": 16} gave gptq 16, the bare key
    # replacing the named one because it came later; the pass a user names keeps its value whatever the order
    for (pass_name, option), (key, value) in sorted(parsed.items(), key=lambda item: bool(item[0][0])):
        if pass_name and pass_name not in names:
            raise PassError(f"recipe {recipe!r}: override {key!r} names pass {pass_name!r}, which the recipe does not "
                            f"run{closest(pass_name, names)}; its passes: {', '.join(names)}")
        scope = [i for i, p in enumerate(out) if not pass_name or p.name == pass_name]
        targets = [i for i in scope if option in out[i].Options.model_fields]
        if not targets:
            known = sorted({f for i in scope for f in out[i].Options.model_fields})
            listed = "; ".join(f"{n}: {', '.join(sorted(type(p).Options.model_fields)) or 'none'}"
                               for n, p in {p.name: p for p in (out[i] for i in scope)}.items())
            raise PassError(f"recipe {recipe!r}: override {key!r}: no pass {'' if pass_name else 'of the recipe '}"
                            f"{pass_name + ' ' if pass_name else ''}has option {option!r}{closest(option, known)}. "
                            f"Options: {listed}")
        owners = list(dict.fromkeys(out[i].name for i in targets))
        if not pass_name and len(owners) > 1 and option not in CalibrationOptions.model_fields:
            # one name, different meanings (rotate's lr is not tune-qparams' lr; fp8's gptq group is the weights',
            # quantize's the activations'): setting it on all of them was rarely what was meant
            raise PassError(f"recipe {recipe!r}: override {key!r} is ambiguous: passes {', '.join(owners)} all have "
                            f"option {option!r}; name the pass: "
                            f"{' or '.join(repr(f'{n}.{option}') for n in owners)} (CLI: --set PASS.{option}=VALUE)")
        built: dict[int, Pass] = {}
        unread: list[PassError] = []
        for i in targets:
            p = out[i]
            options = {k: getattr(p.options, k) for k in p.options.model_fields_set}
            options[option] = _parse_value(value) if isinstance(value, str) else value
            try:
                built[i] = build_pass(type(p), options)
            except PassError as exc:
                # a pass whose other options leave the option unread (w8a8's quantize has calib_n, read only with
                # a_static=true; w4a4kv4-best's second quantize, the KV one, has a_clip): the override is for the
                # passes that read it, so this one keeps its own. Named PASS.OPTION too: w4a4kv4-best runs two
                # quantize passes and quantize.a_clip is for the one with a=. Read by none: refused below
                if not _unread_refusal(exc, option):
                    raise
                unread.append(exc)
        if not built:  # no pass of the recipe reads it as configured: the refusal says what would make it read
            raise unread[0]
        for i, p in built.items():
            out[i] = p
    check_order(out)
    check_input_files(out)  # a calib= override naming a file that is not there: PassFileError, before any load
    return out
