"""Calibration data and the block-by-block engine: exact execution, sequential quantized propagation, flat memory."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, LlamaForCausalLM

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration import engine
from lowbit.calibration.data import calibration_ids
from lowbit.calibration.observers import fake_quant
from lowbit.data import read_text
from lowbit.errors import CorruptFileError
from lowbit.ir.capture import capture
from lowbit.ir.graph import TensorType
from lowbit.ir.qscheme import QScheme
from lowbit.models import CausalLMLogits

SEQ = {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}}


# ---- data ---------------------------------------------------------------------------------------


def test_calibration_ids_from_any_file_are_deterministic(smollm2, tmp_path):
    _, tok = smollm2
    path = tmp_path / "my_calib.txt"
    path.write_text(read_text("wikitext2-valid-calib")[:20000])
    ids = calibration_ids(str(path), tok, n=6, seq_len=64)
    assert ids.shape == (6, 64) and ids.dtype == torch.int64
    assert torch.equal(ids, calibration_ids(path, tok, n=6, seq_len=64))
    whole = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    windows = len(whole) // 64
    assert ids[0].tolist() == whole[:64]  # the first window, then evenly spaced ones
    assert ids[1].tolist() == whole[(windows // 6) * 64:(windows // 6) * 64 + 64]


def test_calibration_data_errors_say_what_is_wrong(smollm2, tmp_path):
    _, tok = smollm2
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        calibration_ids(empty, tok, 4, 32)
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    with pytest.raises(ValueError, match=r"has \d+ tokens: 0 non-overlapping windows of 512, but n=4"):
        calibration_ids(short, tok, 4, 512)
    with pytest.raises(FileNotFoundError, match="no such file"):
        calibration_ids(tmp_path / "missing.txt", tok, 4, 32)
    with pytest.raises(ValueError, match="n >= 1"):
        calibration_ids(short, tok, 0, 32)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(CorruptFileError, match=r"weights.bin' is not UTF-8 text \(byte 0x80 at offset 0\)"):
        calibration_ids(binary, tok, 1, 8)


def test_whitespace_only_calibration_text_is_refused(smollm2, tmp_path):
    """A text of spaces and newlines long enough for the windows calibrated on SmolLM2's whitespace tokens (its
    byte-level BPE makes tokens of them), though the error for a text without tokens said 'empty or whitespace
    only'; such a text is refused for every tokenizer, before it is tokenized."""
    _, tok = smollm2
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t  \n" * 3000)
    with pytest.raises(ValueError, match=r"blank.txt' is whitespace only"):
        calibration_ids(blank, tok, 2, 32)
    blank.write_text(" \n\t  \n" * 2999 + "words at last")
    assert calibration_ids(blank, tok, 2, 32).shape == (2, 32)


def test_json_lines_calibration_data_is_refused_not_read_as_text(smollm2, tmp_path):
    """A dataset as JSON lines ({"text": ..., "id": ...} per line) calibrated on its raw syntax, braces and keys in
    every window, without a word; it is refused naming the file and what to give, before the model is captured."""
    import json

    import lowbit
    from lowbit.passes.base import PassError

    _, tok = smollm2
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"The quick brown fox jumps over dog {i}.", "id": i}) + "\n"
                            for i in range(200)))
    with pytest.raises(ValueError, match=r"calib.jsonl' is JSON: lowbit reads calib= files as plain text"):
        calibration_ids(data, tok, 2, 64)
    with pytest.raises(PassError, match=r"pass gptq: option calib='.*calib.jsonl'.* is JSON"):
        lowbit.compile_model("smollm2:1", pipeline="gptq(w=int4,group=64,calib_n=2,calib_len=64,progress=false)",
                             calib=data)


