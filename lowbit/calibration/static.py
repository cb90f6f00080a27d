"""Static activation scales: observe linear inputs block by block, then freeze them as QDQ with stored scales.

Runs the calibration engine with the graph's weights (and KV cache) already quantized. In each block the
observers see the block's linear inputs as the quantized model upstream produces them; then the block gets
``quantize → dequantize`` with the observed scale (params ``<module>.input_scale`` / ``.input_zero_point``) and
runs again, so the next block calibrates on activations that went through those static QDQs.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.calibration.data import (DEFAULT_CALIBRATION_TEXT, calib_size, calibration_ids, check_default_tokenizer,
                                     graph_tokenizer)
from lowbit.calibration.engine import BlockRun, CalibrationError, batches_from_ids, home_device, run, split_stages
from lowbit.calibration.observers import Observer, make_observer
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.qdq import write_static_input_qdq
from lowbit.ir.qscheme import QScheme
from lowbit.ir.quant import layout_for

__all__ = ["calibrate_static_inputs"]


def calibrate_static_inputs(graph: Graph, targets: list[tuple[Node, QScheme]], *,
                            text: str = DEFAULT_CALIBRATION_TEXT, n: int = 32, seq_len: int = 512,
                            tokenizer: Any = None, observer: str | None = None,
                            ids: torch.Tensor | None = None, progress: bool = True, batch_size: int | None = None,
                            device: str | torch.device | None = None) -> dict[str, Any]:
    """Give each target linear's input a static QDQ calibrated on ``n × seq_len`` tokens of ``text``.

    ``observer`` overrides the schemes' observer; ``ids`` (``[N, L]``) replaces the text when given. ``device``
    is where the engine and the observers run; the scales are stored beside the graph's params. ``batch_size``
    unset: the graph's static batch, else 8 sequences.
    """
    if ids is None:
        if tokenizer is None or isinstance(tokenizer, str):
            check_default_tokenizer(graph, tokenizer)
            tok = graph_tokenizer(graph, tokenizer)
        else:
            tok = tokenizer
        ids = calibration_ids(text, tok, n, seq_len)
    groups: dict[tuple[int, QScheme], list[Node]] = {}
    for node, scheme in targets:
        groups.setdefault((id(node.args[0]), scheme), []).append(node)
    by_reader: dict[int, tuple[int, QScheme]] = {id(r): key for key, rs in groups.items() for r in rs}
    observers: dict[tuple[int, QScheme], Observer] = {}
    home = home_device(graph)
    done: set[tuple[int, QScheme]] = set()

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        key = by_reader.get(id(node))
        if key is None or key in done or node is not min(groups[key], key=graph.index):
            return
        x = args[0]
        scheme = key[1]
        if key not in observers:
            layout = layout_for(scheme, x.shape, "activation")
            observers[key] = make_observer(observer or scheme.observer, scheme.qdtype, scheme.symmetric, layout)
        observers[key].observe(x)

    def on_block(ctx: BlockRun) -> bool:
        changed = False
        for key, obs in list(observers.items()):
            if key in done:
                continue
            readers = groups[key]
            x: Value = readers[0].args[0]
            scheme = key[1]
            # static layouts are per-tensor or per-channel (last dim): only the channel count matters
            scale, zp = obs.qparams([1] * (x.tensor_type.rank - 1) + [int(x.tensor_type.shape[-1])])
            if not bool(torch.isfinite(scale).all()):  # a NaN scale makes every output of the model NaN
                modules = ", ".join(sorted({r.module or f"%{r.name}" for r in readers}))
                raise CalibrationError(f"static activation scale of %{x.name} (the input of {modules}): the "
                                       f"calibration activations there are not finite ({obs.name} range "
                                       f"[{obs.range()[0].min().item()}, {obs.range()[1].max().item()}]); give "
                                       "finite calibration data")
            write_static_input_qdq(graph, x, readers, scheme, obs.layout, scale.to(home),
                              None if zp is None else zp.to(home))
            done.add(key)
            changed = True
        return changed

    # a target after the last block (a quantized lm_head) is only seen if the suffix (and its logits) runs
    suffix = [st for st in split_stages(graph) if st.kind == "suffix"]
    needs_suffix = bool(suffix) and any(id(n) in {id(m) for m in suffix[0].nodes} for n, _ in targets)
    batches = batches_from_ids(graph, ids, batch_size)
    report = run(graph, batches, on_node=on_node, on_block=on_block,
                 run_suffix=needs_suffix, progress=progress, device=device)
    missing = [groups[k][0] for k in groups if k not in done]
    if missing:
        names = ", ".join(f"%{n.name} ({n.module})" for n in missing[:5])
        raise RuntimeError(f"static activation calibration never reached the input of linear(s) {names}")
    # images are counted as images (a ViT's [n, 3, H, W] pixels were reported as n sequences of seq_len 3, the
    # channels); token ids and float sequences also say their windows' shape
    size = calib_size(ids)
    if "calib_images" not in size:
        size.update(sequences=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    return {**size, "batches": len(batches), "static_inputs": len(done),
            "seconds": round(report.seconds, 2), "peak_cached_mb": round(report.peak_cached_bytes / 2**20, 1)}
