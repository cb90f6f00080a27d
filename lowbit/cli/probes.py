"""Real inputs, per-block probes and the end metric: what ``debug compare``, ``bisect`` and ``sensitivity`` measure.

A graph is run with the residual stream at the end of every block (``lowbit.ir.graph.blocks``) added to its
outputs, so one forward pass gives both the per-layer error and the end metric. Blocks are found afresh in
each graph by module path, so a pass that renames or replaces nodes is still compared layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lowbit.cli.common import Exit, LoadedModel, fail, text_tokenizer
from lowbit.eval.perplexity import nll_sum, ppl_of
from lowbit.instruments import compare_outputs
from lowbit.ir.graph import Graph, Value, blocks


PROBE_COPIES = 14
"""Float32 copies of a run's logits alive at once while comparing, for the memory check before a run (measured:
debug compare on 16 x 512 windows of a 2-layer SmolLM2 peaked at 22.8 GB RSS, ~14x one copy's 1.6 GB). Runs that
would need more than 80% of the available memory are refused with the window count that fits."""


def _available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class EvalInputs:
    """The real inputs one evaluation uses, and how they were chosen (reported alongside the numbers)."""

    kind: str
    args: tuple[torch.Tensor, ...]
    description: str


def make_inputs(model: LoadedModel, *, windows: int = 4, seq_len: int = 128, n_sentences: int = 32) -> EvalInputs:
    """WikiText-2 test windows for causal LMs (as ``lowbit.eval.perplexity`` cuts them), sentences for encoders."""
    if model.kind == "causal-lm":
        from lowbit.eval.perplexity import token_ids
        from lowbit.eval.perplexity import windows as cut

        # the graph is captured for at most max_position_embeddings tokens: longer windows failed mid-run with an
        # InputError traceback (exit 1)
        config = getattr(getattr(model.module, "model", None), "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            fail(f"--seq-len {seq_len} is longer than the model's max_position_embeddings={limit}, the longest input "
                 f"its graph is captured for: give --seq-len {limit} or less", Exit.USAGE)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int):
            # a probe holds every window's logits (float32) a few times over (reference, candidate, the loss)
            per_window = seq_len * vocab * 4 * PROBE_COPIES
            need = windows * per_window
            avail = _available_bytes()
            if avail is not None and need > 0.8 * avail:
                fit = max(1, int(0.8 * avail // per_window))
                fail(f"--windows {windows} x --seq-len {seq_len} needs ~{need / 2**30:.1f} GiB for the logits "
                     f"({vocab} per token, kept for the float model and each stage) and this machine has "
                     f"{avail / 2**30:.1f} GiB available: use --windows {fit} or fewer (or a shorter --seq-len)",
                     Exit.USAGE)

        try:
            ids = cut(token_ids("wikitext2-test", text_tokenizer(model, "the debug commands evaluate on WikiText-2 "
                                                                        "text")), seq_len, windows)
        except (FileNotFoundError, ValueError) as exc:
            fail(f"evaluation text: {exc}", Exit.NOT_FOUND if isinstance(exc, FileNotFoundError) else Exit.USAGE)
        if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:  # an InputError traceback in the run
            fail(f"model {model.spec!r}: its tokenizer gives id {int(ids.max())} for the evaluation text, outside the "
                 f"model's vocabulary of {vocab} (config.vocab_size): the tokenizer files beside it belong to another "
                 "model", Exit.NOT_FOUND)
        return EvalInputs("causal-lm", (ids,), f"{ids.shape[0]} WikiText-2 test windows × {seq_len} tokens")
    from lowbit.eval.embedding import load_sentences, usable_sentences

    try:
        available = len(usable_sentences())
        if n_sentences > available:  # said as 'fewer than n=...', the API's argument
            fail(f"--sentences {n_sentences}: the WikiText-2 test text has {available} sentences of 6-60 words to "
                 f"embed; give --sentences {available} or fewer", Exit.USAGE)
        sents = load_sentences(n_sentences)
    except (FileNotFoundError, ValueError) as exc:
        fail(f"evaluation sentences: {exc}", Exit.NOT_FOUND if isinstance(exc, FileNotFoundError) else Exit.USAGE)
    enc = model.tokenizer(sents, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return EvalInputs("encoder", (enc["input_ids"], enc["attention_mask"]),
                      f"{len(sents)} WikiText-2 test sentences")


def block_outputs(graph: Graph) -> list[tuple[str, Value]]:
    """(block prefix, the value leaving the block) for every block: its residual stream output.

    The value leaving a block is the last one it defines that anything outside the block (or the graph's
    outputs) reads: the final residual add of a pre-norm decoder layer, the output LayerNorm of BERT's.
    """
    users = graph.users()
    outs = graph.output_ids()
    result = []
    for region in blocks(graph):
        inside = {id(n) for n in region.nodes}
        leaving = None
        for n in region.nodes:
            for v in n.outputs:
                readers = users.get(id(v), [])
                if id(v) in outs or any(id(r) not in inside for r in readers):
                    leaving = v
        if leaving is not None:
            result.append((region.prefix, leaving))
    return result


@dataclass
class Probe:
    """One forward pass of a graph on the inputs: the final output and each block's output."""

    output: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)