def test_unreadable_calibration_files_are_file_errors_naming_the_option(tmp_path):
    """A binary, empty or corrupt calib= file is a PassFileError (the CLI's exit 3, as a missing one), not a pass
    failure quoting the codec; too few given ids say 'token ids', quoted once."""
    from safetensors.torch import save_file

    from lowbit.passes.base import PassError, PassFileError
    from lowbit.passes.gptq import GPTQ

    (tmp_path / "g.bin").write_bytes(b"\xbb\xff" * 100)
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "c.safetensors").write_bytes(b"garbage" * 10)
    save_file({"input_ids": torch.arange(4)}, str(tmp_path / "few.safetensors"))
    graph = engine_graph()
    for name, message in (("g.bin", "not UTF-8 text"), ("e.txt", "is empty"), ("c.safetensors", "cannot be read as")):
        with pytest.raises(PassFileError, match=f"pass gptq: option calib=.*{name}.*{message}"):
            GPTQ(calib=str(tmp_path / name), calib_n=1, calib_len=8).options.token_ids(graph, "gptq")
    with pytest.raises(PassError, match="calibration token ids '.*few.safetensors' has 4 tokens") as exc:
        GPTQ(calib=str(tmp_path / "few.safetensors"), calib_n=1, calib_len=8).options.token_ids(graph, "gptq")
    assert not isinstance(exc.value, PassFileError)


def engine_graph():
    """A captured 1-block random Llama with SmolLM2's vocabulary size, for calibration-data checks."""
    from conftest import tiny_llama

    return capture(CausalLMLogits(tiny_llama(vocab=49152)).eval(), (torch.randint(0, 61, (2, 8)),))


# ---- engine -------------------------------------------------------------------------------------


def _random_llama(layers: int, seed: int = 0, vocab: int | None = None) -> torch.nn.Module:
    """Random weights, SmolLM2-135M's architecture (hidden 576, MLP 1536, 9 heads, 3 KV heads), ``layers`` deep;
    ``vocab``: a smaller vocabulary than its 49152."""
    from lowbit.cache import cache_dir
    from lowbit.models import SMOLLM2_CACHE

    cfg = AutoConfig.from_pretrained(cache_dir() / SMOLLM2_CACHE, local_files_only=True)
    cfg.num_hidden_layers = layers
    if vocab is not None:
        cfg.vocab_size = vocab
    torch.manual_seed(seed)
    return CausalLMLogits(LlamaForCausalLM(cfg).eval()).eval()


@pytest.fixture(scope="module")
def slice2_graph(smollm2):
    model, _ = smollm2
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    return capture(CausalLMLogits(small).eval(), (torch.randint(0, 49152, (1, 16)),), dynamic_shapes=SEQ)


