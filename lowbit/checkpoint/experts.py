"""Mixture-of-experts tensor names between lowbit's dense experts and an HF checkpoint.

A graph captured through ``lowbit.models.DenseExperts`` holds each expert's projections as linears
``...experts.expert_<e>.gate_proj/up_proj/down_proj``; transformers 5.25's model holds fused ``experts.gate_up_proj
[E, 2I, H]`` / ``experts.down_proj [E, H, I]``, and the family's original checkpoints hold what its conversion mapping
(``transformers.conversion_mapping``) merges at load: Mixtral's ``block_sparse_moe.experts.<e>.w1/w3/w2``,
Qwen2/3-MoE's and OLMoE's ``mlp.experts.<e>.gate_proj/...``, GraniteMoE's fused ``block_sparse_moe.input_linear``.

The names are not tabled here: they are read off transformers' own reverse mapping (``revert_weight_conversion``,
what ``save_pretrained`` writes), run once on marker tensors whose values say which slice of which tensor each
written tensor holds. So a float or quantized expert is written under the name ``from_pretrained`` (and vLLM) reads,
for each family transformers converts, and a family whose checkpoints keep the experts fused (GraniteMoE) is found
by the same run: its slices have no name of their own.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lowbit.checkpoint.files import CheckpointError

if TYPE_CHECKING:
    from lowbit.checkpoint.graph_view import HFView

__all__ = ["ExpertNames", "expert_names", "name_as_checkpoint"]

_FUSED = re.compile(r"^(.*\bexperts)\.(gate_up_proj|down_proj)$")


def slice_key(experts: str, expert: int, projection: str) -> str:
    """The graph's name of one expert projection's weight (``lowbit.models.DENSE_EXPERT_PARAM``)."""
    return f"{experts}.expert_{expert}.{projection}_proj.weight"


@dataclass
class ExpertNames:
    """How an HF model's tensors are named in its checkpoint, with the fused experts seen as lowbit's slices.

    ``slice_shapes``: every expert slice's key (``slice_key``) -> its ``[out, in]`` shape; ``fused``: experts module
    -> ``(E, I, H)``; ``to_checkpoint``: a model key or slice key -> the checkpoint key holding exactly it (a slice of
    a family whose checkpoints keep the experts fused has none)."""

    slice_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    fused: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    to_checkpoint: dict[str, str] = field(default_factory=dict)

    def sliced_keys(self, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """``keys`` (model key -> shape) with each fused experts tensor replaced by its slices' keys: the names the
        graph's parameters have, which ``hf_view`` maps."""
        fused = {f"{m}.{t}" for m in self.fused for t in ("gate_up_proj", "down_proj")}
        return {**{k: s for k, s in keys.items() if k not in fused}, **self.slice_shapes}

    def unnamed_slices(self) -> list[str]:
        """Experts modules whose slices have no checkpoint name of their own (the family stores them fused)."""
        return sorted({m for m in self.fused if slice_key(m, 0, "gate") not in self.to_checkpoint})

    def module_to_checkpoint(self, module: str) -> str:
        """A linear's checkpoint module name (its weight key's, less ``.weight``)."""
        return self.to_checkpoint.get(f"{module}.weight", f"{module}.weight").removesuffix(".weight")

    def slice_modules(self) -> dict[str, tuple[int, int]]:
        """Each expert projection's linear module as the graph names it -> its weight's ``[out, in]``."""
        return {key.removesuffix(".weight"): shape for key, shape in self.slice_shapes.items()}

    def graph_named(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors under the graph's names: a key ``to_checkpoint`` maps, else a quantized linear's
        companion (``<module>.weight_packed``, ``.weight_scale``, ...) under its linear's graph name."""
        keys = {ckpt: key for key, ckpt in self.to_checkpoint.items()}
        modules = {ckpt.removesuffix(".weight"): key.removesuffix(".weight") for ckpt, key in keys.items()
                   if ckpt.endswith(".weight")}
        out = {}
        for name, t in tensors.items():
            module, _, leaf = name.rpartition(".")
            out[keys.get(name) or (f"{modules[module]}.{leaf}" if module in modules else name)] = t
        return out

    def fused_state(self, float_state: dict[str, torch.Tensor], quantized: set[str],
                    placeholders: dict[str, torch.Size]) -> None:
        """Put each fused experts tensor the model loads into ``float_state`` (its float slices, taken out of it, in
        their rows and zeros in the quantized ones' rows, whose codes replace them after capture) or, every slice
        quantized, into ``placeholders`` (its shape: no memory held). ``quantized``: the graph's quantized linears."""
        for experts, (n_experts, inner, hidden) in self.fused.items():
            for fused, projections, shape in (("gate_up_proj", ("gate", "up"), (n_experts, 2 * inner, hidden)),
                                              ("down_proj", ("down",), (n_experts, hidden, inner))):
                key = f"{experts}.{fused}"
                slices = [slice_key(experts, e, p) for e in range(n_experts) for p in projections]
                if key in float_state or not slices:  # stored fused (GraniteMoE's float experts)
                    continue
                if all(s.removesuffix(".weight") in quantized for s in slices):
                    placeholders[key] = torch.Size(shape)
                    continue
                stored = [float_state[s] for s in slices if s in float_state]
                whole = torch.zeros(shape, dtype=stored[0].dtype if stored else torch.float32)
                rows = whole.view(n_experts, len(projections), -1, whole.shape[-1])  # [E, proj, out, in]
                for i, s in enumerate(slices):
                    if s in float_state:
                        rows[i // len(projections), i % len(projections)].copy_(float_state.pop(s))
                    elif s.removesuffix(".weight") not in quantized:
                        raise CheckpointError(f"the checkpoint has no tensor for expert projection {s!r} (of "
                                              f"{key!r}), float or quantized")
                float_state[key] = whole


def expert_names(model: torch.nn.Module, keys: dict[str, tuple[int, ...]]) -> ExpertNames:
    """The checkpoint names of ``model``'s tensors (``keys``: its state dict's names and shapes; the model may be on
    meta: only its class and config are read), from transformers' reverse conversion run on marker tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    names = ExpertNames()
    for key, shape in keys.items():
        found = _FUSED.match(key)
        if found and len(shape) == 3 and found[2] == "gate_up_proj" and f"{found[1]}.down_proj" in keys:
            n_experts, rows, hidden = shape
            names.fused[found[1]] = (n_experts, rows // 2, hidden)
    markers: dict[str, torch.Tensor] = {}
    meaning: dict[int, str] = {}  # marker value -> the model key or slice key it stands for

    def mark(name: str) -> float:
        meaning[len(meaning) + 1] = name
        return float(len(meaning))

    for key in keys:
        found = _FUSED.match(key)
        if found and found[1] in names.fused:
            n_experts, inner, hidden = names.fused[found[1]]
            projections = ("gate", "up") if found[2] == "gate_up_proj" else ("down",)
            # one marker row per (expert, projection): Chunk/SplitModulelist move whole rows, as they move slices
            markers[key] = torch.tensor([[[mark(slice_key(found[1], e, p))] for p in projections]
                                         for e in range(n_experts)], dtype=torch.float64)
            for e in range(n_experts):
                for p in projections:
                    names.slice_shapes[slice_key(found[1], e, p)] = (hidden, inner) if p == "down" else (inner, hidden)
        else:
            markers[key] = torch.tensor([mark(key)], dtype=torch.float64)
    for ckpt_key, tensor in revert_weight_conversion(model, markers).items():
        held = [meaning[int(v)] for v in tensor.flatten().tolist()]
        if len(held) == 1:
            names.to_checkpoint[held[0]] = ckpt_key
        elif held:  # a fused tensor written whole (GraniteMoE's input_linear): the model key it came from
            found = re.match(r"^(.*\bexperts)\.expert_0\.(gate|down)_proj\.weight$", held[0])
            if found:
                names.to_checkpoint[f"{found[1]}.{'down_proj' if found[2] == 'down' else 'gate_up_proj'}"] = ckpt_key
    return names


def name_as_checkpoint(view: HFView, names: ExpertNames) -> None:
    """Rename ``view`` (built on ``names.sliced_keys``) in place to the checkpoint's names: each expert slice under
    its own checkpoint name where the family has one; where its checkpoints keep the experts fused (GraniteMoE), the
    float slices stacked back into the fused tensors, and a quantized one refused (a quantized checkpoint has no
    per-expert linear there to hold its codes)."""
    for experts in names.unnamed_slices():
        quantized = sorted(m for m in view.quantized if m.startswith(f"{experts}.expert_"))
        fused = names.to_checkpoint.get(f"{experts}.gate_up_proj", f"{experts}.gate_up_proj")
        if quantized:
            raise CheckpointError(f"linear {quantized[0]!r} (and {len(quantized) - 1} more expert projections) is "
                                  f"quantized, but this family's checkpoints hold its experts fused ({fused!r}, "
                                  "[E, 2I, H]), with no per-expert linear for a quantized format to describe and "
                                  "transformers to dequantize: keep the experts float (quantize(..., "
                                  "keep=[*.experts.*])) or save with format='lowbit'")
        n_experts = names.fused[experts][0]
        view.tensors[f"{experts}.gate_up_proj"] = torch.stack(
            [torch.cat([_taken(view, experts, e, "gate", fused), _taken(view, experts, e, "up", fused)])
             for e in range(n_experts)])
        view.tensors[f"{experts}.down_proj"] = torch.stack([_taken(view, experts, e, "down", fused)
                                                           for e in range(n_experts)])
        view.float_linears = [m for m in view.float_linears if not m.startswith(f"{experts}.expert_")]
    rename = names.module_to_checkpoint
    view.tensors = {names.to_checkpoint.get(k, k): t for k, t in view.tensors.items()}
    view.quantized = {rename(m): dataclasses.replace(qw, module=rename(m)) for m, qw in view.quantized.items()}
    view.float_linears = [rename(m) for m in view.float_linears]
    view.sparsity = {rename(m): pattern for m, pattern in view.sparsity.items()}
    view.conv1d = [rename(m) for m in view.conv1d]
    linears = {*view.quantized, *view.float_linears}
    view.experts = sorted(name for name in map(rename, names.slice_modules()) if name in linears)


def _taken(view: HFView, experts: str, expert: int, projection: str, fused: str) -> torch.Tensor:
    """One float expert slice, removed from ``view`` to be stacked into ``fused``."""
    key = slice_key(experts, expert, projection)
    if key not in view.tensors:
        raise CheckpointError(f"the graph has no float {key!r}, so {fused!r} cannot be written whole")
    return view.tensors.pop(key)