def run_probe(graph: Graph, inputs: EvalInputs, with_layers: bool = True) -> Probe:
    """Run ``graph`` (not modified) with every block output added to its outputs."""
    from lowbit.backends.torch_backend import TorchCompiled

    g = graph.clone()
    probes = block_outputs(g) if with_layers else []
    n_out = len(g.outputs)
    g.outputs = list(g.outputs) + [v for _, v in probes]
    runner = TorchCompiled(g)
    parts = []
    with torch.inference_mode():
        for chunk in input_chunks(g, inputs):
            out = runner(*chunk)
            parts.append(out if isinstance(out, (tuple, list)) else (out,))
    res = [torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(parts[0]))]
    layers = {name: _real_tokens(res[n_out + i].detach(), inputs) for i, (name, _) in enumerate(probes)}
    return Probe(res[0].detach(), layers)


def input_chunks(graph: Graph, inputs: EvalInputs) -> list[tuple[torch.Tensor, ...]]:
    """The calls that feed ``inputs`` to ``graph``: SmolLM2 is captured with batch 1 (only the sequence is dynamic),
    so such a graph gets one row at a time."""
    static_batch = [v.type.shape[0] == 1 for v in graph.inputs if getattr(v.type, "shape", None)]
    rows = inputs.args[0].shape[0]
    if any(static_batch) and rows > 1:
        return [tuple(a[i:i + 1] for a in inputs.args) for i in range(rows)]
    return [inputs.args]


def _real_tokens(hidden: torch.Tensor, inputs: EvalInputs) -> torch.Tensor:
    """An encoder's block output at its real tokens only, ``[tokens, ...]``: its sentences are padded to the longest
    (40% of MiniLM's 8-sentence batch is padding), and the padding rows, which the mean pooling drops, moved a
    block's SQNR by up to 0.7 dB and its max error by whatever they held."""
    if inputs.kind != "encoder" or len(inputs.args) < 2:
        return hidden
    mask = inputs.args[1]
    if hidden.dim() < 2 or tuple(hidden.shape[:2]) != tuple(mask.shape):
        return hidden
    return hidden[mask.to(torch.bool)]


METRICS = ("ppl", "kl", "cos", "auto")


def check_metric(metric: str) -> None:
    """``--metric`` is one of ``METRICS``: checked before the model is read (it was refused after the load)."""
    if metric not in METRICS:
        from lowbit.passes.base import closest

        fail(f"--metric {metric!r}: give ppl, kl, cos or auto{closest(metric, list(METRICS))}", Exit.USAGE)