def test_stages_and_exact_execution(slice2_graph):
    g = slice2_graph
    stages = engine.split_stages(g)
    assert [(s.kind, s.name) for s in stages] == [("prefix", "prefix"), ("block", "model.layers.0"),
                                                  ("block", "model.layers.1"), ("suffix", "suffix")]
    block0_out = {id(v) for n in stages[1].nodes for v in n.outputs}
    reads = stages[2].reads()  # block 0's residual stream + the prefix's seq length, cos, sin and mask
    assert len(reads) == 5 and sum(id(v) in block0_out for v in reads) == 1
    batches = [(torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    outs: list[torch.Tensor] = []
    last = g.nodes[-1]
    report = engine.run(g, batches, on_node=lambda n, a, k, o: outs.append(o[0]) if n is last else None,
                        run_suffix=True, progress=False)
    compiled = TorchCompiled(g)
    assert all(torch.equal(compiled(*b), o) for b, o in zip(batches, outs))
    assert report.batches == 3 and report.tokens == 72 and report.stages[-1] == "suffix"


def _residual(values) -> object:
    """The residual-stream tensor among a block's inputs ([1, seq, 576])."""
    return next(v for v in values if isinstance(v.type, TensorType) and v.type.rank == 3 and v.type.shape[-1] == 576)


def test_on_block_rewrites_feed_quantized_outputs_to_the_next_block(slice2_graph):
    """Block i is quantized in on_block; block i+1 must then calibrate on block i's *quantized* outputs."""
    g = slice2_graph.clone()
    w8 = QScheme(qdtype="int8")
    batches = [(torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    seen_inputs: dict[str, list[torch.Tensor]] = {}
    changed_outputs = []

    def on_block(ctx: engine.BlockRun) -> bool | None:
        if ctx.stage.kind != "block":
            return False
        seen_inputs[ctx.name] = [inp[_residual(inp)] for inp in ctx.inputs]
        for p in ctx.stage.params():
            if p.tensor_type.rank == 2:
                g.set_param(p.name, fake_quant(p.data, w8))
        now = ctx.run()
        changed_outputs.append(any(not torch.equal(a[v], b[v]) for a, b in zip(now, ctx.reference) for v in a))
        return True

    outs: list[torch.Tensor] = []
    last = g.nodes[-1]
    engine.run(g, batches, on_block=on_block, run_suffix=True, progress=False,
               on_node=lambda n, a, k, o: outs.append(o[0]) if n is last else None)
    assert changed_outputs == [True, True]
    # after the run every block is quantized: the suffix saw exactly what the quantized graph computes
    compiled = TorchCompiled(g)
    assert all(torch.equal(compiled(*b), o) for b, o in zip(batches, outs))
    # and block 1 was calibrated on block 0's quantized output, not the float one
    float_run: dict[str, list[torch.Tensor]] = {}

    def record(ctx: engine.BlockRun) -> bool:
        if ctx.stage.kind == "block":
            float_run[ctx.name] = [inp[_residual(inp)] for inp in ctx.inputs]
        return False  # unchanged: the engine reuses the block's first outputs

    engine.run(slice2_graph, batches, progress=False, on_block=record)
    assert not torch.equal(seen_inputs["model.layers.1"][0], float_run["model.layers.1"][0])
    assert torch.equal(seen_inputs["model.layers.0"][0], float_run["model.layers.0"][0])


def peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated inside ``fn`` (torch profiler memory events, in time order).

    Every allocation and free of the c10 CPU allocator while ``fn`` runs is counted, exactly (not RSS); a
    tensor allocated before ``fn`` is invisible, including its free.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


VOCAB = 1024
"""The depth test's vocabulary: SmolLM2's 49152 only added a random 28M-element embedding to initialise, hash and
capture at each depth; the activation peak it measures is the same at either size (37.3 MiB at 2 and 4 layers)."""


def _gptq_like_calibration(layers: int, batches: list[tuple[torch.Tensor]]) -> tuple[int, int]:
    """Hessians XᵀX of every linear input per block (on_node), weights replaced by int8 RTN (on_block).

    Returns (peak bytes minus the weights, weight bytes).
    """
    model = _random_llama(layers, vocab=VOCAB)
    g = capture(model, (batches[0][0][:, :16],), dynamic_shapes=SEQ)
    del model  # the graph now holds the only reference to the weights: replacing one frees the old one
    gc.collect()  # HF modules hold reference cycles
    weight_bytes = g.param_bytes()
    hessians: dict[int, torch.Tensor] = {}

    def on_node(node, args, kwargs, outs):
        if node.op == "linear" and node.module != "lm_head":
            x = args[0].reshape(-1, args[0].shape[-1])
            h = hessians.get(id(node))
            hessians[id(node)] = x.T @ x if h is None else h + x.T @ x

    def on_block(ctx: engine.BlockRun) -> bool:
        for node in ctx.nodes():
            if node.op == "linear" and id(node) in hessians:
                w = node.args[1]
                g.set_param(w.name, fake_quant(w.data, QScheme(qdtype="int8")))
        hessians.clear()
        return True

    def calibrate() -> None:
        # the profiler cannot see frees of tensors allocated before it started, so the weights are re-made
        # inside it: every weight allocation and free is then visible, and the weights are subtracted below
        for name, v in list(g.params.items()):
            g.set_param(name, v.data.clone())
        engine.run(g, batches, on_node=on_node, on_block=on_block, progress=False)

    peak = peak_allocated_bytes(calibrate)
    assert g.param_bytes() == weight_bytes
    return peak - weight_bytes, weight_bytes


def test_calibration_peak_memory_is_flat_in_depth():
    """Doubling the depth (2 -> 4 random-weight SmolLM2-architecture layers) must grow the peak < 10%."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (1, 96), generator=gen),) for _ in range(4)]
    peak2, w2 = _gptq_like_calibration(2, batches)
    peak4, w4 = _gptq_like_calibration(4, batches)
    assert w4 > w2 * 1.2  # the deeper model really has more weights
    growth = (peak4 - peak2) / peak2
    print(f"calibration activation peak: 2 layers {peak2 / 2**20:.1f} MiB, 4 layers {peak4 / 2**20:.1f} MiB "
          f"({growth:+.1%}); weights {w2 / 2**20:.0f} / {w4 / 2**20:.0f} MiB")
    assert growth < 0.10, (peak2, peak4)


def test_engine_errors(slice2_graph):
    with pytest.raises(engine.CalibrationError, match="no batches"):
        engine.run(slice2_graph, [], progress=False)
    with pytest.raises(engine.CalibrationError, match="static batch of 1"):
        engine.batches_from_ids(slice2_graph, torch.zeros(4, 8, dtype=torch.long), batch_size=2)
    assert len(engine.batches_from_ids(slice2_graph, torch.zeros(4, 8, dtype=torch.long))) == 4


def test_static_example_sizes_refusal_says_how_to_declare_them_dynamic():
    """An HF BertModel compiled from (ids, mask) of [2, 10] and calibrated on 32-token windows: the advice was
    'capture without them (compile_model(model) makes batch and length dynamic)', which fails for a model lowbit
    does not wrap ('no example inputs given for BertModel'). It names the dims to declare and dynamic_shapes=;
    declared so, the same calibration runs."""
    from transformers import BertConfig, BertModel

    from lowbit.api import compile_model
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_hidden_layers=1)).eval()
    ids = torch.randint(0, 64, (2, 10))
    calib = torch.randint(0, 64, (4, 32))
    with pytest.raises(PipelineError, match=r"%input_ids is \[2, 32\], but the graph takes \[2, 10\].*"
                                            r"dynamic_shapes=\{'input_ids': \{1: torch\.export\.Dim\.DYNAMIC\}"):
        compile_model(bert, (ids, torch.ones_like(ids)), pipeline="gptq(w=int4,group=16,progress=false)", calib=calib)
    seq = torch.export.Dim("seq", min=2, max=64)
    c = compile_model(bert, (ids, torch.ones_like(ids)), pipeline="gptq(w=int4,group=16,progress=false)", calib=calib,
                      dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    assert c.report.pipeline.records[0].stats["calib_tokens"] == 4 * 32


# ---- encoders (MiniLM): (input_ids, attention_mask) graphs, post-norm blocks --------------------------------


def test_encoder_calibration_windows_are_cls_text_sep(minilm):
    _, tok = minilm
    ids = calibration_ids("wikitext2-valid-calib", tok, n=5, seq_len=32)
    assert ids.shape == (5, 32)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    body = ids[:, 1:-1]
    assert not ((body == tok.cls_token_id) | (body == tok.sep_token_id) | (body == tok.pad_token_id)).any()
    with pytest.raises(ValueError, match="seq_len >= 3"):
        calibration_ids("wikitext2-valid-calib", tok, n=5, seq_len=2)


def test_encoder_text_too_short_names_the_calib_len_asked(minilm):
    """MiniLM's windows of calib_len=512 hold 510 text tokens between [CLS] and [SEP]; a text too short for them was
    refused as 'windows of 510', a number the user never gave. The message says where 510 comes from."""
    _, tok = minilm
    with pytest.raises(ValueError, match=r"non-overlapping windows of 510 \(calib_len=512 less the \[CLS\] and "
                                         r"\[SEP\] each window gets\), but n=500 were asked"):
        calibration_ids("wikitext2-valid-calib", tok, n=500, seq_len=512)


def test_gptq_on_post_norm_encoder_beats_rtn_on_real_sentences(minilm, minilm_graph):
    """MiniLM's q/k/v read the previous block's output LayerNorm: GPTQ rounds them while the previous stage
    runs (single pass), and the engine must pick that edit up. Bound: GPTQ's embeddings stay closer to float
    than RTN's on real WikiText-2 sentences (mean cosine, 64 sentences)."""
    from lowbit.eval.embedding import embedding_similarity, load_sentences
    from lowbit.passes.manager import PassManager

    embedder, tok = minilm
    sentences = load_sentences(64)
    cos = {}
    for name, pipe in {"rtn": "quantize(w=int4,group=64,sym=false)",
                       "gptq": "gptq(w=int4,group=64,sym=false,calib_n=128,calib_len=32,tokenizer=minilm,"
                               "progress=false)"}.items():
        g = minilm_graph.clone()
        PassManager(pipe, verify_each=True).run(g)
        assert sum(1 for n in g.nodes if n.op == "dequantize") == 36  # 6 blocks x (q, k, v, o, up, down)
        cos[name] = embedding_similarity(embedder, TorchCompiled(g), tok, sentences).mean_cos
    assert cos["gptq"] > cos["rtn"] + 0.005, cos
    assert cos["gptq"] > 0.98, cos


def test_calibrating_passes_take_the_tokenizer_captured_with_the_model(minilm, minilm_graph, smollm2):
    """``tokenizer=`` unset: the one compile_model stored in ``graph.meta`` (MiniLM's WordPiece for MiniLM),
    else SmolLM2's; a name given wins."""
    from lowbit.calibration.data import graph_tokenizer

    _, minilm_tok = minilm
    g = minilm_graph.clone()
    g.meta["tokenizer"] = minilm_tok
    assert graph_tokenizer(g, None) is minilm_tok
    assert graph_tokenizer(g, "smollm2").vocab_size == smollm2[1].vocab_size != minilm_tok.vocab_size
    g.meta.pop("tokenizer")
    assert graph_tokenizer(g, None).vocab_size == smollm2[1].vocab_size


def test_an_encoders_default_calibration_windows_are_its_max_seq_length(minilm, minilm_graph, tmp_path):
    """MiniLM's default calib_len=512 calibrated positions 256-511, which sentence-transformers (max_seq_length=256)
    never feeds it: unset, calib_len is the encoder's max_seq_length, in the pass and in the text check before the
    capture; a calib_len given is used as given."""
    from lowbit.api import describe_source
    from lowbit.passes.base import PassError
    from lowbit.passes.gptq import GPTQ
    from lowbit.passes.manager import check_calibration_texts

    embedder, tok = minilm
    assert embedder.max_seq_length == 256
    graph = minilm_graph.clone()
    graph.meta["source"], graph.meta["tokenizer"] = describe_source(embedder), tok
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 50} is here." for i in range(150)))  # ~600 tokens: 2 x 256, not 2 x 512
    default, given = GPTQ(calib=str(text), calib_n=2), GPTQ(calib=str(text), calib_n=2, calib_len=512)
    ids = default.options.token_ids(graph, "gptq")
    assert ids.shape == (2, 256) and ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id
    check_calibration_texts([default], tok, positions=512, max_seq_length=256)
    with pytest.raises(PassError, match=r"windows of 510 \(calib_len=512 less the \[CLS\] and \[SEP\].*n=2 were asked"):
        check_calibration_texts([given], tok, positions=512, max_seq_length=256)
    long = tmp_path / "long.txt"
    long.write_text(text.read_text() * 3)
    assert GPTQ(calib=str(long), calib_n=2, calib_len=512).options.token_ids(graph, "gptq").shape == (2, 512)


def test_a_json_calibration_file_is_refused_when_the_pipeline_is_read(tmp_path):
    """calib=data.jsonl was refused by the pass' text check, after the model was loaded; it is refused with the
    pipeline's other file checks, before the model is read (the CLI says it before a missing model, exit 2)."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app
    from lowbit.passes.base import PassError, PassFileError
    from lowbit.passes.manager import parse_pipeline

    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "The quick brown fox.", "id": 0}\n' * 50)
    with pytest.raises(PassError, match=r"pass gptq: option calib='.*calib.jsonl': calibration text .* is JSON") as e:
        parse_pipeline(f"gptq(w=int4,calib={data})")
    assert not isinstance(e.value, PassFileError)  # the file reads fine: it is the wrong kind (exit 2, not 3)
    res = CliRunner().invoke(app, ["compile", "no-such-model", "--pipeline", f"gptq(calib={data})"])
    assert res.exit_code == 2 and "is JSON" in res.output, res.output
