"""``kv-cache``: a generating model's float KV cache becomes the packed quantized cache (``cache_attention``).

Why: ``quantize(kv=...)`` only models a quantized cache in prefill (a QDQ copy of K/V beside the float one);
generation needs the cache itself in its quantized form, so that decode reads 2-4x fewer bytes. On a step graph
(``compile_model(..., generation=...)``) each layer's ``scatter`` of the new keys/values into ``k_cache`` /
``v_cache`` and the ``attention`` over them become one ``cache_attention`` node over eight cache tensors
(``lowbit.ir.kvcache``: packed codes, scales and zeros for keys per channel over ``k_block``-token blocks and
values per token over ``v_group`` channels, plus the float attention sink and recent window). Its reference
(torch backend) writes the cache and attends over dequantize+float exactly as the accuracy model's mask does;
the Triton backend runs decode steps with the decode-attention kernel. An attention's float mask (Bloom's ALiBi
bias) becomes ``cache_attention``'s ``bias``, read by key position. The graph's cache inputs and outputs
change accordingly and ``graph.meta["generation"]["kv_cache"]`` records the layout ``lowbit.generate``
allocates.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lowbit.ir.graph import Graph, Node, Symbol, TensorType, Value
from lowbit.passes.base import Condition, Pass, PassError, PassOptions, PassResult, register_pass
from lowbit.passes.dce import eliminate_dead_code

PARTS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_float", "v_float")
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _not_step_graph(graph: Graph) -> list[str]:
    gen = graph.meta.get("generation")
    if not gen:
        return [f"graph {graph.name} is not a generation step graph (compile with generation=GenerationSpec(...))"]
    if gen.get("kv_cache"):
        return [f"graph {graph.name} already has a packed KV cache ({gen['kv_cache']['bits']}-bit)"]
    return [f"%{n.name} (attention) in module {n.module!r} has the quantize pass' kv accuracy model" for n in
            graph.nodes if n.op == "attention" and "qscheme_kv" in n.meta]


STEP_GRAPH = Condition("a step graph with a float KV cache", _not_step_graph)


class KVCacheOptions(PassOptions):
    bits: int = 4
    """Code width of keys and values: 8, 4 or 2."""
    k_block: int = Field(default=32, ge=1, le=1024)
    """Tokens per key scale block (keys: per channel over k_block tokens)."""
    v_group: int | None = Field(default=None, ge=1)
    """Channels per value scale group (values: per token); default 32 (int4/int8), 16 (int2), as kv4/kv2."""
    window: int | None = Field(default=None, ge=1)
    """Most recent tokens every query reads float; default 32 (int4/int8), 64 (int2), as kv4/kv2."""
    sink: int = Field(default=1, ge=0, le=64)
    """First tokens kept float for every query (the attention sink)."""
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """float32 is exactly the accuracy model; float16 makes a smaller cache."""

    @model_validator(mode="after")
    def _defaults(self) -> KVCacheOptions:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits={self.bits}: the packed cache stores 8, 4 or 2-bit codes")
        if self.v_group is None:
            self.v_group = 16 if self.bits == 2 else 32
        if self.window is None:
            self.window = 64 if self.bits == 2 else 32
        if self.window < self.k_block:
            raise ValueError(f"window={self.window} < k_block={self.k_block}: a key block is quantized once all its "
                             f"tokens are written, so queries must read the last k_block tokens float (raise "
                             f"window or lower k_block)")
        return self


@register_pass
class KVCache(Pass):
    """Turn a step graph's float KV cache into the packed quantized cache read by cache_attention."""

    name = "kv-cache"
    Options = KVCacheOptions
    exact = False
    requires = (STEP_GRAPH,)
    after = ("quantize", "gptq", "awq", "autoround", "smooth-quant", "fold-norms", "rotate")
    creates = ("cache_attention",)

    def undone_by(self, later: Pass) -> str | None:
        """A second kv-cache: the first packs the float cache, so the second finds none (its ``requires`` refused it
        when it ran, after the passes between them); said when the pipeline is parsed."""
        if later.name != self.name:
            return None
        return (f"the first packs the float KV cache into {self.options.bits}-bit codes (bits={self.options.bits}) "
                f"and leaves no float cache for the second (bits={later.options.bits}) to pack: keep one kv-cache, "
                "with the bits you want")

    def precheck(self, graph: Graph) -> None:
        """The step graph's sliding windows and head_dim against ``v_group``: the model's, which no earlier pass
        changes (head pruning drops heads, not their width), so ``quantize(...),kv-cache(bits=4)`` on 8-wide heads is
        refused before ``quantize`` calibrates, not after it. A graph that is no step graph is ``requires``'."""
        gen = graph.meta.get("generation")
        if gen and "head_dim" in gen and "max_length" in gen:
            self._check_attention(graph, gen)
            self._check_layout(gen)

    @staticmethod
    def _check_attention(graph: Graph, gen: dict[str, Any]) -> None:
        """A written-out attention, refused before any pass runs: Gemma 2's soft-capped logits keep its attention as
        matmul/tanh/softmax with no attention node for ``cache_attention`` to replace, which the pass found only when
        it ran, after calibration, and said as 'read by %unsqueeze_6'. (A sliding window is ``cache_attention``'s
        ``sliding``: it was refused here, which sent a Gemma 2 user to a max_length that then met the soft-capping.)"""
        users = graph.users()
        by_name = {v.name: v for v in graph.inputs}
        written_out = []
        for layer, name in enumerate(list(gen.get("cache_inputs") or [])[::2]):
            cache = by_name.get(name)
            scatters = [n for n in users.get(id(cache), []) if n.op == "aten.scatter.src"] if cache else []
            readers = [r for n in scatters for r in users.get(id(n.output), [])]
            if readers and not any(r.op == "attention" for r in readers):
                written_out.append((layer, next((r.module for r in readers if r.module), None)))
        if not written_out:
            return
        modules = {m for _, m in written_out}
        why = gen.get("attention_written_out")
        capped = why == "softcap" or (why is None and any(n.op == "aten.tanh.default" and n.module in modules
                                                          for n in graph.nodes))
        layer, module = written_out[0]
        one = len(written_out) == 1
        where = (f"layer {layer} (module {module!r})" if one else
                 f"layers {', '.join(str(i) for i, _ in written_out)} (module {module!r} and the others)")
        its = "its" if one else "their"
        if capped:
            lacks = "attention-logit soft-capping"
            what = (f"soft-cap{'s' if one else ''} {its} attention logits (tanh(scores / cap) * cap, Gemma 2's "
                    f"attn_logit_softcapping), so {its} attention is written out as matmul, tanh and softmax (SDPA "
                    "has no soft-cap)")
        elif why == "upcast":
            lacks = "float32 upcast of half-precision scores"
            what = (f"take{'s' if one else ''} {its} scores and softmax in float32 (GPT-2's reorder_and_upcast_attn "
                    "under eager attention; under attn_implementation='sdpa' transformers ignores it and so does the "
                    "step)")
        else:
            lacks, what = "written-out attention", f"compute{'s' if one else ''} {its} attention as separate ops"
        raise PassError(f"pass kv-cache: the packed cache's attention (cache_attention) has no {lacks}: {where} "
                        f"{what}, "
                        "with no attention node to replace. Generate with the float cache: leave kv-cache out of the "
                        "pipeline (the weights keep the rest of it)")

    def _check_layout(self, gen: dict[str, Any]) -> None:
        o: KVCacheOptions = self.options  # type: ignore[assignment]
        head_dim = gen["head_dim"]
        per = 8 // o.bits
        if head_dim % o.v_group or o.v_group % per:  # type: ignore[operator]
            fits = [g for g in range(per, head_dim + 1, per) if head_dim % g == 0]
            # the options validator fills the default in, so whether it was given is not known here
            picked = f" (bits={o.bits}'s default unless given)" if o.v_group == (16 if o.bits == 2 else 32) else ""
            if fits:
                hint = f"; give v_group={max(g for g in fits if g <= o.v_group) if min(fits) <= o.v_group else fits[0]}"
            else:  # no v_group can fit: the codes of one token's head vector do not fill whole bytes
                ok = [b for b in (8, 4, 2) if head_dim % (8 // b) == 0]
                hint = (f"; no v_group fits: head_dim {head_dim} is not a multiple of {per} ({o.bits}-bit codes pack "
                        f"{per} per byte), so use bits={' or bits='.join(map(str, ok))}")
            raise PassError(f"pass kv-cache: v_group={o.v_group}{picked} must divide head_dim {head_dim} and be a "
                            f"multiple of the {per} codes per byte{hint}")

    def run(self, graph: Graph) -> PassResult:
        o: KVCacheOptions = self.options  # type: ignore[assignment]
        gen = graph.meta["generation"]
        names = list(gen["cache_inputs"])
        head_dim = gen["head_dim"]
        self._check_attention(graph, gen)
        self._check_layout(gen)
        by_name = {v.name: v for v in graph.inputs}
        users = graph.users()
        positions = graph.inputs[1]
        scale_dtype = _SCALE_DTYPES[o.scale_dtype]
        blocks = f"kvb{o.k_block}"
        max_len = gen["max_length"]
        graph.symbols.setdefault(blocks, Symbol(blocks, 1, max(-(-max_len // o.k_block), 2), None))
        new_inputs: dict[str, list[Value]] = {}
        new_outputs: dict[int, list[Value]] = {}
        new_names: list[str] = []
        kw = dict(bits=o.bits, k_block=o.k_block, v_group=o.v_group, window=o.window, sink=o.sink)
        windows = list(gen.get("windows") or [])
        for layer in range(len(names) // 2):
            k_in, v_in = by_name[names[2 * layer]], by_name[names[2 * layer + 1]]
            k_sc, v_sc = self._scatter(graph, users, k_in), self._scatter(graph, users, v_in)
            att = self._attention(graph, users, k_sc, v_sc)
            t = k_in.tensor_type
            batch, kv_heads, slots = t.shape[0], t.shape[1], t.shape[2]  # per layer: head pruning may differ
            sym = graph.symbols.get(slots) if isinstance(slots, str) else None
            if sym is not None and sym.max is not None:  # the packed cache holds whole key blocks: max_length
                sym.max = max(sym.max, -(-max_len // o.k_block) * o.k_block)  # rounded up (48 -> 64 at k_block 32)
            types = {"k_codes": TensorType(torch.uint8, (batch, kv_heads, slots, head_dim * o.bits // 8)),
                     "k_scale": TensorType(scale_dtype, (batch, kv_heads, blocks, head_dim)),
                     "k_zero": TensorType(torch.uint8, (batch, kv_heads, blocks, head_dim)),
                     "v_codes": TensorType(torch.uint8, (batch, kv_heads, slots, head_dim * o.bits // 8)),
                     "v_scale": TensorType(scale_dtype, (batch, kv_heads, slots, head_dim // o.v_group)),
                     "v_zero": TensorType(torch.uint8, (batch, kv_heads, slots, head_dim // o.v_group)),
                     "k_float": TensorType(t.dtype, (batch, kv_heads, o.sink + o.window, head_dim)),
                     "v_float": TensorType(t.dtype, (batch, kv_heads, o.sink + o.window, head_dim))}
            ins = []
            for part in PARTS:
                name = graph.fresh_name(f"past_key_values_{layer}_{part}")
                graph._claim(name)
                ins.append(Value(name, types[part], kind="input"))
                new_names.append(name)
            new_inputs[k_in.name] = ins
            for cache in (k_in, v_in):  # sizes read off the cache (batch, heads, slots) come from the codes now
                for n in users.get(id(cache), []):
                    if n.op == "aten.sym_size.int":
                        if n.args[1] not in (0, 1, 2, -4, -3, -2):
                            raise PassError(f"pass kv-cache: %{n.name} reads dim {n.args[1]} of cache %{cache.name}; "
                                            "the packed cache keeps only batch, heads and slots")
                        n.args = (ins[0], *n.args[1:])
            new_inputs[v_in.name] = []
            scale = att.kwargs.get("scale")
            # the layer's sliding window, masked as the float step's attention masks it
            sliding = {"sliding": windows[layer]} if layer < len(windows) and windows[layer] is not None else {}
            bias = self._bias(att, slots)
            node = graph.make_node("cache_attention", [att.args[0], k_sc.args[3], v_sc.args[3], positions, *ins],
                                   {**kw, "scale": scale, **sliding, **bias}, name=f"cache_attention_{layer}",
                                   types=[att.output.type, *[types[p] for p in PARTS]], module=att.module)
            graph.insert_before(att, node)
            graph.replace_all_uses(att.output, node.outputs[0])
            outs = node.outputs[1:]
            for v, part in zip(outs, PARTS):
                graph.rename(v, f"present_{layer}_{part}")
            new_outputs[id(k_sc.output)] = outs
            new_outputs[id(v_sc.output)] = []
        graph.inputs = [x for v in graph.inputs for x in new_inputs.get(v.name, [v])]
        graph.outputs = [x for v in graph.outputs for x in new_outputs.get(id(v), [v])]
        nodes, _ = eliminate_dead_code(graph)
        layout = {"bits": o.bits, "k_block": o.k_block, "v_group": o.v_group, "window": o.window, "sink": o.sink,
                  "scale_dtype": o.scale_dtype, "parts": list(PARTS)}
        gen["kv_cache"] = layout
        gen["float_cache_inputs"] = names
        gen["cache_inputs"] = new_names
        stats: dict[str, Any] = {"layers": len(names) // 2, **layout, "nodes_removed": nodes}
        return PassResult(True, stats)

    @staticmethod
    def _bias(att: Node, slots: int | str) -> dict[str, Value]:
        """``cache_attention``'s ``bias``: the attention's float mask (Bloom's ALiBi over the cache slots), which
        it reads by key position; ``{}`` for a boolean one (the causal and sliding masks it computes itself). A
        float mask it cannot read by position, or ``is_causal``, is refused by name: replacing the attention would
        drop it and the packed cache would attend without it."""
        mask = att.arg(3, "mask")
        where = f"%{att.name} (attention) in module {att.module!r}"
        if att.kwargs.get("is_causal"):
            raise PassError(f"pass kv-cache: {where} is causal by is_causal (by row and column index), not by a "
                            "mask over positions, the one cache_attention computes instead")
        if not isinstance(mask, Value) or mask.tensor_type.dtype == torch.bool:
            return {}
        shape, q = mask.tensor_type.shape, att.args[0].tensor_type.shape
        if (len(shape) != 4 or shape[3] != slots or shape[0] not in (1, q[0]) or shape[1] not in (1, q[1])
                or shape[2] not in (1, q[2])):
            raise PassError(f"pass kv-cache: {where} adds a float mask {mask.type} that is not one bias per key "
                            f"position over the cache's {slots} slots (broadcast to the queries {q}), so "
                            "cache_attention cannot carry it; generate with the float cache: leave kv-cache out")
        return {"bias": mask}

    @staticmethod
    def _scatter(graph: Graph, users: dict[int, list[Node]], cache: Value) -> Node:
        readers = [n for n in users.get(id(cache), []) if n.op != "aten.sym_size.int"]
        if len(readers) != 1 or readers[0].op != "aten.scatter.src" or readers[0].args[0] is not cache:
            ops = ", ".join(f"%{n.name} ({n.op})" for n in readers) or "nothing"
            raise PassError(f"pass kv-cache: cache input %{cache.name} {cache.type} is read by {ops}; expected one "
                            "scatter of the new tokens (the CausalLMStep capture)")
        return readers[0]

    @staticmethod
    def _attention(graph: Graph, users: dict[int, list[Node]], k_sc: Node, v_sc: Node) -> Node:
        outs = {id(v) for v in graph.outputs}
        for sc in (k_sc, v_sc):
            rd = users.get(id(sc.output), [])
            if len(rd) != 1 or rd[0].op != "attention" or id(sc.output) not in outs:
                ops = ", ".join(f"%{n.name} ({n.op})" for n in rd) or "nothing"
                module = next((n.module for n in rd if n.module), None)
                written_out = rd and not any(n.op == "attention" for n in rd)
                raise PassError(f"pass kv-cache: the updated cache %{sc.output.name}"
                                + (f" (module {module!r})" if module else "") + f" is read by {ops}; expected one "
                                "attention (and the graph's outputs)"
                                + ("; this layer's attention is written out (matmuls and a softmax, as Gemma 2's "
                                   "soft-capped logits are: SDPA has no soft-cap), and the packed cache replaces an "
                                   "attention node, so this model generates with the float cache: leave kv-cache "
                                   "out" if written_out else ""))
        att = users[id(k_sc.output)][0]
        if att is not users[id(v_sc.output)][0] or att.args[1] is not k_sc.output or att.args[2] is not v_sc.output:
            raise PassError(f"pass kv-cache: %{k_sc.output.name} and %{v_sc.output.name} are not the keys and values "
                            f"of one attention (%{att.name} in module {att.module!r})")
        return att