def metric_name(kind: str, metric: str) -> str:
    """Resolve ``auto``; ppl and kl only make sense for causal LMs and cos for encoders."""
    check_metric(metric)
    if metric == "auto":
        return "ppl" if kind == "causal-lm" else "cos"
    if metric in ("ppl", "kl") and kind != "causal-lm":
        fail(f"--metric {metric} needs a causal LM; encoders use --metric cos (1 - embedding cosine)", Exit.USAGE)
    if metric == "cos" and kind != "encoder":
        fail("--metric cos is for sentence encoders; causal LMs use --metric ppl or kl", Exit.USAGE)
    return metric


def end_metric(metric: str, inputs: EvalInputs, output: torch.Tensor, reference: torch.Tensor | None) -> float:
    """Perplexity of the windows (each predicts tokens 1..L-1, as ``lowbit.eval.perplexity``), the mean per-token
    KL divergence of the next-token distributions from the float model's (``kl``: 0 for the float model; what a
    slice such as ``smollm2:2`` can be measured by, whose perplexity is not a language model's), or 1 - mean cosine
    between the embeddings and the float model's."""
    if metric == "kl":
        from lowbit.calibration.distill import logit_kl

        assert reference is not None
        return float(logit_kl(output, reference))
    if metric == "ppl":
        ids = inputs.args[0]
        given = output.shape[1] if output.dim() > 1 else 0
        if given != ids.shape[1]:  # it was cross_entropy's batch-size ValueError, a traceback
            fail(f"perplexity needs the logits of every position, and the graph gives {given} of the window's "
                 f"{ids.shape[1]} (the last-logits pass keeps only the last position's: leave it out of a pipeline "
                 "measured by perplexity)", Exit.USAGE)
        return ppl_of(nll_sum(output[:, :-1], ids[:, 1:]) / ids[:, 1:].numel())
    assert reference is not None
    cos = F.cosine_similarity(output.double(), reference.double(), dim=-1)
    return float(1.0 - cos.mean().item())


def layer_stats(ref: Probe, cand: Probe) -> dict[str, dict[str, float]]:
    """SQNR, cosine, max/mean abs error of each block output present in both probes."""
    return {name: compare_outputs(t, cand.layers[name]) for name, t in ref.layers.items() if name in cand.layers
            and cand.layers[name].shape == t.shape}


def slice_note(model: LoadedModel, metric: str, ranking: bool = False) -> str | None:
    """What to say when a slice (``smollm2:2``: its first blocks, then the final norm and the head) is measured by
    perplexity: the cut model is not a language model (its float perplexity is in the thousands, and damage can lower
    it), so a threshold on it says little; the KL from the float slice's own outputs is a measure it has."""
    if metric != "ppl" or model.n_layers is None:
        return None
    if ranking:  # sensitivity: no threshold, a ranking by damage
        return (f"note: {model.spec} keeps only the first {model.n_layers} block(s), so its perplexity is not a "
                "language model's and a ranking by it says little: --metric kl ranks by the KL of each run's "
                "next-token distributions from the float slice's")
    return (f"note: {model.spec} keeps only the first {model.n_layers} block(s), so its perplexity is not a language "
            "model's and a threshold on it says little: --metric kl compares each run's next-token distributions "
            "with the float slice's (give --max-increase as an absolute amount, e.g. 0.05)")


def metric_label(metric: str) -> str:
    """How a table or log line names ``metric``'s values: ``cos`` (the option) is 1 - cosine, 0 for the float model,
    and printed as "cos" it read as a cosine of 0 ("float cos 0.00000, all quantized 0.00926")."""
    return {"cos": "1 - cos", "kl": "KL"}.get(metric, metric)


def fmt_metric(metric: str, value: float) -> str:
    """Perplexity with 3 decimals (4 significant digits once it is huge, as for a truncated model); cos distance 5."""
    if metric == "ppl":
        return f"{value:.3f}" if value < 1e4 else f"{value:.4g}"
    return f"{0.0 if abs(value) < 5e-6 else value:.5f}"  # 1 - cos of identical outputs rounds to -1e-17
