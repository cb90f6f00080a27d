"""Rotate: fold orthogonal rotations into the weights (QuaRot) so that activations lose their outliers.

Low-bit activations fail on a few huge channels; an orthogonal rotation spreads each token's energy over
all channels without changing the model. ``rotate`` applies, on the regions that
``lowbit.ir.rotation_regions`` finds:

* the residual stream (R1): embedding ``E·Q``, readers ``W·Q``, writers ``Qᵀ·W`` — needs unit-gain norms,
  so ``fold-norms`` must have run (checked: a norm with a gain is an error naming it);
* per-head V/O (R2): ``v_proj`` rows ``Rᵀ·W_h``, ``o_proj`` columns ``W·(I ⊗ R)``;
* an online ``hadamard`` before each writer no fold reaches (``down_proj``, R4), its transpose folded into
  the weight;
* an online ``hadamard`` on queries and keys after rotary (R3), so the KV cache holds rotated keys.

``kind=hadamard`` uses the randomised Hadamard ``H·diag(±1)/√n`` (seeded), ``kind=random`` a Haar-random
orthogonal matrix (QR of a seeded Gaussian) for R1/R2; online rotations are always the plain Hadamard, so
backends can run them as a fast transform. Every rotation is exact: the model's outputs change by float
rounding only. A tied embedding/lm_head weight is untied (stats ``untied``).
"""

from __future__ import annotations

from typing import Literal

import torch

from lowbit.ir.graph import Graph, Node
from lowbit.ir.hadamard import HadamardError, hadamard, random_hadamard
from lowbit.ir.rotation_regions import find_rotation_regions
from lowbit.passes.base import NO_QLINEAR, Pass, PassError, PassOptions, PassResult, register_pass
from lowbit.passes.fold_norms import private_weight

__all__ = ["Rotate", "RotateOptions", "rotation_matrix"]


class RotateOptions(PassOptions):
    kind: Literal["hadamard", "random"] = "hadamard"
    """hadamard: randomised Hadamard (QuaRot); random: Haar-random orthogonal."""
    seed: int = 0
    """Seed of the random signs / random matrix."""
    heads: bool = True
    """Rotate each head's values and o_proj's matching columns (R2)."""
    online: bool = True
    """Online Hadamard before linears writing the residual stream that no fold reaches (down_proj, R4)."""
    qk: bool = True
    """Online Hadamard on queries and keys after rotary (R3: rotated KV cache)."""


