"""``compile_model``: capture a model, run a pipeline (or a named recipe) over its IR, lower it to a backend."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.ir.capture import capture
from lowbit.ir.graph import Graph
from lowbit.passes.base import Pass, PassError, closest
from lowbit.passes.manager import (
    Instrument,
    PassManager,
    PipelineReport,
    parse_pipeline,
)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")


@dataclass
class CompileReport:
    """What compile_model did: capture figures, each pass's record, and what no pass understood."""

    capture: dict[str, Any]
    pipeline: PipelineReport
    backend: str
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    generic_ops: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture, "pipeline": self.pipeline.to_dict(), "backend": self.backend,
            "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
            "param_bytes_before": self.param_bytes_before, "param_bytes_after": self.param_bytes_after,
            "generic_aten_ops": self.generic_ops, "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        lines = [(f"captured {self.capture.get('model_class')} in {self.capture.get('export_seconds')} s: "
                 f"{self.capture.get('aten_nodes')} ATen nodes -> {self.nodes_before} IR nodes")]
        for r in self.pipeline.records:
            state = "skipped" if r.skipped else ("changed" if r.changed else "no change")
            lines.append(f"  {r.spec:<40} {state:<9} {r.seconds * 1000:8.1f} ms  {r.stats}")
        mb = 2**20
        lines.append(f"nodes {self.nodes_before} -> {self.nodes_after}; params "
                     f"{self.param_bytes_before / mb:.1f} MiB -> {self.param_bytes_after / mb:.1f} MiB; "
                     f"backend {self.backend}")
        if self.generic_ops:
            lines.append("left as generic ATen (no pass rewrites these): " +
                         ", ".join(f"{k}×{v}" for k, v in self.generic_ops.items()))
        return "\n".join(lines)


class CompiledModel(torch.nn.Module):
    """The callable a user gets: runs the lowered graph; ``graph`` and ``report`` stay inspectable."""

    def __init__(self, runner: Any, graph: Graph, report: CompileReport, tokenizer: Any = None) -> None:
        super().__init__()
        self.runner = runner
        self.graph = graph
        self.report = report
        self.tokenizer = tokenizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)


def dynamic_dim(lo: int, hi: int) -> Any:
    """A dynamic dimension that lets export keep the guards it cannot prove over the whole range (some torch
    versions prove ``min(64*s, 192*s) == 64*s`` for Llama's GQA reshape and some do not) instead of failing."""
    return torch.export.Dim.DYNAMIC(min=lo, max=hi)


def _default_example(model: torch.nn.Module, tokenizer: Any) -> tuple[tuple[Any, ...], Any]:
    """Example inputs and dynamic shapes for the models lowbit ships wrappers for."""
    from lowbit.models import CausalLMLogits, SentenceEmbedder

    if isinstance(model, CausalLMLogits):
        # batch 2 in the example so export does not specialise the batch to 1
        ids = torch.arange(1, 129, dtype=torch.long).reshape(2, 64) % model.model.config.vocab_size
        max_len = getattr(model.model.config, "max_position_embeddings", 8192)
        return (ids,), {"input_ids": {0: dynamic_dim(1, 1024), 1: dynamic_dim(2, max_len)}}
    if isinstance(model, SentenceEmbedder):
        enc = tokenizer(["lowbit compiles models.", "A second, longer example sentence for capture."],
                        padding=True, return_tensors="pt")
        seq, batch = dynamic_dim(2, 512), dynamic_dim(1, 1024)
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        return (enc["input_ids"], enc["attention_mask"]), dyn
    raise ValueError(f"no example inputs given for {type(model).__name__}: pass example_inputs=(...)")


def resolve_pipeline(pipeline: str | Sequence[Pass] | None, recipe: str | None) -> list[Pass]:
    if pipeline is not None and recipe is not None:
        raise PassError("give either pipeline= or recipe=, not both")
    if recipe is not None:
        from lowbit.recipes import get_recipe

        return parse_pipeline(get_recipe(recipe))
    if pipeline is None:
        return []
    return parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)


def lower(graph: Graph, backend: str, device: str | None = None) -> Any:
    """Lower ``graph`` to ``backend``; an unknown name lists the known ones."""
    if backend == "torch":
        from lowbit.backends.torch_backend import TorchCompiled

        return TorchCompiled(graph, device)
    if backend == "onnxruntime":
        from lowbit.backends.onnxruntime_backend import OrtCompiled

        return OrtCompiled(graph, device=device)
    if backend == "tensorrt":
        from lowbit.backends.tensorrt import TensorRTCompiled

        return TensorRTCompiled(graph)
    if backend == "triton":
        from lowbit.backends.triton_backend import lower as lower_triton

        return lower_triton(graph, device)
    raise ValueError(f"unknown backend {backend!r}{closest(backend, list(BACKENDS))}; known: {', '.join(BACKENDS)}")


def compile_model(
    model: torch.nn.Module | str,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    pipeline: str | Sequence[Pass] | None = None,
    recipe: str | None = None,
    backend: str = "torch",
    device: str | None = None,
    dynamic_shapes: Any = "auto",
    verify: bool = True,
    instruments: Sequence[Instrument] = (),
    tokenizer: Any = None,
) -> CompiledModel:
    """Capture ``model``, run ``pipeline`` (text like ``"fold-norms,dce"``) or ``recipe``, lower to ``backend``.

    ``model`` may be a name or path understood by ``lowbit.models.load_model`` (``"smollm2"``, ``"minilm"``,
    an HF directory, a ``.gguf`` file). Returns a callable ``CompiledModel`` with ``.graph`` and ``.report``.
    """
    t0 = time.perf_counter()
    passes = resolve_pipeline(pipeline, recipe)  # bad specs fail before the slow capture
    if backend not in BACKENDS:
        lower(Graph(), backend)  # raises with suggestions
    if isinstance(model, str):
        from lowbit.models import load_model

        model, tokenizer, _ = load_model(model)
    else:
        from lowbit.models import CausalLMLogits

        if hasattr(model, "lm_head") and hasattr(model, "generation_config"):
            model = CausalLMLogits(model).eval()
    if example_inputs is None:
        example_inputs, auto_dyn = _default_example(model, tokenizer)
        if dynamic_shapes == "auto":
            dynamic_shapes = auto_dyn
    if dynamic_shapes == "auto":
        dynamic_shapes = None
    graph = capture(model, example_inputs, dynamic_shapes)
    if tokenizer is not None:
        graph.meta["tokenizer"] = tokenizer
    nodes_before, bytes_before = len(graph.nodes), graph.param_bytes()
    pipeline_report = PassManager(passes, verify_each=verify, instruments=instruments).run(graph)
    runner = lower(graph, backend, device)
    from lowbit.ir.ops import is_semantic

    generic: dict[str, int] = {k: v for k, v in graph.op_counts().items() if not is_semantic(k)}
    report = CompileReport(
        capture={k: v for k, v in graph.meta.items() if k != "tokenizer"},
        pipeline=pipeline_report, backend=backend, nodes_before=nodes_before, nodes_after=len(graph.nodes),
        param_bytes_before=bytes_before, param_bytes_after=graph.param_bytes(), generic_ops=generic,
        seconds=time.perf_counter() - t0,
    )
    return CompiledModel(runner, graph, report, tokenizer)
