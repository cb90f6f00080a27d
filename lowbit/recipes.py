"""Named quantization recipes: pipeline texts a user picks with ``compile_model(..., recipe=...)`` or the CLI.

A recipe is nothing but pipeline text for ``lowbit.passes.manager.parse_pipeline``; ``lowbit recipes`` lists
them and ``get_recipe(name)`` returns the text. Recipes built on passes that are not registered yet (GPTQ, AWQ,
SmoothQuant, rotation) are listed, and ``get_recipe`` says which pass is missing instead of returning a
pipeline that would fail later.

About group 128 on SmolLM2: its hidden size 576 is 4.5 × 128, so q/k/v/gate/up (input 576) cannot use group
128; only down_proj (input 1536) can. ``w4a16-g128`` therefore uses group 128 where it divides the input size
and group 64 elsewhere (``group_fallback=64``), and the pass's stats record both. Plain ``group=128`` on such a
model is an error that says so.

Weight-only 4-bit recipes are asymmetric (zero points): SmolLM2's shipped weights are Q4_1 (asymmetric, block
32) dequantized, and asymmetric RTN tracks them better than symmetric at groups 64/128 and per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.passes.base import PassError, all_passes, closest

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_passes", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    name: str
    pipeline: str
    doc: str
    needs: tuple[str, ...] = field(default=())
    """Passes the pipeline uses, checked against the pass registry before the pipeline is handed out."""


_W8A8 = "quantize(w=int8,a=int8)"
# KV settings chosen on SmolLM2 wt2-512x40 (bench/results/accuracy_rtn_draft.json has the variants tried):
# keys per channel over 32-token blocks, values per token, the first token (attention sink) and each query's
# most recent tokens float.
_KV4 = "kv=int4,kv_group=32,kv_sink=1,kv_window=32"
_KV2 = "kv=int2,k_group=32,v_group=16,kv_sink=1,kv_window=64"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("w8a8", _W8A8,
           "int8 weights per output channel (symmetric RTN) + int8 activations per token (dynamic, symmetric)",
           ("quantize",)),
    Recipe("w8a8-g64", "quantize(w=int8,a=int8,a_group=64)",
           "w8a8 with one activation scale per 64 channels of each token (fine-grained dynamic scales, as "
           "DeepSeek-V3's 1x128 tiles): needs a GEMM that rescales per K-group", ("quantize",)),
    Recipe("w8a8-sq", "smooth-quant," + _W8A8,
           "SmoothQuant scale migration, then w8a8", ("smooth-quant", "quantize")),
    Recipe("fp8", "quantize(w=fp8e4m3,a=fp8e4m3)",
           "fp8 e4m3 weights per output channel + fp8 e4m3 activations per token (dynamic)", ("quantize",)),
    Recipe("w4a16-g64", "quantize(w=int4,group=64,sym=false)",
           "int4 weights, asymmetric, one scale/zero point per 64 inputs (RTN); activations float", ("quantize",)),
    Recipe("w4a16-g128", "quantize(w=int4,group=128,group_fallback=64,sym=false)",
           "int4 weights, asymmetric, group 128 where it divides the input size, else 64 (576 = 4.5 x 128)",
           ("quantize",)),
    Recipe("w4a16-pc", "quantize(w=int4,sym=false)",
           "int4 weights, asymmetric, one scale/zero point per output channel (RTN; an MSE-searched clipping "
           "range lowers the weight error but raised perplexity here)", ("quantize",)),
    Recipe("w4a8", "quantize(w=int4,group=64,sym=false,a=int8)",
           "int4 weights (asymmetric, group 64) + int8 activations per token (dynamic)", ("quantize",)),
    Recipe("kv4", f"quantize({_KV4})",
           "KV cache int4, asymmetric: keys (after rotary) per channel over 32-token blocks, values per token; "
           "the first token and each query's 32 most recent tokens float", ("quantize",)),
    Recipe("kv2", f"quantize({_KV2})",
           "KV cache int2 as KIVI: keys per channel over 32-token blocks, values per token in 16-channel groups, "
           "the first token and each query's 64 most recent tokens float", ("quantize",)),
    Recipe("w8a8kv4", f"quantize(w=int8,a=int8,{_KV4})", "w8a8 + kv4", ("quantize",)),
    Recipe("w8a8kv2", f"quantize(w=int8,a=int8,{_KV2})", "w8a8 + kv2", ("quantize",)),
    Recipe("w4a16-gptq", "gptq(w=int4,group=64,sym=false)",
           "GPTQ int4 weights, group 64 (Hessians from block-by-block calibration)", ("gptq",)),
    Recipe("w4a16-awq", "awq(w=int4,group=64,sym=false)",
           "AWQ activation-aware scales, then int4 group 64 weights", ("awq",)),
    Recipe("w4a4kv4", f"fold-norms,rotate,quantize(w=int4,a=int4,{_KV4})",
           "QuaRot-style: fold norms, Hadamard rotation, int4 weights/activations/KV", ("fold-norms", "rotate",
                                                                                         "quantize")),
)}


def list_recipes() -> dict[str, Recipe]:
    return dict(RECIPES)


def get_recipe(name: str) -> str:
    """The pipeline text of recipe ``name``; errors name unknown recipes and passes not registered yet."""
    if name not in RECIPES:
        raise PassError(f"unknown recipe {name!r}{closest(name, sorted(RECIPES))}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    registered = all_passes()
    missing = [p for p in r.needs if p not in registered]
    if missing:
        raise PassError(f"recipe {name!r} ({r.pipeline}) needs pass(es) {', '.join(missing)}, which lowbit does not "
                        f"have yet (registered: {', '.join(sorted(registered))})")
    return r.pipeline


def recipe_passes(name: str) -> list:  # type: ignore[type-arg]
    """The recipe parsed into pass objects."""
    from lowbit.passes.manager import parse_pipeline

    return parse_pipeline(get_recipe(name))