def rotation_matrix(kind: str, n: int, seed: int, what: str) -> torch.Tensor:
    """The float64 orthogonal matrix of ``kind`` for dimension ``n``; errors name ``what`` it was for."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    try:
        return random_hadamard(n, seed)
    except HadamardError as exc:
        raise PassError(f"pass rotate: {what}: {exc}") from None


def _set(graph: Graph, node: Node, index: int, users: dict, fn) -> None:  # type: ignore[no-untyped-def]
    """Replace ``node.args[index]`` (a param) by ``fn(float64 data)``, copying it first if shared (the use
    lists are updated in place, so the last reader of a once-shared param keeps the original)."""
    old = node.args[index]
    w = private_weight(graph, node, index, users, f"{node.module or node.name}.{'bias' if index == 2 else 'weight'}")
    if w is not old:
        users[id(old)] = [u for u in users[id(old)] if u is not node]
        users[id(w)] = [node]
    graph.set_param(w.name, fn(w.data.to(torch.float64)).to(w.data.dtype))


@register_pass
class Rotate(Pass):
    """Fold orthogonal (Hadamard or random) rotations into the weights, plus online Hadamards where needed."""

    name = "rotate"
    Options = RotateOptions
    exact = True
    after = ("fold-norms",)
    requires = (NO_QLINEAR,)
    creates = ("hadamard",)

    def run(self, graph: Graph) -> PassResult:
        o = self.options
        regions = find_rotation_regions(graph)
        res = regions.residual
        if res is None:
            raise PassError("pass rotate: the residual stream cannot be rotated: " + "; ".join(regions.refused))
        gained = [n for n in res.norms if n.arg(1, "weight") is not None]
        if gained:
            n = gained[0]
            raise PassError(f"pass rotate needs fold-norms first: rms_norm %{n.name} (module {n.module!r}) still has a "
                            f"gain, and RMSNorm is rotation invariant only with unit gain ({len(gained)} such norms)")
        computed = [n for n in (*res.readers, *res.writers) if not n.args[1].is_param]
        if computed:
            n = computed[0]
            raise PassError(f"pass rotate must run before quantization: linear %{n.name} (module {n.module!r}) reads a "
                            f"computed weight (%{n.args[1].name}, from {n.args[1].producer.op if n.args[1].producer else '?'})")
        users = graph.users()
        q = rotation_matrix(o.kind, res.dim, o.seed, f"residual stream of width {res.dim}")
        untied = list(regions.tied)
        for e in res.embeddings:
            _set(graph, e, 0, users, lambda w: w @ q)
        for r in res.readers:
            _set(graph, r, 1, users, lambda w: w @ q)
        for wr in res.writers:
            _set(graph, wr, 1, users, lambda w: q.T @ w)
            if wr.arg(2, "bias") is not None:
                _set(graph, wr, 2, users, lambda b: b @ q)
        stats: dict[str, object] = {"kind": o.kind, "residual_dim": res.dim, "readers": len(res.readers),
                                    "writers": len(res.writers), "untied": untied}
        heads = 0
        if o.heads:
            for h in regions.heads:
                r = rotation_matrix(o.kind, h.head_dim, o.seed + 1, f"head_dim {h.head_dim} of %{h.attention.name}")
                hd = h.head_dim

                def rot_rows(w: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (r.T @ w.reshape(-1, hd, w.shape[-1])).reshape(w.shape)

                def rot_bias(b: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (b.reshape(-1, hd) @ r).reshape(b.shape)

                def rot_cols(w: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (w.reshape(w.shape[0], -1, hd) @ r).reshape(w.shape)

                _set(graph, h.v_proj, 1, users, rot_rows)
                if h.v_proj.arg(2, "bias") is not None:
                    _set(graph, h.v_proj, 2, users, rot_bias)
                _set(graph, h.o_proj, 1, users, rot_cols)
                heads += 1
        stats["head_regions"] = heads
        online = []
        for site in regions.online:
            if site.kind == "linear_input" and o.online:
                lin = site.node
                x = lin.args[0]
                try:
                    hm = hadamard(site.dim)
                except HadamardError as exc:
                    raise PassError(f"pass rotate: online rotation of the input of linear %{lin.name} (module "
                                    f"{lin.module!r}): {exc}") from None
                node = graph.make_node("hadamard", [x], name=f"{lin.name}_had", type=x.type, module=lin.module)
                graph.insert_before(lin, node)
                lin.args = (node.output, *lin.args[1:])
                _set(graph, lin, 1, users, lambda w, hm=hm: w @ hm)
                online.append(lin.module or lin.name)
            elif site.kind == "rotary_output" and o.qk:
                rot = site.node
                try:
                    hadamard(site.dim)
                except HadamardError as exc:
                    raise PassError(f"pass rotate: online rotation of rotary %{rot.name} (module {rot.module!r}) "
                                    f"output: {exc}") from None
                node = graph.make_node("hadamard", [rot.output], name=f"{rot.name}_had", type=rot.output.type,
                                       module=rot.module)
                graph.insert_after(rot, node)
                graph.replace_all_uses(rot.output, node.output, after=node)
                online.append(f"{rot.module or rot.name}:{rot.name}")
        stats["online_hadamards"] = len(online)
        stats["refused"] = list(regions.refused)
        return PassResult(True, stats)
