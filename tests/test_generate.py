"""Generation through a compiled step graph (docs/design.md "Program form") on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.api import CompiledModel, compile_model
from lowbit.errors import LowbitError
from lowbit.generate import GenerationError, GenerationOutput, GenerationSpec
from lowbit.models import CausalLMLogits, CausalLMStep

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def smollm2_two_blocks(smollm2):
    """(SmolLM2 cut to its first two blocks, embedding, final norm and tied head kept, as its HF causal LM;
    tokenizer): real weights and vocabulary for the tests of generate's mechanics (greedy tokens against
    transformers', the decode step against the prefill, sampling, stops, prompt and option forms), which run the
    same code in every block. Compiling and running all 30 blocks cost ~4x a decode step and ~10x the capture for
    nothing more they check; the tests that read what the model writes (a chat turn's end, stop words in its
    text) keep the whole model (``compiled_whole``)."""
    from conftest import smollm2_slice

    return smollm2_slice(smollm2[0], 2).model, smollm2[1]


@pytest.fixture(scope="module")
def compiled(smollm2_two_blocks):
    model, tok = smollm2_two_blocks
    return compile_model(model, tokenizer=tok, generation=GenerationSpec(max_length=64, max_batch=4))


@pytest.fixture(scope="module")
def compiled_whole(smollm2):
    """The whole SmolLM2 compiled for generation (~35 CPU-s): the stop-string tests' ``whole`` variants, slow, on text
    the model writes itself (their default variants run ``compiled_chained``). The two tests sit side by side: xdist
    hands out neighbours together, and each worker that runs one builds this."""
    model, tok = smollm2
    return compile_model(model, tokenizer=tok, generation=GenerationSpec(max_length=64, max_batch=4))


CHAINS = [[" is", " Paris", ".", " The", " answer", " was", " easy", "!"],  # PROMPTS[0] ends with " is"
          ["):", " if", " n", " <", " two", ":", " return", " one"],  # PROMPTS[1] ends with "):"
          [",", " the", " old", " vill", "age", " smith", " said", " hi"],  # "village" spans two tokens
          ["\n", "Hello", " there", "<|im_end|>", "\n"]]  # the chat prompt ends with "assistant\n"
"""What ``_chained_model`` writes after each prompt's last token: the first three end in a token that repeats, the
chat turn ends (``<|im_end|>``) and starts again."""


def _chained_model(tok, chains: list[list[str]]) -> torch.nn.Module:
    """A one-block Llama with SmolLM2's vocabulary whose greedy next token depends on the current token alone and
    follows ``chains`` (pieces of text, each token's successor the next token; a chain's last token repeats where
    no chain goes on from it): its attention and MLP write nothing into the residual stream (o_proj and down_proj
    zero), each chain token's embedding is a basis vector, and the head maps that vector to its successor."""
    successor: dict[int, int] = {}
    for chain in chains:
        ids = [i for piece in chain for i in tok(piece, add_special_tokens=False).input_ids]
        for a, b in zip(ids, ids[1:]):
            assert successor.setdefault(a, b) == b, f"token {tok.decode([a])!r} goes on two ways"
        successor.setdefault(ids[-1], ids[-1])
    model = tiny_llama(vocab=len(tok), hidden=64, inter=128, heads=4, kv_heads=2, max_positions=64)
    assert len(successor) <= model.config.hidden_size
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight,
                  model.model.layers[0].self_attn.o_proj.weight, model.model.layers[0].mlp.down_proj.weight):
            w.zero_()
        for dim, (token, following) in enumerate(successor.items()):
            model.model.embed_tokens.weight[token, dim] = 1.0
            model.lm_head.weight[following, dim] = 10.0
    return model


@pytest.fixture(scope="module")
def compiled_chained(smollm2):
    """``_chained_model`` of ``CHAINS`` compiled for generation as ``compiled_whole`` is: text known in advance for
    the stop-string tests, whose assertions are about where a run stops, in ~1 s where the whole SmolLM2's compile
    took ~35 CPU-s."""
    tok = smollm2[1]
    return compile_model(_chained_model(tok, CHAINS), tokenizer=tok,
                         generation=GenerationSpec(max_length=64, max_batch=4))


@pytest.fixture(params=["chained", pytest.param("whole", marks=pytest.mark.slow)])
def stop_model(request: pytest.FixtureRequest) -> CompiledModel:
    """The model the stop-string tests generate with: ``compiled_chained`` by default, the whole SmolLM2 (its own
    text; LOWBIT_SLOW=1) as well."""
    return request.getfixturevalue(f"compiled_{request.param}")


def test_greedy_matches_transformers_token_for_token(smollm2_two_blocks, compiled):
    """One lowbit batch of three prompts of different lengths vs transformers' generate, prompt by prompt."""
    model, tok = smollm2_two_blocks
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    out = compiled.generate(prompts, 32)
    for p, got in zip(prompts, out.tokens):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert got == ref[0, len(p):].tolist(), tok.decode(p)
    assert out.decode_steps >= 1 and out.prefill_seconds > 0


def test_decode_step_equals_last_row_of_prefill(smollm2_two_blocks, compiled):
    model, tok = smollm2_two_blocks
    ids = torch.tensor([tok(PROMPTS[2]).input_ids])
    n = ids.shape[1]
    step = CausalLMStep(model)
    run = compiled.runner
    full = run(ids, torch.arange(n)[None], *step.empty_cache(1, n))[0][0, -1]
    with torch.no_grad():  # prefill is the logits model's last row (its head over one row: fp32 rounding)
        assert (full - CausalLMLogits(model)(ids)[0, -1]).abs().max() <= 1e-5 * full.abs().max()
    cache = step.empty_cache(1, 64)
    prefix = run(ids[:, :-1], torch.arange(n - 1)[None], *[c[:, :, : n - 1].clone() for c in cache])
    for c, part in zip(cache, prefix[1:]):
        c[:, :, : n - 1] = part
    last = run(ids[:, -1:], torch.tensor([[n - 1]]), *cache)[0][0, -1]
    # fp32 rounding only: other reduction lengths (64 slots vs n) and matmul shapes
    assert (last - full).abs().max() <= 1e-5 * full.abs().max()
    assert last.argmax() == full.argmax()


def test_bucketed_prefill_pads_without_changing_any_prompt(smollm2_two_blocks, compiled):
    """A captured prefill takes the prompts left-padded up to its bucket (``bucketed``): every prompt's last logits
    and its cache slots equal the unpadded prefill's (fp32 rounding of other reduction lengths), for a batch of
    prompts of different lengths, so a replayed prefill generates what an eager one does; and a cache holding another
    prompt's values (a replay's static buffers) gives the same bits as a zeroed one."""
    from lowbit.generate import bucketed, left_padded

    tok = smollm2_two_blocks[1]
    prompts = [tok(p).input_ids for p in PROMPTS]
    ids, pos = left_padded(prompts)
    step = CausalLMStep(smollm2_two_blocks[0])
    run = compiled.runner
    want = run(ids, pos, *step.empty_cache(3, 64))
    wide_ids, wide_pos = bucketed(ids, pos, 40)
    assert wide_ids.shape == (3, 40) and (wide_ids[:, -ids.shape[1]:] == ids).all()
    got = run(wide_ids, wide_pos, *step.empty_cache(3, 64))
    scale = want[0].abs().max()
    assert (got[0][:, -1] - want[0][:, -1]).abs().max() <= 1e-5 * scale
    for b, p in enumerate(prompts):
        for w, g in zip(want[1:], got[1:]):  # the prompt's own slots; the rest is overwritten before it is read
            assert (g[b, :, :len(p)] - w[b, :, :len(p)]).abs().max() <= 1e-5 * max(1.0, w.abs().max().item())
    # a replayed prefill's cache buffers still hold the previous prompt's keys and values past this one's (an eager
    # prefill starts from zeros): no prompt token reads them
    stale = [torch.randn_like(c) * 100 for c in step.empty_cache(3, 64)]
    again = run(wide_ids, wide_pos, *stale)
    assert torch.equal(again[0], got[0])
    for b, p in enumerate(prompts):
        for w, g in zip(got[1:], again[1:]):
            assert torch.equal(g[b, :, :len(p)], w[b, :, :len(p)])
    assert bucketed(ids, pos, ids.shape[1])[0] is ids  # a prompt already at the bucket is not copied
    with pytest.raises(GenerationError, match="prefill_graphs=-1"):
        GenerationSpec(prefill_graphs=-1)


def test_sampling_is_seeded_and_top_k_1_is_greedy(smollm2, compiled):
    _, tok = smollm2
    prompt = [tok(PROMPTS[0]).input_ids]
    kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, stop_tokens=())
    a = compiled.generate(prompt, 4, seed=1, **kw).tokens
    assert a == compiled.generate(prompt, 4, seed=1, **kw).tokens
    draws = {tuple(compiled.generate(prompt * 3, 4, seed=s, do_sample=True, temperature=1.5,
                                     stop_tokens=()).tokens[i]) for s in range(2) for i in range(3)}
    assert len(draws) > 1
    greedy = compiled.generate(prompt, 4, stop_tokens=()).tokens
    assert compiled.generate(prompt, 4, seed=3, do_sample=True, top_k=1, stop_tokens=()).tokens == greedy


def test_stop_tokens_and_left_padded_tensor_input(smollm2, compiled):
    _, tok = smollm2
    a, b = tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids
    free = compiled.generate([a, b], 5, stop_tokens=()).tokens
    stop = free[0][2]
    run = compiled.generate([a, b], 5, stop_tokens=[stop])
    stopped = run.tokens
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    # throughput counts the tokens decode steps made (a stopped sequence adds none for the steps it sat out)
    made = sum(len(t) - 1 for t in stopped)
    assert made < run.decode_steps * 2
    assert run.decode_tokens_per_second * run.decode_seconds == pytest.approx(made)
    width = max(len(a), len(b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate((a, b)):  # left padding, as HF tokenizers pad for generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    assert compiled.generate(ids, 5, attention_mask=mask, stop_tokens=()).tokens == free
    # stop tokens as a tensor (its elements hash by identity: set(tensor) never matched), 0-d tensor, numpy
    for given in (torch.tensor([stop]), torch.tensor(stop), np.int64(stop), np.array([stop])):
        assert compiled.generate([a, b], 5, stop_tokens=given).tokens == stopped, type(given)
    with pytest.raises(GenerationError, match="stop_tokens: 1.5 is not a token id"):
        compiled.generate([a], 2, stop_tokens=[1.5])
    vocab = len(tok)
    with pytest.raises(GenerationError, match=f"stop_tokens: {vocab} is outside the vocabulary"):  # never chosen
        compiled.generate([a], 2, stop_tokens=[stop, vocab])


def test_text_flat_ids_and_tokenizer_output_are_prompts(smollm2, compiled):
    """Strings are encoded with the model's tokenizer (``int('T')`` on each character was a raw ValueError), a flat
    list of ids is one prompt (as a 1-D tensor is), and a tokenizer's padded output keeps only the real ids (its
    keys were read as two text prompts); other items are refused by index."""
    _, tok = smollm2
    a, b = tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids
    ref = compiled.generate([a, b], 3, stop_tokens=()).tokens
    assert compiled.generate(PROMPTS[:2], 3, stop_tokens=()).tokens == ref
    assert compiled.generate(a, 3, stop_tokens=()).tokens == ref[:1]
    padded = tok(PROMPTS[:2], padding=True)
    assert len(set(map(len, padded["input_ids"]))) == 1
    assert compiled.generate(padded, 3, stop_tokens=()).tokens == ref
    with pytest.raises(GenerationError, match="prompt 1 is NoneType"):
        compiled.generate([a, None], 3)


def test_bad_requests_name_the_limit(smollm2, compiled):
    _, tok = smollm2
    prompt = tok(PROMPTS[0]).input_ids
    with pytest.raises(GenerationError, match=r"max_length=64.*GenerationSpec\(max_length=70\)"):
        compiled.generate([prompt + [1] * (60 - len(prompt))], 10)
    with pytest.raises(GenerationError, match=r"max_batch=4.*GenerationSpec\(max_batch=5\)"):
        compiled.generate([prompt] * 5, 2)
    with pytest.raises(GenerationError, match="max_new_tokens=0"):
        compiled.generate([prompt], 0)
    # loose inputs that were silently rounded, ignored or raised raw errors
    with pytest.raises(GenerationError, match="max_new_tokens=2.5: must be an integer"):
        compiled.generate([prompt], 2.5)
    with pytest.raises(GenerationError, match="prompt 0 is list"):
        compiled.generate([[5.7, 17.2]], 2)
    assert compiled.generate([[float(t) for t in prompt]], 2, stop_tokens=()).tokens == \
        compiled.generate([prompt], 2, stop_tokens=()).tokens
    # a tensor's ids as a list's: a float tensor's fractions and a bool tensor were read as other ids
    with pytest.raises(GenerationError, match=r"input_ids holds 17.5 at position \(0, 1\): token ids are integers"):
        compiled.generate(torch.tensor([[5.0, 17.5]]), 2)
    with pytest.raises(GenerationError, match=r"stop_tokens: -1 is not a token id \(ids are >= 0\)"):
        compiled.generate([prompt], 2, stop_tokens=[2, -1])
    with pytest.raises(GenerationError, match=r"no option 'eos_token_id': use stop_tokens="):
        compiled.generate([prompt], 2, eos_token_id=2)  # transformers' name: a bare TypeError before
    with pytest.raises(GenerationError, match=r"attention_mask holds 0.5 at position \(0, 0\): it takes 1"):
        compiled.generate(torch.tensor([prompt]), 2, attention_mask=torch.full((1, len(prompt)), 0.5))
    with pytest.raises(GenerationError, match="attention_mask holds 2"):
        compiled.generate([prompt], 2, attention_mask=[[2] * len(prompt)])
    # a 0 between real tokens dropped that token (transformers keeps it in place, unattended): another result
    hole = [1] * len(prompt)
    hole[1] = 0
    with pytest.raises(GenerationError, match=r"attention_mask row 0 holds 0 at position 1, between real tokens"):
        compiled.generate(torch.tensor([prompt]), 2, attention_mask=torch.tensor([hole]))
    with pytest.raises(GenerationError, match="on_token=5: expected a callable"):
        compiled.generate([prompt], 2, on_token=5)
    with pytest.raises(GenerationError, match="input_ids is a torch.bool tensor"):
        compiled.generate(torch.tensor([[True, False]]), 2)
    assert compiled.generate(torch.tensor([prompt], dtype=torch.float32), 2, stop_tokens=()).tokens == \
        compiled.generate([prompt], 2, stop_tokens=()).tokens
    with pytest.raises(GenerationError, match="temperature=0.5, top_k=3 only apply when sampling"):
        compiled.generate([prompt], 2, temperature=0.5, top_k=3)
    with pytest.raises(GenerationError, match="seed=1 only applies when sampling"):
        compiled.generate([prompt], 2, seed=1)
    with pytest.raises(GenerationError, match="temperature=nan: must be a finite number"):
        compiled.generate([prompt], 2, do_sample=True, temperature=float("nan"))
    for bad in (dict(max_batch="4"), dict(max_length=10.5), dict(max_length=True)):
        with pytest.raises(GenerationError, match="must be an integer"):
            GenerationSpec(**bad)


@pytest.fixture(scope="module")
def tiny_compiled():
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=97, max_positions=64)
    return compile_model(model, generation=GenerationSpec(max_length=32, max_batch=3))


def test_a_request_past_the_models_positions_is_not_told_to_grow_the_cache():
    """A prompt + max_new_tokens past the model's max_position_embeddings was told to compile with
    GenerationSpec(max_length=<the sum>), which GenerationSpec then refuses (no cache can hold positions the model
    does not have); the refusal now names the model's limit. Within it, the cache's advice is unchanged."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, layers=1, vocab=97, max_positions=16)
    cm = compile_model(model, generation=GenerationSpec(max_length=12, max_batch=1))
    with pytest.raises(GenerationError, match="= 20 > the model's max_position_embeddings=16: shorten the prompt") as e:
        cm.generate([list(range(1, 13))], 8)
    assert "GenerationSpec(max_length" not in str(e.value)
    with pytest.raises(GenerationError, match=r"compile with generation=GenerationSpec\(max_length=14\)"):
        cm.generate([list(range(1, 11))], 4)


def test_prompt_containers_and_option_types_are_checked(tiny_compiled):
    """numpy prompts are read as tensors are (a 1-D array was refused as prompts of one int each), a list mask beside a
    tensor is taken (``'list' object has no attribute 'shape'``), and input_ids or sampling options of the wrong type
    are refused by name: they raised torch's TypeError/RuntimeError (``topk(): argument 'k' must be int``, ``manual_seed
    expected a long``), and do_sample="no" sampled."""
    cm = tiny_compiled
    ref = cm.generate([[5, 17, 30]], 3, stop_tokens=()).tokens
    for ids in (np.array([5, 17, 30]), np.array([[5, 17, 30]]), [np.int64(5), np.int64(17), np.int64(30)]):
        assert cm.generate(ids, 3, stop_tokens=()).tokens == ref, ids
    ids = torch.tensor([[0, 5, 17, 30], [9, 5, 17, 30]])
    assert cm.generate(ids, 3, attention_mask=[[0, 1, 1, 1], [0, 1, 1, 1]], stop_tokens=()).tokens == ref * 2
    for bad, needle in [(None, "input_ids is NoneType"), (5, "input_ids is int")]:
        with pytest.raises(GenerationError, match=needle):
            cm.generate(bad, 3)
    for kw, needle in [(dict(top_k=2.5), "top_k=2.5: must be an integer"), (dict(top_k="5"), "top_k='5'"),
                       (dict(temperature="0.5"), "temperature='0.5': must be a number"),
                       (dict(seed="a"), "seed='a': must be an integer"), (dict(seed=1.5), "seed=1.5"),
                       (dict(seed=2**70), "seed=1180591620717411303424: must fit in 64 bits"),
                       (dict(do_sample="no"), "do_sample='no': must be True or False")]:
        with pytest.raises(GenerationError, match=needle):
            cm.generate([[5, 17, 30]], 3, **{"do_sample": True, **kw})


def test_one_prompts_flat_mask_is_its_row(tiny_compiled):
    """``tok("text")`` and ``apply_chat_template(...)`` give one prompt as flat ids with a flat attention mask: the mask
    was read as one row per prompt, a raw "'int' object is not iterable"; a 1-D tensor's 1-D mask was refused as not
    matching the ids' [1, L]."""
    from transformers import BatchEncoding

    cm = tiny_compiled
    ref = cm.generate([[5, 17, 30]], 3, stop_tokens=()).tokens
    assert cm.generate(BatchEncoding({"input_ids": [5, 17, 30], "attention_mask": [1, 1, 1]}), 3,
                       stop_tokens=()).tokens == ref
    assert cm.generate([9, 5, 17, 30], 3, attention_mask=np.array([0, 1, 1, 1]), stop_tokens=()).tokens == ref
    assert cm.generate(torch.tensor([9, 5, 17, 30]), 3, attention_mask=torch.tensor([0, 1, 1, 1]),
                       stop_tokens=()).tokens == ref
    with pytest.raises(GenerationError, match="attention_mask row 0 has 2 entries for 3 ids"):
        cm.generate([5, 17, 30], 3, attention_mask=[1, 1])


def test_a_list_batchs_mask_has_one_row_per_prompt(tiny_compiled):
    """A list batch's attention_mask with fewer rows than prompts was a raw IndexError, and one with more rows had
    the extra rows ignored; both are refused, naming the counts (a tensor batch's mask already was, by shape)."""
    for rows in (1, 3):
        with pytest.raises(GenerationError, match=f"attention_mask has {rows} rows for 2 prompts"):
            tiny_compiled.generate([[5, 17], [30, 8]], 2, attention_mask=[[1, 1]] * rows)


def test_sampling_at_a_tiny_temperature_is_greedy(tiny_compiled):
    """A temperature near 0 samples the argmax (logits / 1e-40 overflowed float32 to inf, and the draw failed with
    multinomial's "probability tensor contains either inf, nan or element < 0"); non-finite logits are named."""
    from lowbit.generate import _sample

    cm = tiny_compiled
    greedy = cm.generate([[5, 17, 30], [9]], 4, stop_tokens=()).tokens
    for t in (1e-40, 1e-300):
        sampled = cm.generate([[5, 17, 30], [9]], 4, do_sample=True, temperature=t, seed=0, stop_tokens=())
        assert sampled.tokens == greedy
    logits = torch.randn(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(GenerationError, match="sequence 1: the model's logits are not finite"):
        _sample(logits, 1.0, None, None, torch.Generator().manual_seed(0))


def test_unseeded_sampling_follows_torch_manual_seed(smollm2, compiled):
    """Without seed=, a draw's seed comes from torch's global generator, as transformers' sampling does; it
    called torch.seed(), which re-seeded the global generator from the clock (torch.manual_seed had no effect
    on the tokens, and every later torch.rand in the user's program changed)."""
    _, tok = smollm2
    prompt = [tok(PROMPTS[0]).input_ids]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append((compiled.generate(prompt, 4, do_sample=True, stop_tokens=()).tokens, torch.rand(1).item()))
    assert runs[0] == runs[1]


def test_bad_device_is_refused_before_capture():
    """device="gpu" raised torch's RuntimeError listing every device type, device="cuda" on a CPU-only torch a bare
    AssertionError from lowering (a traceback, exit 1, from lowbit generate --device cuda): both are a DeviceError
    naming the device, before the capture."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app
    from lowbit.errors import DeviceError

    model = tiny_llama()
    with pytest.raises(DeviceError, match="'gpu' is not a torch device"):
        compile_model(model, device="gpu")
    with pytest.raises(DeviceError, match="device='cuda:99'"):  # no machine has 100 GPUs
        compile_model(model, device="cuda:99", generation=GenerationSpec(max_length=8, max_batch=1))
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "--device", "cuda:99"])
    assert res.exit_code == 2 and "--device: device='cuda:99'" in res.output, res.output


def test_models_without_generation_refuse_clearly(smollm2, minilm):
    embedder, _ = minilm
    with pytest.raises(GenerationError, match="no causal-LM head"):
        compile_model(embedder, generation=True)
    with pytest.raises(GenerationError, match="kv=int4.*packed cache"):  # (w8a8kv4 generates with kv-cache now)
        compile_model(smollm2[0], recipe="w4a4kv4-rtn", generation=True)


def test_generate_on_a_compiled_encoder_says_it_is_an_encoder():
    """CompiledModel.generate on a sentence encoder said 'compiled as input_ids -> logits, with no KV cache: compile it
    with generation=', advice an encoder cannot follow (that compile is refused: no causal-LM head)."""
    from transformers import BertConfig, BertModel

    from lowbit.models import SentenceEmbedder

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_hidden_layers=1)).eval()
    ids = torch.randint(0, 64, (2, 6))
    c = compile_model(SentenceEmbedder(bert), (ids, torch.ones_like(ids)))
    with pytest.raises(GenerationError, match=r"a text encoder \(input_ids, attention_mask -> embeddings\) with no "
                                              r"causal-LM head"):
        c.generate(ids, 3)


def test_cli_generate_on_an_encoder_names_what_it_is(minilm):
    """`lowbit generate minilm` said "model 'minilm' is a encoder with no causal-LM head"."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    res = CliRunner().invoke(app, ["generate", "minilm", "--prompt", "hi"])
    assert res.exit_code == 2, res.output
    assert "model 'minilm' is a text encoder (input_ids, attention_mask -> embeddings) with no causal-LM head" in \
        " ".join(res.output.split())


def test_w4a16_generation_runs_on_a_two_layer_slice(smollm2):
    """RTN int4 weights through the same step graph: generation runs and its prefill is the logits model's (every
    position's logits: ``logits="all"``, so the head's GEMM has the logits model's shape and the match is exact)."""
    from tests.conftest import smollm2_slice

    model, tok = smollm2
    sliced = smollm2_slice(model, 2)
    spec = GenerationSpec(max_length=32, max_batch=2, logits="all")
    cm = compile_model(sliced, recipe="w4a16-g64", generation=spec)
    assert cm.graph.op_counts().get("dequantize", 0) >= 14
    prompts = [tok(p).input_ids for p in PROMPTS[:2]]
    out = cm.generate(prompts, 8, stop_tokens=())
    assert [len(t) for t in out.tokens] == [8, 8]
    logits_model = compile_model(sliced, recipe="w4a16-g64")
    ids = torch.tensor([prompts[0]])
    n = ids.shape[1]
    step = CausalLMStep(sliced.model)
    prefill = cm.runner(ids, torch.arange(n)[None], *step.empty_cache(1, n))[0]
    torch.testing.assert_close(prefill, logits_model(ids), rtol=0, atol=0)


STEP_POSITIONS = """
import torch
from conftest import tiny_llama
from lowbit.api import compile_model
from lowbit.generate import GenerationSpec
from lowbit.ir.signature import InputError
from lowbit.models import CausalLMStep

torch.manual_seed(0)
model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, max_positions=64)
cache = CausalLMStep(model).empty_cache(1, 16)
for backend in BACKENDS:
    step = compile_model(model, pipeline="quantize(w=int8)", generation=GenerationSpec(max_length=16, max_batch=2),
                         backend=backend)
    assert step(torch.tensor([[3]]), torch.tensor([[15]]), *[c.clone() for c in cache])[0].shape == (1, 1, 61)
    for bad in (16, -1, 100):
        try:
            step(torch.tensor([[3]]), torch.tensor([[bad]]), *[c.clone() for c in cache])
            raise AssertionError(f"position {bad} ran on {backend}")
        except InputError as exc:
            assert str(exc) == (f"input %positions: position {bad} at (0, 0) is outside the 16 slots of the cache "
                                "input %past_key_values_0_key (positions 0..15)"), str(exc)
"""


def test_a_step_graph_refuses_positions_outside_its_cache(monkeypatch):
    """A step graph called directly with a position past its cache's slots: torch's scatter_ raised an IndexError-like
    RuntimeError naming no input, and the triton backend's fused rotary + cache-write kernel wrote past the buffer
    (under the interpreter the process died: 'mremap_chunk(): invalid pointer'). Now an InputError on every backend,
    before anything runs. Where this process already runs Triton's interpreter (conftest) the triton half runs here,
    its kernels' operand check (``rotary_write_kv_unsupported``) guarded to send a cache row past the buffer to the
    reference op (which raises) and record it, so a regression fails the test instead of taking pytest down; a fresh
    interpreter (its start and imports, ~10 s) only otherwise, as on a GPU machine."""
    import os

    from conftest import run_interpreted

    from lowbit.kernels import decode_step

    checked: list[bool] = []  # per kernel operand check: was a cache row past the buffer asked for
    real = decode_step.rotary_write_kv_unsupported

    def guarded(q, k, v, cos, sin, k_cache, v_cache, index, rotary_dim=None):
        checked.append(bool(((index < 0) | (index >= k_cache.shape[2])).any()))
        return "a cache row past the buffer (the test's guard)" if checked[-1] else real(
            q, k, v, cos, sin, k_cache, v_cache, index, rotary_dim)

    monkeypatch.setattr(decode_step, "rotary_write_kv_unsupported", guarded)
    here = ("torch", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("torch",)
    exec(compile(f"BACKENDS = {here!r}\n" + STEP_POSITIONS, "step_positions", "exec"), {})
    if "triton" in here:
        assert checked and not any(checked), checked  # the good step reached the kernels; no bad one was asked
    else:
        run_interpreted("BACKENDS = ('triton',)\n" + STEP_POSITIONS + "print('ok')")


def test_cli_generate_refuses_a_backend_before_reading_a_lowbit_directory(tmp_path, monkeypatch):
    """A misspelt or unavailable backend was exit 3 ("cannot be read") for a lowbit-format directory (its load raised
    the BackendError) and exit 2 for every other MODEL; now exit 2 for all, before anything is read."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    (tmp_path / "model.lowbit").write_text("not read")
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "hi", "-b", "tritn"])
    assert res.exit_code == 2 and "unknown backend 'tritn' (did you mean 'triton'?)" in res.output, res.output
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "hi", "-b", "triton"])
    assert res.exit_code == 2 and "backend 'triton' cannot run here" in res.output, res.output


def test_cli_generate_streams_and_reports_speed(capsys):
    """`lowbit generate` streams the prompt and its new tokens and reports prefill, tokens/s and peak memory (read
    on the --stop-token run below: a generation of its own only for them was one more compile of the slice)."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    res = CliRunner().invoke(app, ["generate", "minilm", "--prompt", "hi"])
    assert res.exit_code == 2 and "no causal-LM head" in res.output
    res = CliRunner().invoke(app, ["generate", "smollm2:2", "--prompt", "hi there", "-n", "40", "--max-length", "32"])
    assert res.exit_code == 2 and "--max-length" in res.output
    # --stop-token and --backend reach generate(): stopping at the first free token, through ONNX Runtime
    free = CliRunner().invoke(app, ["generate", "smollm2:2", "--prompt", "The capital of France is", "-n", "4",
                                    "--max-length", "32", "--stop-token", "-1", "-b", "onnxruntime"])
    assert free.exit_code == 0 and "; 4 new tokens;" in free.output, free.output
    tokens = compile_model("smollm2:2", generation=GenerationSpec(max_length=32, max_batch=1)).generate(
        ["The capital of France is"], 4, stop_tokens=()).tokens[0]
    res = CliRunner().invoke(app, ["generate", "smollm2:2", "--prompt", "The capital of France is", "-n", "4",
                                   "--max-length", "32", "--stop-token", str(tokens[1])])
    assert res.exit_code == 0 and "; 2 new tokens;" in res.output, (tokens, res.output)
    assert res.output.startswith("The capital of France is")
    assert "prefill" in res.output and "tokens/s" in res.output and "peak memory" in res.output
    res = CliRunner().invoke(app, ["generate", "smollm2:2", "--prompt", "hi", "-b", "tritn"])
    assert res.exit_code == 2 and "'triton'" in res.output, res.output
    # a failing pass is reported as `lowbit compile` reports it (exit 4, the pass and the layer), not a traceback
    res = CliRunner().invoke(app, ["generate", "smollm2:2", "--pipeline",
                                   "prune-heads(ratio=0.9,calib_n=2,calib_len=32)", "--prompt", "hi"])
    assert res.exit_code == 4, res.output
    assert "prune-heads" in res.output and "model.layers.0" in res.output and "--reproducer" in res.output


def test_cli_generate_error_after_the_echoed_prompt_starts_a_line(monkeypatch):
    """An error while generating (after the prompt was streamed) is printed on a line of its own, not glued to the
    prompt text."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app
    from lowbit.generate import GenerationError

    class Broken:
        def generate(self, *args, **kwargs):
            raise GenerationError("the decode step ran out of cache")

    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: Broken())
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi there", "-n", "2"])
    assert res.exit_code == 2, res.output
    assert res.stdout == "hi there\n" and "error: the decode step ran out of cache" in res.stderr, res.output


class _StreamsTokens:
    """Stands in for ``lowbit.api.compile_model``'s result in the CLI tests: ``generate`` streams ``tokens`` to every
    prompt through ``on_token`` and returns them (decoded as ``text`` where given, as Generator's output is); ``calls``
    keeps each call's prompts and keyword arguments."""

    def __init__(self, tokens: list[int], text: str | None = None) -> None:
        self.tokens, self.text = tokens, text
        self.calls: list[tuple[list[list[int]], dict]] = []

    def generate(self, ids: list[list[int]], n: int, on_token=None, **kwargs) -> GenerationOutput:
        self.calls.append((ids, kwargs))
        for b in range(len(ids)):
            for t in self.tokens:
                on_token(b, t)
        texts = None if self.text is None else [self.text] * len(ids)
        return GenerationOutput([self.tokens] * len(ids), [len(p) for p in ids], 0.01, 0.01, len(self.tokens) - 1,
                                texts=texts)


def _compile_to_streamed(monkeypatch, tokens: list[int], text: str | None = None) -> _StreamsTokens:
    """``lowbit.api.compile_model`` patched to return a ``_StreamsTokens`` of ``tokens``, which is returned."""
    import lowbit.api

    model = _StreamsTokens(tokens, text)
    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: model)
    return model


def test_cli_generate_streams_characters_split_over_tokens(monkeypatch):
    """SmolLM2's byte-level BPE splits "😀" and "日本語" over several tokens whose prefixes decode to U+FFFD: the
    stream printed those and then nothing for the completed character ("\ufffd" for "😀"); it now holds them back."""
    from typer.testing import CliRunner

    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    tok = load_tokenizer("smollm2")
    made = tok("😀日本語").input_ids
    _compile_to_streamed(monkeypatch, made)
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "-n", str(len(made))])
    assert res.exit_code == 0, res.output
    assert res.stdout == "hi😀日本語\n", res.stdout


def test_cli_generate_refuses_bad_requests_before_compiling(monkeypatch):
    """-n, --max-length, --max-batch and the sampling flags are checked before the compile (they failed only after
    it, minutes on a large model, the message glued to the echoed prompt), and --max-batch 0 is refused, not read
    as unset."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the request")

    monkeypatch.setattr(lowbit.api, "compile_model", no_compile)
    for flags, needle in [(["-n", "0"], "--max-new-tokens 0"), (["-n", "40", "--max-length", "32"], "--max-length"),
                          (["--max-batch", "0"], "--max-batch 0"), (["--sample", "--temperature", "0"], "temperature"),
                          (["--sample", "--top-p", "1.5"], "--top-p 1.5"),
                          (["--sample", "--seed", str(2**70)], "must fit in 64 bits"),  # refused after the compile
                          # as `lowbit compile` parses them (an unknown pass was a traceback, a bad option exit 4)
                          (["--pipeline", "kv-cach(bits=4)"], "did you mean 'kv-cache'"),
                          (["--pipeline", "kv-cache(bits=3)"], "bits=3")]:
        res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi there", *flags])
        assert res.exit_code == 2 and needle in res.output, (flags, res.output)
        assert not res.output.startswith("hi there"), res.output


@pytest.mark.parametrize("recipe", [None, "w4a16-g64"])
def test_onnxruntime_generation_matches_the_torch_reference(smollm2, recipe):
    """The same step graph exported to ONNX (past_key_values in, present out; the cache write is ScatterElements,
    rotary the opset-23 RotaryEmbedding, int4 linears MatMulNBits) runs generation in ONNX Runtime with the torch
    backend's greedy tokens."""
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.generate import Generator
    from tests.conftest import smollm2_slice

    model, tok = smollm2
    torch_cm = compile_model(smollm2_slice(model, 2), recipe=recipe, generation=GenerationSpec(max_length=40,
                                                                                               max_batch=2))
    graph = torch_cm.graph
    runner = OrtCompiled(graph, device="cpu", weight_format="matmulnbits" if recipe else "qdq")
    names = [i.name for i in runner.session.get_inputs()]
    assert names[:3] == ["input_ids", "positions", "past_key_values_0_key"]
    assert [o.name for o in runner.session.get_outputs()][:2] == ["logits", "present_0_key"]
    if recipe is not None:
        assert sum(n.op_type == "MatMulNBits" for n in runner.onnx_model.graph) == 14
    assert sum(n.op_type == "RotaryEmbedding" for n in runner.onnx_model.graph) == 4  # q and k of 2 layers
    prompts = [tok(p).input_ids for p in PROMPTS[:2]]
    ort_tokens = Generator(runner, graph.meta["generation"], "cpu").generate(prompts, 12, stop_tokens=()).tokens
    assert ort_tokens == torch_cm.generate(prompts, 12, stop_tokens=()).tokens
    if recipe is None:  # an exported file carries the generation meta: lowbit.export.load(path) generates alone
        import tempfile

        import lowbit

        with tempfile.TemporaryDirectory() as d:
            path = lowbit.export(torch_cm, Path(d) / "step.onnx")
            loaded = lowbit.export.load(path, tokenizer=tok)
            assert loaded.generate(PROMPTS[:2], 12, stop_tokens=()).tokens == ort_tokens
            assert loaded.generate(prompts, 12).tokens == torch_cm.generate(prompts, 12).tokens  # the EOS ids kept


@pytest.mark.slow
def test_onnxruntime_float32_greedy_keeps_the_torch_tokens_for_64_new_tokens(smollm2):
    """The bound on ONNX Runtime vs torch greedy drift at float32: every one of 64 new tokens agrees, for each of four
    prompts (4 x 64 tokens on the 2-block SmolLM2; measured so in session 36), and the step's teacher-forced logits
    along them differ by at most 1e-5 of their largest (on two 72-token WikiText-2 windows: 6.1e-5 of 80).

    In bfloat16 they do not keep 64 tokens and are not expected to (README, "bfloat16 models run on ONNX Runtime's
    CPU provider in float32"): the same four prompts part at new tokens 50, 34, 56 and 51, each where the float32
    logits of the bf16 weights hold a near-tie (the two picks 0.04-0.09 apart) that both bf16 runs' own error
    (torch 0.51, ORT 0.25 on logits of ~80) covers; torch in bf16 parts from that float32 computation as early."""
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.generate import Generator
    from tests.conftest import smollm2_slice

    model, tok = smollm2
    cm = compile_model(smollm2_slice(model, 2), generation=GenerationSpec(max_length=80, max_batch=4))
    prompts = [tok(p).input_ids for p in PROMPTS + ["The history of the Roman Empire"]]
    want = cm.generate(prompts, 64, stop_tokens=()).tokens
    ort = Generator(OrtCompiled(cm.graph, device="cpu"), cm.graph.meta["generation"], "cpu")
    assert ort.generate(prompts, 64, stop_tokens=()).tokens == want
    full = compile_model(smollm2_slice(model, 2), generation=GenerationSpec(max_length=80, max_batch=4,
                                                                           logits="all"))
    seqs = [p + t for p, t in zip(prompts, want)]
    ids = torch.tensor([s[:min(map(len, seqs))] for s in seqs])
    ref = Generator(full.runner, full.graph.meta["generation"], "cpu").prefill_logits(ids)
    got = Generator(OrtCompiled(full.graph, device="cpu"), full.graph.meta["generation"], "cpu").prefill_logits(ids)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("backend, recipe", [("torch", None), ("triton", "w4a16-g64")])
def test_decode_step_captures_in_a_cuda_graph_with_the_same_tokens(smollm2, backend, recipe):
    """On CUDA the decode step runs as a captured CUDA graph (nothing in the step may sync with the host: the input
    checks skip the id-range read while capturing); greedy tokens equal the CPU reference's."""
    from tests.conftest import smollm2_slice

    model, tok = smollm2
    sliced = smollm2_slice(model, 2, torch.bfloat16)
    spec = GenerationSpec(max_length=48, max_batch=2)
    prompts = [tok(p).input_ids for p in PROMPTS[:2]]
    gpu = compile_model(sliced, recipe=recipe, generation=spec, backend=backend, device="cuda",
                        backend_options={"compile": False} if backend == "triton" else None)
    out = gpu.generate(prompts, 8, stop_tokens=())
    assert [len(t) for t in out.tokens] == [8, 8]
    if backend == "torch":
        ref = compile_model(sliced, generation=spec).generate(prompts, 8, stop_tokens=())
        assert sum(a == b for x, y in zip(out.tokens, ref.tokens) for a, b in zip(x, y)) >= 14  # bf16 near-ties


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_cuda_graph_is_captured_at_the_second_sighting_with_the_same_tokens(backend):
    """A prefill shape seen twice is captured (padded to its 64-token bucket) and replayed from then on: the
    greedy tokens of the eager, the capturing and the replayed prefills all equal the CPU reference's (float32,
    batch 2 with different prompt lengths), and a third shape past ``prefill_graphs=1`` drops the older graph."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, layers=2, vocab=1000, max_positions=160)
    spec = GenerationSpec(max_length=150, max_batch=2, prefill_graphs=1)
    prompts = [[5, 17, 300, 42, 7, 9], [11, 800, 3]]
    cpu = compile_model(model, generation=spec).generate(prompts, 16, stop_tokens=()).tokens
    gpu = compile_model(model, generation=spec, device="cuda", backend=backend,
                        backend_options={"compile": False} if backend == "triton" else None)
    gen = gpu._step_generator()
    for n in range(3):
        assert gpu.generate(prompts, 16, stop_tokens=()).tokens == cpu, n
        assert len(gen._prefill_graphs) == (n > 0) and gen.prefill_graph_error is None
    assert next(iter(gen._prefill_graphs)) == (2, 64)
    longer = [list(range(1, 90)), [3, 4]]
    want = compile_model(model, generation=spec).generate(longer, 8, stop_tokens=()).tokens
    for _ in range(2):
        assert gpu.generate(longer, 8, stop_tokens=()).tokens == want
    assert list(gen._prefill_graphs) == [(2, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_prefill_cuda_graph_is_captured_at_the_second_sighting_with_the_same_tokens(backend):
    """The packed cache's prefill (kv-cache) is captured as the float cache's: its prompts of different lengths
    left-padded to their 64-token bucket together (``_padded_runner``). The greedy tokens of the eager
    (prompts of each length apart), the capturing and the replayed prefills all equal the CPU reference's (float32,
    batch 2, then an 89-token prompt past the float window beside a 2-token one), and a third shape past
    ``prefill_graphs=1`` drops the older graph."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, layers=2, vocab=1000, max_positions=160)
    spec = GenerationSpec(max_length=150, max_batch=2, prefill_graphs=1)
    pipeline = "kv-cache(bits=4,window=16,k_block=16,v_group=16,sink=1)"
    prompts = [[5, 17, 300, 42, 7, 9], [11, 800, 3]]
    cpu = compile_model(model, pipeline=pipeline, generation=spec)
    want = cpu.generate(prompts, 16, stop_tokens=()).tokens
    gpu = compile_model(model, pipeline=pipeline, generation=spec, device="cuda", backend=backend,
                        backend_options={"compile": False} if backend == "triton" else None)
    gen = gpu._step_generator()
    assert gen.kv is not None
    for n in range(3):
        assert gpu.generate(prompts, 16, stop_tokens=()).tokens == want, n
        assert len(gen._prefill_graphs) == (n > 0) and gen.prefill_graph_error is None, gen.prefill_graph_error
    assert next(iter(gen._prefill_graphs)) == (2, 64)
    longer = [list(range(1, 90)), [3, 4]]
    want = cpu.generate(longer, 8, stop_tokens=()).tokens
    for _ in range(2):
        assert gpu.generate(longer, 8, stop_tokens=()).tokens == want
    assert list(gen._prefill_graphs) == [(2, 128)]


@pytest.mark.gpu
def test_cuda_graph_decode_with_the_row_write_and_argmax_kernels_keeps_the_cpu_tokens():
    """On CUDA the step writes its keys/values through ``write_cache_rows`` and the greedy graph picks tokens with
    ``row_argmax`` (one Triton launch each): a float32 model's greedy tokens, batch 2 with different prompt lengths,
    equal the CPU reference's (no SmolLM2 needed)."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, layers=2, vocab=1000, max_positions=64)
    spec = GenerationSpec(max_length=40, max_batch=2)
    prompts = [[5, 17, 300, 42, 7, 9], [11, 800, 3]]
    gpu = compile_model(model, generation=spec, device="cuda").generate(prompts, 16, stop_tokens=())
    cpu = compile_model(model, generation=spec).generate(prompts, 16, stop_tokens=())
    assert gpu.tokens == cpu.tokens


def test_step_graph_writes_every_cache_input_in_place():
    """The decode step overwrites each donated cache buffer instead of copying it: a cache input also read for its
    shape (the attention mask's length) must not cost a copy of a whole layer's cache per step."""

    torch.manual_seed(0)
    cm = compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=97, max_positions=64),
                       generation=GenerationSpec(max_length=16, max_batch=1))
    gm = cm.runner.gm
    cache = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("past_key_values")]
    assert len(cache) == 4
    for ph in cache:
        writes = [u for u in ph.users if "scatter" in str(u.target) or "index_copy" in str(u.target)]
        assert [str(u.target) for u in writes] == ["lowbit.scatter_into.default"], (ph.name,
                                                                                    [str(u.target) for u in ph.users])
    ids, pos = torch.tensor([[5, 7, 9]]), torch.arange(3).view(1, 3)
    bufs = [torch.zeros(1, 2, 16, 16) for _ in range(4)]
    out = cm.runner(ids, pos, *bufs)
    assert all(o.data_ptr() == b.data_ptr() for o, b in zip(out[1:], bufs))
    assert all(b[:, :, :3].abs().sum() > 0 and b[:, :, 3:].abs().sum() == 0 for b in bufs)


def test_compiled_step_writes_the_cache_without_copying_it():
    """Under torch.compile the cache write stays in place: Inductor's code for the step has no ``copy_`` back into
    a cache input (functionalizing ``aten.scatter_`` made a fresh cache plus a whole-cache copy per layer per step,
    measured on the H200), and the compiled step's logits and cache equal the eager step's."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    cm = compile_model(tiny_llama(), generation=GenerationSpec(max_length=16, max_batch=1))
    ids, pos = torch.tensor([[5, 7, 9]]), torch.arange(3).view(1, 3)
    eager = [torch.zeros(1, 1, 16, 16) for _ in range(2)]
    ref = cm.runner(ids, pos, *eager)
    bufs = [torch.zeros(1, 1, 16, 16) for _ in range(2)]
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(cm.runner.gm), ids, pos, *bufs)
    writes = [line for src in code for line in src.splitlines() if "lowbit.scatter_into.default(" in line]
    # each write goes straight into its cache input, not into a fresh buffer copied back afterwards
    assert len(writes) == 2, writes
    assert all(w.strip().startswith("torch.ops.lowbit.scatter_into.default(arg") for w in writes), writes
    torch.testing.assert_close(out[0], ref[0])
    assert all(o.data_ptr() == b.data_ptr() for o, b in zip(out[1:], bufs))
    for b, e in zip(bufs, eager):
        torch.testing.assert_close(b, e)


def test_last_logits_is_the_last_row_of_every_positions_logits(smollm2):
    """The default step graph (``last-logits``) computes the final norm and the head on the last position only: on a
    real float64 SmolLM2 slice its logits are the last row of the every-position graph's to float64 rounding, and
    the caches it writes are bit-identical; a left-padded batch of different prompt lengths gives each prompt's own
    greedy tokens (the pad columns' cache slots are never read)."""
    from tests.conftest import smollm2_slice

    model, tok = smollm2
    sliced = smollm2_slice(model, 2, torch.float64).model
    last = compile_model(sliced, generation=GenerationSpec(max_length=32, max_batch=3))
    every = compile_model(sliced, generation=GenerationSpec(max_length=32, max_batch=3, logits="all"))
    rec = {r.name: r for r in last.report.pipeline.records}["last-logits"]
    assert rec.changed and "last-logits" not in {r.name for r in every.report.pipeline.records}
    assert last.graph.outputs[0].tensor_type.shape[1:] == (1, 49152)
    step = CausalLMStep(sliced)
    ids = torch.tensor([tok(PROMPTS[2]).input_ids] * 2)
    n = ids.shape[1]
    pos = torch.arange(n).expand(2, n).contiguous()
    out_l = last.runner(ids, pos, *step.empty_cache(2, n))
    out_a = every.runner(ids, pos, *step.empty_cache(2, n))
    assert out_l[0].shape == (2, 1, 49152) and out_a[0].shape == (2, n, 49152)
    # float64 rounding only: the one-row GEMMs sum in another order (measured 9e-14 of logits up to 75)
    assert (out_l[0] - out_a[0][:, -1:]).abs().max().item() <= 1e-12 * out_a[0].abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(out_l[1:], out_a[1:]))
    from lowbit.instruments import (
        compare_outputs,  # debug compare: the reference's last rows against [B, 1, V]
    )

    assert compare_outputs(out_a[0], out_l[0]) == compare_outputs(out_a[0][:, -1:], out_l[0])
    prompts = [tok(p).input_ids for p in PROMPTS]
    batched = last.generate(prompts, 6, stop_tokens=()).tokens
    assert batched == [last.generate([p], 6, stop_tokens=()).tokens[0] for p in prompts]
    assert batched == every.generate(prompts, 6, stop_tokens=()).tokens


def test_last_logits_refuses_a_graph_without_a_norm_and_head_ending(minilm_graph):
    """A graph whose first output is not a causal LM's ``norm -> head`` (a sentence embedder) is refused, naming
    the output and the ops the walk found."""
    from lowbit.passes.base import PassError
    from lowbit.passes.last_logits import LastLogits

    with pytest.raises(PassError, match=r"found no final norm behind the graph's first output %\w+ \(walked "):
        LastLogits().run(minilm_graph.clone())


def test_last_logits_takes_an_unraised_module_only_if_it_is_row_wise():
    """Behind the head, a module of one activation input is taken as an unraised norm only if its ops keep rows apart:
    one that averages over positions (dim 1) would give other rows after the slice, so the pass refuses it."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.base import PassError
    from lowbit.passes.last_logits import LastLogits

    ir = """graph g(%h: f32[2,3,4]) {
  param @lm_head.weight: f32[8,4]
  %m: f32[2,1,4] = aten.mean.dim(%h, [1], True)  # model.pool
  %t: f32[2,3,4] = aten.sub.Tensor(%h, %m)  # model.pool
  %logits: f32[2,3,8] = linear(%t, @lm_head.weight)  # lm_head
  return %logits
}"""
    with pytest.raises(PassError, match=r"found no final norm .*aten.sub.Tensor \(model.pool\)"):
        LastLogits().run(parse_graph(ir, {"lm_head.weight": torch.randn(8, 4)}))
    row_wise = ir.replace("[1], True", "[-1], True").replace("f32[2,1,4] = aten.mean", "f32[2,3,1] = aten.mean")
    g = parse_graph(row_wise, {"lm_head.weight": torch.randn(8, 4)})
    assert LastLogits().run(g).changed and g.outputs[0].tensor_type.shape == (2, 1, 8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=9), min_size=1, max_size=6))
def test_left_padding_ends_every_prompt_in_the_last_column(prompts):
    """``left_padded``: each row holds its prompt in its last n columns at positions 0..n-1 (so the last column is
    every prompt's last token), its pads at the positions n..L-1 (each slot written once: a permutation of 0..L-1),
    so no real token's mask (slot <= position) reaches a pad's slot."""
    from lowbit.generate import left_padded

    ids, pos = left_padded(prompts)
    longest = max(len(p) for p in prompts)
    assert ids.shape == pos.shape == (len(prompts), longest)
    for b, p in enumerate(prompts):
        n = len(p)
        assert ids[b, longest - n:].tolist() == p and ids[b, -1].item() == p[-1]
        assert pos[b, longest - n:].tolist() == list(range(n))
        assert sorted(pos[b].tolist()) == list(range(longest))
        assert all(q >= n for q in pos[b, : longest - n].tolist())  # pads sit past every real position


def test_dynamic_rope_scaling_is_refused_by_name():
    """Dynamic NTK RoPE branches on the sequence length: capture failed with a data-dependent-guard error and a
    page of FX graph, with or without generation; it is refused naming the rope type and the alternatives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.ir.capture import CaptureError

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg).eval()
    for generation in (None, GenerationSpec(max_length=16)):
        with pytest.raises(CaptureError, match=r"rope_type 'dynamic'.*linear, llama3, yarn"):
            compile_model(model, generation=generation)


def test_perplexity_runs_through_a_logits_all_step_graph(tiny_compiled):
    """The README's 'GenerationSpec(logits="all") keeps every position's logits, e.g. for perplexity through the
    step graph': perplexity() called the step with the ids alone and failed ('the model takes 6 inputs'). It now runs
    each batch as a prefill over a fresh cache, and equals the logits model's perplexity; a last-logits step is
    refused by name."""
    from lowbit.eval import perplexity
    from lowbit.models import load_smollm2_tokenizer

    torch.manual_seed(0)
    model = tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, vocab=49152, max_positions=64)
    tok = load_smollm2_tokenizer()
    cm = compile_model(model, generation=GenerationSpec(max_length=32, max_batch=2, logits="all"))
    kw = dict(seq_len=32, max_windows=3, tokenizer=tok, progress=False)
    ref = perplexity(CausalLMLogits(model), "wikitext2-test", **kw)
    for batch_size in (1, 2):
        got = perplexity(cm, "wikitext2-test", batch_size=batch_size, **kw)
        assert got.n_predicted == ref.n_predicted == 3 * 31
        assert got.ppl == pytest.approx(ref.ppl, rel=1e-5), batch_size
    with pytest.raises(GenerationError, match=r"input_ids \(1, 48\) do not fit the step graph.*max_length=32"):
        perplexity(cm, "wikitext2-test", **{**kw, "seq_len": 48})
    with pytest.raises(GenerationError, match=r"last position only.*GenerationSpec\(\.\.\., logits='all'\)"):
        perplexity(tiny_compiled, "wikitext2-test", **kw)  # a generation step: logits="last"


@pytest.mark.parametrize("do_sample", [False, True])
def test_non_finite_logits_are_named_with_their_step(do_sample):
    """Greedy decoding on NaN logits returned tokens without a word (torch's argmax: the first NaN's index), and
    sampling named the sequence but not the step. A step runner whose logits turn NaN at position 4 for sequence 1
    (prompt of 3: its 3rd new token, decode step 2), or +inf at the prefill, is refused by sequence and step."""
    from lowbit.generate import Generator

    vocab = 11

    def runner(ids, positions, k, v):
        logits = torch.nn.functional.one_hot((ids + 1) % vocab, vocab).double()
        logits[1:2][positions[1:2] == 4] = float("nan")
        return logits, k, v

    meta = {"max_length": 16, "max_batch": 2, "cache_dtype": "float32", "n_layers": 1, "kv_heads": 1, "head_dim": 4}
    gen, how = Generator(runner, meta), dict(do_sample=do_sample, stop_tokens=(), **({"temperature": 1e-3} if
                                                                                   do_sample else {}))
    with pytest.raises(GenerationError, match=r"sequence 1: the model's logits at decode step 2 \(its new token 3\) "
                                              r"are not finite .* 2 tokens were made before it"):
        gen.generate([[1, 2, 3, 4], [1, 2, 3]], 6, **how)
    assert gen.generate([[1, 2, 3, 4], [1, 2, 3]], 2, **how).tokens == [[5, 6], [4, 5]]  # before the NaN: as ever

    def inf_runner(ids, positions, k, v):
        return torch.full((*ids.shape, vocab), float("inf")), k, v

    with pytest.raises(GenerationError, match=r"sequence 0: the model's logits at the prefill \(its first new token\)"):
        Generator(inf_runner, meta).generate([[1, 2]], 3, **how)


def test_a_cache_longer_than_the_models_positions_is_refused_before_capture(monkeypatch):
    """GenerationSpec(max_length=) above the model's max_position_embeddings was captured and run: positions the
    model never saw, drifting logits, no word. It is refused naming both numbers, before the capture;
    ``generation=True`` (the defaults, 512) takes the model's length where it is shorter."""
    import lowbit.api

    model = tiny_llama(max_positions=24)
    captures: list[object] = []
    monkeypatch.setattr(lowbit.api, "capture", lambda *a, **k: captures.append(a) or 1 / 0)
    with pytest.raises(GenerationError, match=r"GenerationSpec.max_length=40 is longer than the model's "
                                              r"max_position_embeddings=24 \(LlamaForCausalLM's config\).*"
                                              r"give max_length <= 24"):
        compile_model(model, generation=GenerationSpec(max_length=40, max_batch=1))
    assert captures == []
    monkeypatch.undo()
    assert compile_model(model, generation=True).graph.meta["generation"]["max_length"] == 24


def test_generation_and_the_default_example_read_the_models_positions_through_one_helper(monkeypatch):
    """The generation spec's check, the step graph's ``max_positions`` and the default example's sequence range
    each read ``config.max_position_embeddings`` by hand beside ``api.model_positions`` (what calibration checks
    against), so the four could disagree: a config with max_position_embeddings=1 (no usable limit for
    model_positions) failed the default capture with torch's bare 'min must be <= max, got min=2, max=1'. All read
    model_positions now."""
    import lowbit.api

    with torch.no_grad():
        graph = compile_model(tiny_llama(max_positions=1)).graph
    assert graph.symbols["s1"].max == 8192  # no usable limit: the default range, as model_positions says
    model = tiny_llama(max_positions=24)
    monkeypatch.setattr(lowbit.api, "model_positions", lambda m: 16)
    with pytest.raises(GenerationError, match=r"max_length=20 is longer than the model's max_position_embeddings=16"):
        compile_model(model, generation=GenerationSpec(max_length=20, max_batch=1))
    step = compile_model(model, generation=GenerationSpec(max_length=16, max_batch=1)).graph
    assert step.meta["generation"]["max_positions"] == 16


def test_step_graph_nodes_name_the_layer_they_came_from(tiny_compiled):
    """The step's own code (head reshapes, rotary, cache scatters, attention, residual adds) was captured under the
    wrapper's root: module '' in every layer, so per-layer reports and the IR text could not name the layer. They
    carry the modules the logits graph's capture gives the same ops, and the cache writes their attention's."""
    from lowbit.ir.capture import capture

    step = tiny_compiled.graph
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=97, max_positions=64)
    logits = capture(CausalLMLogits(model).eval(), (torch.ones(1, 4, dtype=torch.long),))
    for op in ("attention", "rotary", "residual_add", "transpose"):
        assert sorted(n.module for n in step.find(op)) == sorted(n.module for n in logits.find(op)), op
    writes = [n.module for n in step.nodes if n.op == "aten.scatter.src"]
    assert writes == [f"model.layers.{i}.self_attn" for i in (0, 0, 1, 1)]
    norms = [p for p, n in enumerate(step.nodes) if n.op == "rms_norm"]  # the first layer's input norm .. final norm
    unplaced = [f"%{n.name} ({n.op})" for n in step.nodes[norms[0]:norms[-1]] if not n.module]
    assert not unplaced, unplaced


def test_generation_refusals_are_lowbit_errors():
    """README: every deliberate refusal is a ``lowbit.errors.LowbitError``. ``GenerationError`` was a bare
    ValueError, so ``except LowbitError`` around ``compile_model(..., generation=...)`` let a bad spec, or a model
    with no head to generate with, escape as if it were a lowbit bug."""
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="max_length=1"):
        GenerationSpec(max_length=1)
    with pytest.raises(LowbitError, match="lm_head"):
        compile_model(tiny_llama().model, generation=True)


def test_compiled_generate_shows_the_generator_options():
    """``help(compiled.generate)`` is where a user looks for the sampling options README names (do_sample, top_k,
    top_p, seed): ``CompiledModel.generate`` took ``**kwargs`` and hid them all. It now has
    ``Generator.generate``'s own parameters, same defaults, and hands every one on."""
    import inspect

    from lowbit.api import CompiledModel
    from lowbit.generate import Generator

    ours = list(inspect.signature(CompiledModel.generate).parameters.values())
    theirs = list(inspect.signature(Generator.generate).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
    seen: dict = {}

    class Recording:
        def generate(self, *args, **kwargs):
            seen.update(kwargs, args=args)

    model = CompiledModel(None, None, None)  # type: ignore[arg-type]
    model.graph = type("G", (), {"meta": {"generation": {}}})()
    model._generator = Recording()
    model.generate([[1, 2]], 3, do_sample=True, top_k=5, top_p=0.9, seed=7, stop_tokens=(), temperature=0.5)
    assert seen == {"args": ([[1, 2]], 3), "attention_mask": None, "do_sample": True, "temperature": 0.5, "top_k": 5,
                    "top_p": 0.9, "seed": 7, "stop_tokens": (), "stop": None, "on_token": None}


@pytest.mark.parametrize("value", ["false", 0, None])
def test_generation_spec_cuda_graph_takes_a_bool(value):
    """``GenerationSpec(cuda_graph="false")`` was kept as the string, which is truthy: decode steps were replayed from
    CUDA graphs as if True had been given, and a lowbit checkpoint's strict meta refused it only when saving."""
    with pytest.raises(GenerationError, match=f"GenerationSpec.cuda_graph={value!r}: must be True or False"):
        GenerationSpec(cuda_graph=value)
    assert GenerationSpec(cuda_graph=np.bool_(False)).cuda_graph is False


def test_cli_generate_names_the_models_positions_before_compiling(tmp_path, monkeypatch):
    """On a model of 32 positions, a prompt + -n past them was told to raise --max-length, which compile_model then
    refused, after the model load, as 'GenerationSpec.max_length=... give max_length <= 32'. Both are said by flag,
    naming max_position_embeddings, before any compile."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    torch.manual_seed(0)
    tiny_llama(vocab=49152, max_positions=32).save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the request")

    monkeypatch.setattr(lowbit.api, "compile_model", no_compile)
    prompt = " ".join(["word"] * 30)
    n = len(load_tokenizer("smollm2")(prompt).input_ids)
    for flags, needle in [(["-n", "8"], f"prompt 0 has {n} tokens + --max-new-tokens 8 = {n + 8} > the model's "
                                        "max_position_embeddings=32: shorten the prompt or lower --max-new-tokens"),
                          (["-n", "2", "--max-length", "60"], "--max-length 60: model ")]:
        res = CliRunner().invoke(app, ["generate", str(tmp_path / "tiny"), "--prompt", prompt, *flags])
        assert res.exit_code == 2 and needle in res.output, (flags, res.output)


@pytest.fixture(scope="module")
def tiny_lowbit_dir(tmp_path_factory):
    """A tiny Llama's step graph (max_length 16, max_batch 1) saved in lowbit's format with SmolLM2's tokenizer."""
    import lowbit
    from lowbit.calibration.data import load_tokenizer

    torch.manual_seed(0)
    cm = compile_model(tiny_llama(vocab=49152), tokenizer=load_tokenizer("smollm2"),
                       generation=GenerationSpec(max_length=16, max_batch=1))
    directory = tmp_path_factory.mktemp("lowbit") / "gen"
    lowbit.save(cm, directory, format="lowbit")
    return directory


def test_cli_generate_on_a_lowbit_directory_says_its_limits_are_fixed(tiny_lowbit_dir):
    """A request past a saved step graph's max_length/max_batch was told to recompile with generation=GenerationSpec(
    max_batch=3) '(CLI: --max-batch)', and --max-batch is refused on a lowbit directory: it now says the limits are
    the directory's and what to change."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    for flags in (["--prompt", "a", "--prompt", "b"], ["--prompt", "a", "-n", "20"]):
        res = CliRunner().invoke(app, ["generate", str(tiny_lowbit_dir), *flags])
        assert res.exit_code == 2, res.output
        assert "compiled lowbit directory whose step graph was captured with max_length=16, max_batch=1" in res.output
        assert "compile the original model again" in res.output and "GenerationSpec" not in res.output, res.output


def test_an_empty_prompt_is_named_with_what_generation_needs(tiny_compiled, monkeypatch):
    """``--prompt ''`` (SmolLM2's tokenizer adds no BOS: no tokens) and an empty id list were 'prompt 1 is empty': the
    CLI now names the text and why it is empty, generate() what it needs."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app

    with pytest.raises(GenerationError, match="prompt 1 is empty: generation continues a prompt of at least one token"):
        tiny_compiled.generate([[5], []], 2)
    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: 1 / 0)
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "--prompt", ""])
    assert res.exit_code == 2 and "--prompt '' encodes to no tokens" in res.output, res.output


def test_transformers_streamer_and_stop_strings_name_what_lowbit_takes(tiny_compiled):
    """``streamer=`` and ``stop_strings=`` (transformers' generate) were refused as a bare "generate() has no option":
    they now name on_token= and stop=, and on_token streams each token as it is made."""
    with pytest.raises(GenerationError, match=r"no option 'streamer': give on_token="):
        tiny_compiled.generate([[5, 17]], 2, streamer=object())
    with pytest.raises(GenerationError, match=r"no option 'stop_strings': use stop="):
        tiny_compiled.generate([[5, 17]], 2, stop_strings=["\n"])
    seen: list[tuple[int, int]] = []
    out = tiny_compiled.generate([[5, 17]], 3, stop_tokens=(), on_token=lambda b, t: seen.append((b, t)))
    assert seen == [(0, t) for t in out.tokens[0]]


def test_cli_generate_reports_a_lowbit_directorys_load_time(tiny_lowbit_dir, monkeypatch):
    """A lowbit directory is loaded before the timed build, which then returned it at once: the summary said
    'compile 0.0 s (loaded from the lowbit directory)' however long the load took. It now says 'load' and its time."""
    import re
    import time

    from typer.testing import CliRunner

    import lowbit.checkpoint
    from lowbit.cli.main import app

    real = lowbit.checkpoint.load
    monkeypatch.setattr(lowbit.checkpoint, "load", lambda *a, **k: time.sleep(0.5) or real(*a, **k))
    res = CliRunner().invoke(app, ["generate", str(tiny_lowbit_dir), "--prompt", "hi", "-n", "2"])
    assert res.exit_code == 0, res.output
    took = re.search(r"\bload (\d+\.\d) s \(loaded from the lowbit directory\)", res.output)
    assert took and float(took.group(1)) >= 0.5, res.output


def test_cli_generate_refuses_a_stop_token_outside_the_vocabulary_before_compiling(monkeypatch):
    """--stop-token 999999 was refused by generate() after the compile and the prefill (minutes on a large model),
    below the echoed prompt; the model's config gives its vocabulary size before either."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app

    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: 1 / 0)
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "--stop-token", "2", "--stop-token",
                                   "999999"])
    assert res.exit_code == 2, res.output
    assert "--stop-token 999999 is outside the model's vocabulary (49152 ids: 0..49151)" in res.output, res.output


def test_the_step_launched_after_every_sequence_stopped_is_not_counted(tiny_compiled):
    """A step is launched before the previous one's tokens are read, so the step after the last stop made nothing;
    it was counted ('decode 1 steps, 0.0 tokens/s' when the first token was a stop token)."""
    free = tiny_compiled.generate([[5, 6, 7]], 4, stop_tokens=()).tokens[0]
    assert len(free) == 4
    first = tiny_compiled.generate([[5, 6, 7]], 4, stop_tokens=[free[0]])
    assert first.tokens == [[free[0]]] and first.decode_steps == 0
    assert free[1] != free[0]
    second = tiny_compiled.generate([[5, 6, 7]], 4, stop_tokens=[free[1]])
    assert second.tokens == [free[:2]] and second.decode_steps == 1
    whole = tiny_compiled.generate([[5, 6, 7]], 4, stop_tokens=())
    assert whole.decode_steps == 3  # max_new_tokens reached: no step launched past it


def test_generation_output_timings_hold_the_runs_timings(tiny_compiled):
    """``GenerationOutput.timings`` was a field nothing filled (always {}); it holds the run's timings."""
    out = tiny_compiled.generate([[5, 6, 7], [8, 9]], 3, stop_tokens=())
    t = out.timings
    assert t["prefill_seconds"] == out.prefill_seconds > 0 and t["decode_seconds"] == out.decode_seconds > 0
    assert t["decode_steps"] == out.decode_steps == 2
    assert t["prefill_tokens_per_second"] * out.prefill_seconds == pytest.approx(5)  # the prompts' tokens, no padding
    assert t["decode_tokens_per_second"] * out.decode_seconds == pytest.approx(4)  # two tokens each after prefill's


def test_cli_generate_quiet_prints_the_text_only():
    """`lowbit generate` had no -q: the calibration bars ('calibrate: 67%|...' with \\r updates), transformers'
    loading bar and the timings line always printed. -q leaves the streamed text alone."""
    from transformers.utils import logging as hf_logging
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    args = ["generate", "smollm2:2", "--prompt", "The capital of France is", "-n", "3", "--max-length", "32",
            "--pipeline", "smooth-quant(calib_n=1,calib_len=8),quantize(w=int8,a=int8)"]
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        res = CliRunner().invoke(app, [*args, "-q"])
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The capital of France is") and res.output.count("\n") == 1, res.output
    assert "\r" not in res.output and "calibrate" not in res.output and "prefill" not in res.output


def test_phi3_longrope_generation_recomputes_the_cache_where_its_rotary_switches():
    """Phi-3 longrope (the 128k models) rotates with its long frequencies once a forward's largest position reaches
    original_max_position_embeddings; the keys cached before were rotated with the short ones, so transformers'
    Phi-3 prefills again at that step. The step graph switched frequencies but kept the old keys: the tokens after
    the switch differed from transformers' without a word. Greedy tokens of left-padded batches crossing the
    switch during decode and reaching it at the first decode step equal transformers' batched ``generate``."""
    from conftest import tiny_phi3_longrope

    hf = tiny_phi3_longrope()
    with torch.no_grad():  # sharper logits than the init's: greedy ties would not test anything
        for p in hf.parameters():
            p.mul_(4)
    cm = compile_model(hf, generation=GenerationSpec(max_length=32, max_batch=2))
    assert cm.graph.meta["generation"]["rope_switch"] == 16
    for prompts in ([list(range(1, 10)), [5, 6, 7]], [list(range(1, 17))]):
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=10, min_new_tokens=10,
                               do_sample=False)[:, longest:].tolist()
        assert cm.generate(prompts, 10, stop_tokens=()).tokens == want, [len(p) for p in prompts]


def test_a_longrope_batch_that_straddles_the_switch_on_a_packed_cache_is_refused():
    """A longrope step takes its frequencies by the largest position of its input: a batched decode step by the
    batch's, but the packed cache (kv-cache) prefills each prompt alone. A 9- and a 3-token prompt generating 10
    tokens made a last token that was neither transformers' batched nor its single-prompt one (the shorter prompt
    rotated both ways); it is refused, naming the step. One prompt at a time keeps transformers' tokens, and a batch
    that never reaches the switch, or of one length, still generates together."""
    from conftest import tiny_phi3_longrope

    from lowbit.generate import left_padded

    hf = tiny_phi3_longrope()
    with torch.no_grad():  # sharper logits than the init's: greedy ties would not test anything
        for p in hf.parameters():
            p.mul_(4)
    cm = compile_model(hf, pipeline="kv-cache(bits=8,v_group=8)", generation=GenerationSpec(max_length=32,
                                                                                            max_batch=2))
    long, short = list(range(1, 10)), [5, 6, 7]
    with pytest.raises(GenerationError, match="prompts of 3 and 9 tokens, decode step 7 would rotate the shorter"):
        cm.generate([long, short], 10, stop_tokens=())
    for p in (long, short):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert cm.generate([p], 10, stop_tokens=()).tokens == [want[0, len(p):].tolist()]
    assert len(cm.generate([long, short], 7, stop_tokens=()).tokens) == 2  # the batch stays before position 16
    both = cm.generate([short, [9, 9, 9]], 15, stop_tokens=()).tokens  # one length: crosses the switch together
    assert both == [cm.generate([p], 15, stop_tokens=()).tokens[0] for p in (short, [9, 9, 9])]
    # where prefills are captured, a longrope model's packed prefill stays eager: pads would move its frequencies
    gen = cm._step_generator()
    gen._captures_prefills = lambda: True
    for _ in range(2):
        assert gen._prefill_graph(*left_padded([long, short])) is None and not gen._prefill_seen


def test_an_onnx_longrope_step_exported_before_rope_switch_is_refused(tmp_path):
    """An exported longrope step graph whose metadata has no ``rope_switch`` (written before it was recorded) ran
    ``generate`` past the switch with keys rotated by the short frequencies: other tokens than the compile's, without
    a word. An ONNX file has no config to recompute it from, so its load is refused by the node that reads the
    largest position. A step whose cache ends at the switch records it now too, so only old files lack it."""
    import onnx
    from conftest import tiny_phi3_longrope

    import lowbit.export as lx

    cm = compile_model(tiny_phi3_longrope(), generation=GenerationSpec(max_length=16, max_batch=1))
    assert cm.graph.meta["generation"]["rope_switch"] == 16  # not reachable, recorded all the same
    path = lx.export(cm, tmp_path / "step.onnx")
    want = cm.generate([[3, 4, 5]], 4, stop_tokens=()).tokens
    assert lx.load(path).generate([[3, 4, 5]], 4, stop_tokens=()).tokens == want
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == lx.GENERATION_KEY:
            meta = json.loads(prop.value)
            del meta["rope_switch"]
            prop.value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(LowbitError, match="node 'model.rotary_emb/.*ReduceMax' takes the largest of the 'positions' "
                       "input.*no 'rope_switch'.*Export the compiled model again"):
        lx.load(tmp_path / "old.onnx")


def _bf16_greedy_equals_transformers(config_class: str, kv_heads: int) -> CompiledModel:
    """A tiny one-layer bfloat16 model of ``transformers.<config_class>`` (weights x4: sharper logits than the
    init's, so greedy ties would not test anything) compiled for generation: a left-padded batch's greedy tokens
    equal transformers' ``generate``. Returns the compiled model."""
    import transformers as t

    torch.manual_seed(0)
    cfg = getattr(t, config_class)(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=256,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = t.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4)
    cm = compile_model(hf, generation=GenerationSpec(max_length=16, max_batch=2))
    prompts = [[5, 17, 30, 42, 7], [11, 80]]
    got = cm.generate(prompts, 6, stop_tokens=()).tokens
    for p, tokens in zip(prompts, got):
        with torch.no_grad():  # no eos, as stop_tokens=(): min_new_tokens would forbid eos, a token lowbit can pick
            want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=6, eos_token_id=None, do_sample=False)[0, len(p):].tolist()
        assert tokens == want
    return cm


def test_olmo2_in_bfloat16_generates_transformers_tokens():
    """OLMo 2's rotary hands float32 cos/sin to a bfloat16 model and its ``apply_rotary_pos_emb`` casts the rotated
    queries and keys back; the step kept them float32, so attention ran in float32 and generation failed in the
    bfloat16 o_proj ("expected m1 and m2 to have the same dtype"). The step rotates in the queries' dtype: greedy
    tokens of a left-padded batch equal transformers'."""
    _bf16_greedy_equals_transformers("Olmo2Config", kv_heads=2)


def test_olmo_in_bfloat16_compiles_for_generation_with_last_logits():
    """OLMo's non-parametric LayerNorm in half precision is cast -> layer_norm -> cast back; ``last-logits`` walked
    from the head to the trailing cast (``aten.to.dtype``, not a row-wise op to it) and refused the whole compile
    ("found no final norm behind the graph's first output"). The cast is row-wise: the head reads the last row
    (logits [B, 1, V]) and a left-padded batch's greedy tokens equal transformers'."""
    cm = _bf16_greedy_equals_transformers("OlmoConfig", kv_heads=4)
    assert cm.graph.outputs[0].tensor_type.shape[1] == 1


def test_a_kv_accuracy_model_is_refused_with_its_packed_cache_pipeline():
    """Generation refuses ``quantize(kv=...)`` (the prefill accuracy model) for the packed cache; the advice was
    "append kv-cache(bits=4) (the kv4 layout)" whatever the scheme: the kv2 recipe was pointed at 4-bit codes and
    w4a4kv4's per-token keys at a layout that does not compute them. The refusal now gives the pipeline with the
    kv options dropped and the kv-cache pass that computes the same scheme, or says what differs; on a tiny
    model the advised cache's decode logits are the refused accuracy model's."""
    from lowbit.api import refuse_for_generation
    from lowbit.passes.manager import parse_pipeline
    from lowbit.recipes import get_recipe

    def advice(pipeline: str) -> str:
        with pytest.raises(GenerationError, match="modelled for prefill only") as e:
            refuse_for_generation(parse_pipeline(pipeline))
        return str(e.value)

    assert "is pipeline='smooth-quant(search=true,require_sites=false),quantize(w=int8,a=int8),kv-cache(bits=2," \
           "v_group=16,window=64)'" in advice(get_recipe("w8a8kv2"))
    assert "does not compute this pass' kv scheme (k_gran=per_token (the packed cache's is per_channel)" in \
           advice(get_recipe("w4a4kv4"))
    refused = "quantize(w=int8,kv=int4,kv_group=8,kv_window=8)"
    text = advice(refused)
    pipeline = text.split("pipeline='")[1].split("'")[0]
    assert pipeline == "quantize(w=int8),kv-cache(k_block=8,v_group=8,window=8,sink=0)", text
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=1, vocab=97, max_positions=64)
    cm = compile_model(model, pipeline=pipeline, generation=GenerationSpec(max_length=24, max_batch=1))
    prompt = [5, 17, 30, 42, 7, 9]
    tokens = cm.generate([prompt], 16, stop_tokens=()).tokens[0]
    acc = compile_model(model, pipeline=refused)
    want = acc(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
    assert want.argmax(-1).tolist() == tokens


def test_cli_generate_takes_backend_options(monkeypatch):
    """`lowbit generate -b onnxruntime` ran int4 linears as QDQ and ORT with all its threads, with no way to say
    otherwise: generate had no --backend-option (compile has). It now takes them, checks them with the backend's
    options before the model is read (exit 2 naming the option) and hands them to the compile."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app
    from lowbit.generate import GenerationOutput

    seen = {}

    class Made:
        def generate(self, ids, n, **kwargs):
            return GenerationOutput([[5] * n], [len(ids[0])], 0.01, 0.01, n - 1)

    def compile_model(*args, **kwargs):
        seen.update(kwargs)
        return Made()

    monkeypatch.setattr(lowbit.api, "compile_model", compile_model)
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "-n", "2", "-b", "onnxruntime",
                                   "--backend-option", "weight_format=matmulnbits", "--backend-option", "threads=1"])
    assert res.exit_code == 0, res.output
    assert seen["backend"] == "onnxruntime" and seen["backend_options"] == {"weight_format": "matmulnbits",
                                                                            "threads": "1"}
    seen.clear()
    for flags, needle in [(["--backend-option", "weight_format=nbits"], "weight_format"),
                          (["--backend-option", "threads"], "expected KEY=VALUE")]:
        res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "-b", "onnxruntime", *flags])
        assert res.exit_code == 2 and needle in res.output and not seen, (flags, res.output)


def test_decode_speed_is_nan_when_no_decode_step_ran(tiny_compiled):
    """max_new_tokens=1 (prefill makes the only token) reported decode_tokens_per_second 0.0, and so did a batch
    whose every sequence stopped at its first token: zero tokens over the host's bookkeeping time, a speed of
    nothing measured. Both are NaN; a run with decode steps keeps its speed."""
    import math

    one = tiny_compiled.generate([[5, 6, 7]], 1)
    assert one.decode_steps == 0 and math.isnan(one.decode_tokens_per_second)
    first = one.tokens[0][0]
    stopped = tiny_compiled.generate([[5, 6, 7]], 4, stop_tokens=[first])
    assert stopped.tokens == [[first]] and stopped.decode_steps == 0
    assert math.isnan(stopped.timings["decode_tokens_per_second"])
    run = tiny_compiled.generate([[5, 6, 7]], 3, stop_tokens=())
    assert run.decode_steps == 2 and run.decode_tokens_per_second > 0


@pytest.mark.parametrize("steps, made, prompt_len, wanted", [
    (1, 2, 1, "prefill 10.0 ms for 1 token; decode 1 step, 100.0 tokens/s (10.0 ms/step, batch 1); 2 new tokens;"),
    (0, 1, 3, "prefill 10.0 ms for 3 tokens; no decode step (prefill made every token); 1 new token;"),
    (2, 3, 2, "prefill 10.0 ms for 2 tokens; decode 2 steps, 200.0 tokens/s (5.0 ms/step, batch 1); 3 new tokens;"),
])
def test_cli_generate_report_counts_agree_in_number(monkeypatch, steps, made, prompt_len, wanted):
    """The timings line said "decode 1 steps", "1 new tokens" and "for 1 tokens"; each count now agrees with its
    noun."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app
    from lowbit.generate import GenerationOutput

    class Scripted:
        def generate(self, ids, n, on_token=None, **kwargs):
            tokens = list(range(30, 30 + made))
            for t in tokens:
                on_token(0, t)
            return GenerationOutput([tokens], [prompt_len], 0.01, 0.01, steps)

    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: Scripted())
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "-n", "4"])
    assert res.exit_code == 0, res.output
    assert wanted in " ".join(res.stderr.split()), res.stderr


def _sentencepiece_style_tokenizer():
    """A word-level tokenizer with SentencePiece's Metaspace pre-tokenizer and decoder (Llama 2, Mistral): a text's
    first word decodes without its leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁and", ".",
             "▁Hi"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("prompts", [["The capital of France is"], ["The capital of France is", "Hi"]])
def test_cli_generate_keeps_the_space_a_sentencepiece_decoder_strips(tmp_path, monkeypatch, prompts):
    """A SentencePiece tokenizer decodes the new tokens alone without their first word's leading space, so
    `lowbit generate` printed "The capital of France isParis." (streamed, and in a batch); the new text is now
    what the tokens add after the prompt's."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    tok = _sentencepiece_style_tokenizer()
    torch.manual_seed(0)
    tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, layers=1, vocab=16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    made = tok.convert_tokens_to_ids(["▁Paris", "."])
    assert tok.decode(made) == "Paris."  # the stripped space this is about
    _compile_to_streamed(monkeypatch, made, tok.decode(made, skip_special_tokens=True))
    flags = [f for p in prompts for f in ("--prompt", p)]
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), *flags, "-n", "2", "--max-length", "16"])
    assert res.exit_code == 0, res.output
    if len(prompts) == 1:
        assert res.stdout == "The capital of France is Paris.\n", res.stdout
    else:
        assert res.stdout == "The capital of France is Paris.\n\nHi Paris.\n\n", res.stdout


def test_cli_generate_sizes_the_cache_for_a_prompt_longer_than_its_default(monkeypatch):
    """Without --max-length, a 600-word prompt was refused ('> the cache's max_length=512: compile with
    GenerationSpec(max_length=605) (CLI: --max-length)'), a number the command could choose itself: the default cache
    now holds the longest prompt + -n where 512 does not."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.cli.main import app
    from lowbit.generate import GenerationOutput

    specs = []

    class Scripted:
        def generate(self, ids, n, on_token=None, **kwargs):
            return GenerationOutput([[13] * n for _ in ids], [len(p) for p in ids], 0.01, 0.01, n - 1)

    def compiled(*args, generation=None, **kwargs):
        specs.append(generation)
        return Scripted()

    monkeypatch.setattr(lowbit.api, "compile_model", compiled)
    long_prompt = "word " * 600
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", long_prompt, "--prompt", "hi", "-n", "4"])
    assert res.exit_code == 0, res.output
    from lowbit.calibration.data import load_tokenizer

    assert specs[-1].max_length == len(load_tokenizer("smollm2")(long_prompt).input_ids) + 4
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "hi", "-n", "4"])
    assert res.exit_code == 0 and specs[-1].max_length == 512, res.output


def test_cli_generate_chat_wraps_the_prompt_in_the_chat_template(tmp_path, monkeypatch):
    """`lowbit generate` had no way to use the shipped instruct model's chat template, so SmolLM2-Instruct continued
    a question as raw text (greedy: its end-of-turn token at once, an empty answer). --chat sends each prompt as a
    user turn with the assistant's turn opened, prints the question on its line and the answer below; a tokenizer
    without a template is refused by flag."""
    from typer.testing import CliRunner

    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    tok = load_tokenizer("smollm2")
    scripted = _compile_to_streamed(monkeypatch, tok("Paris.", add_special_tokens=False).input_ids)
    question = "What is the capital of France?"
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--chat", "--prompt", question, "-n", "4"])
    assert res.exit_code == 0, res.output
    templated = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")
    assert [ids for ids, _ in scripted.calls] == [[tok(templated, add_special_tokens=False).input_ids]]
    assert res.stdout == f"{question}\nParis.\n", res.stdout
    torch.manual_seed(0)
    tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, layers=1, vocab=16).save_pretrained(tmp_path / "m")
    _sentencepiece_style_tokenizer().save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "--chat", "--prompt", "Hi", "-n", "2"])
    assert res.exit_code == 2 and "--chat: model" in res.output and "has no chat template" in res.output, res.output


def test_cli_generate_reads_prompts_from_files_and_stdin(tmp_path, monkeypatch):
    """A long or multi-line prompt had to be quoted onto the command line: --prompt-file reads one (its final line
    end dropped, so it encodes as the same text given by --prompt), '-' from standard input, after the --prompt
    ones; a missing file is named (exit 3) and no prompt at all is refused by flag."""
    from typer.testing import CliRunner

    import lowbit.api
    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app
    from lowbit.generate import GenerationOutput

    seen = []

    class Scripted:
        def generate(self, ids, n, on_token=None, **kwargs):
            seen.append(ids)
            return GenerationOutput([[13] for _ in ids], [len(p) for p in ids], 0.01, 0.01, 0)

    monkeypatch.setattr(lowbit.api, "compile_model", lambda *a, **k: Scripted())
    tok = load_tokenizer("smollm2")
    (tmp_path / "p.txt").write_text("Line one.\nThe capital of France is\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "Hi", "--prompt-file", str(tmp_path / "p.txt"),
                                   "--prompt-file", "-", "-n", "1"], input="From stdin\r\n")
    assert res.exit_code == 0, res.output
    assert seen[-1] == [tok(t).input_ids for t in ("Hi", "Line one.\nThe capital of France is", "From stdin")]
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt-file", str(tmp_path / "nope.txt")])
    assert res.exit_code == 3 and f"--prompt-file {tmp_path / 'nope.txt'}: no such file" in res.output, res.output
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "-n", "2"])
    assert res.exit_code == 2 and "give a prompt: --prompt TEXT or --prompt-file FILE" in res.output, res.output
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")  # named as the file, not as "--prompt ''"
    res = CliRunner().invoke(app, ["generate", "smollm2:1", "--prompt", "Hi", "--prompt-file",
                                   str(tmp_path / "empty.txt")])
    assert res.exit_code == 2 and f"--prompt-file {tmp_path / 'empty.txt'} encodes to no tokens" in res.output, \
        res.output


def test_generate_refusals_count_a_one_token_prompt_in_the_singular(tiny_compiled):
    """check_request said "prompt 0 has 1 tokens + max_new_tokens=40"; its counts now agree with their nouns."""
    with pytest.raises(GenerationError, match=r"prompt 0 has 1 token \+ max_new_tokens=40 = 41 > the cache's"):
        tiny_compiled.generate([[5]], 40)
    with pytest.raises(GenerationError, match=r"prompt 1 has 2 tokens \+ max_new_tokens=31 = 33 > the cache's"):
        tiny_compiled.generate([[5], [6, 7]], 31)


def test_texts_keep_the_leading_space_of_the_new_text(smollm2, compiled):
    """``GenerationOutput.texts`` decoded the new tokens alone: a SentencePiece tokenizer (Llama 2, Mistral) strips
    the first word's leading space there, so "The capital of France is" read "Paris" where the user's text is
    "The capital of France is Paris". Each text is now what the new tokens add to the prompt's decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"▁{w}" for w in "The capital of France is Paris and Hi a b c d e".split())]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(words))
    with torch.no_grad():  # never a special token: every new token is a "▁word", whose space the text must keep
        model.lm_head.weight[:3] = 0.0
        model.lm_head.weight[3:] *= 50.0
    gen = compile_model(model, tokenizer=tok, generation=GenerationSpec(max_length=16, max_batch=2))
    prompts = ["The capital of France is", "Hi"]
    out = gen.generate(prompts, 3, stop_tokens=())
    for text, p, t in zip(out.texts, prompts, out.tokens):
        ids = tok(p).input_ids
        assert text == tok.decode(ids + t, skip_special_tokens=True)[len(p):], (p, t)
        assert text.startswith(" ") and text.split() == [w[1:] for w in tok.convert_ids_to_tokens(t)], text
    # and on SmolLM2 (byte-level BPE, which keeps the space either way): the same definition holds
    _, stok = smollm2
    ids = [stok(p).input_ids for p in PROMPTS]
    real = compiled.generate(ids, 6, stop_tokens=())
    for text, p, t in zip(real.texts, ids, real.tokens):
        head = stok.decode(p, skip_special_tokens=True)
        assert text == stok.decode(p + t, skip_special_tokens=True)[len(head):], text


def _first_stop(tok, prompt: list[int], tokens: list[int], stop: list[str]) -> int:
    """How many of ``tokens`` a sequence keeps under ``stop``: up to the first whose text after the prompt's
    holds a stop string (all of them where none does)."""
    head = tok.decode(prompt, skip_special_tokens=True)
    for k in range(1, len(tokens) + 1):
        if any(s in tok.decode(prompt + tokens[:k], skip_special_tokens=True)[len(head):] for s in stop):
            return k
    return len(tokens)


def test_stop_strings_end_each_sequence_and_are_left_out_of_its_text(smollm2, stop_model):
    """There was no way to stop on text (transformers' ``stop_strings`` was refused: 'give stop_tokens='), and a
    stop such as "\\n\\n" or "return" is no single token. ``stop=`` ends each sequence of a batch on its own once
    its new text contains one: its tokens keep the one that completed it, its text ends before it. (On
    ``CHAINS``' text each prompt stops on another string, "village" completed by the second of its two tokens.)"""
    _, tok = smollm2
    ids = [tok(p).input_ids for p in PROMPTS]
    free = stop_model.generate(ids, 20, stop_tokens=())
    stop = ["answer", "return", "village"]
    assert sum(any(s in t for s in stop) for t in free.texts) >= 2, free.texts  # the run stops at least twice
    out = stop_model.generate(ids, 20, stop_tokens=(), stop=stop)
    for p, whole, got, text in zip(ids, free.tokens, out.tokens, out.texts):
        assert got == whole[:_first_stop(tok, p, whole, stop)]
        full = tok.decode(p + got, skip_special_tokens=True)[len(tok.decode(p, skip_special_tokens=True)):]
        cut = min((full.find(s) for s in stop if s in full), default=len(full))
        assert text == full[:cut] and not any(s in text for s in stop), text
    assert [len(t) for t in out.tokens] != [len(t) for t in free.tokens]
    assert stop_model.generate(ids[:1], 20, stop_tokens=(), stop="answer").tokens == out.tokens[:1]  # one string
    with pytest.raises(GenerationError, match="stop: '' is empty"):
        stop_model.generate(ids[:1], 2, stop=["\n", ""])
    with pytest.raises(GenerationError, match=r"stop: 13 is not a string \(token ids go in stop_tokens=\)"):
        stop_model.generate(ids[:1], 2, stop=[13])
    with pytest.raises(GenerationError, match="no option 'stop_strings': use stop="):
        stop_model.generate(ids[:1], 2, stop_strings=["\n"])


def test_a_stop_string_that_is_a_special_token_ends_the_sequence(smollm2, stop_model):
    """``stop=["<|im_end|>"]`` (the chat template's end of turn) never matched: the text is decoded without special
    tokens, so the run went on to max_new_tokens. Such a stop ends a sequence as that token does; one holding a
    special token among other text could never match and is refused, naming it. (``CHAINS`` ends the chat's
    answer with ``<|im_end|>`` after two tokens and begins another.)"""
    _, tok = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    ids = [tok(chat, add_special_tokens=False).input_ids, tok(PROMPTS[0]).input_ids]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    free = stop_model.generate(ids, 20, stop_tokens=())
    assert im_end in free.tokens[0][:-1], free.texts  # the answer ends its turn, then the model goes on
    out = stop_model.generate(ids, 20, stop_tokens=(), stop=["<|im_end|>", "zzzz"])
    end = free.tokens[0].index(im_end) + 1
    assert out.tokens[0] == free.tokens[0][:end] and out.texts[0] == free.texts[0][:len(out.texts[0])]
    second = out.tokens[1]
    assert second == free.tokens[1][:len(second)] and (im_end in second) == (len(second) < 20)
    with pytest.raises(GenerationError, match=r"stop: 'x<\|im_end\|>' holds the special token '<\|im_end\|>'"):
        stop_model.generate(ids, 2, stop=["x<|im_end|>"])


def test_stop_strings_need_a_tokenizer(tiny_compiled):
    """Without a tokenizer there is no text to look in: said, with the token-id alternative."""
    with pytest.raises(GenerationError, match="this model has no tokenizer.*stop_tokens="):
        tiny_compiled.generate([[5, 6]], 2, stop=["x"])


@pytest.mark.parametrize("prompts", [["The capital of France is"], ["The capital of France is", "Hi"]])
def test_cli_generate_stop_ends_the_printed_text_before_the_stop_string(monkeypatch, prompts):
    """`lowbit generate --stop TEXT`: the printed text ends before the stop string, streamed too, where the start
    of a possible stop ("The" of "The answer") is held back until the next token shows it is none."""
    from typer.testing import CliRunner

    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    tok = load_tokenizer("smollm2")
    scripted = _compile_to_streamed(monkeypatch, tok(" Paris. The answer is", add_special_tokens=False).input_ids)
    flags = [f for p in prompts for f in ("--prompt", p)]
    res = CliRunner().invoke(app, ["generate", "smollm2:1", *flags, "-n", "8", "--stop", "The answer", "--stop",
                                   "zzz"])
    assert res.exit_code == 0, res.output
    assert scripted.calls[-1][1].get("stop") == ["The answer", "zzz"]
    assert res.stdout == "".join(f"{p} Paris. \n" + ("\n" if len(prompts) > 1 else "") for p in prompts), res.stdout
    res = CliRunner().invoke(app, ["generate", "smollm2:1", *flags, "--stop", ""])
    assert res.exit_code == 2 and "--stop '': give the text that ends a sequence" in res.output, res.output


def test_stop_ids_outside_the_vocabulary_are_refused_or_said_before_the_prefill():
    """A stop token past the vocabulary was refused only after every prompt's prefill had run (the logits told the
    vocabulary); a model whose own eos_token_id is past its vocabulary (a config written for another head) was
    silently never stopped. The compiled step graph's logits say the vocabulary: the given id is refused before the
    step graph runs, the model's own is warned of before it, and generation runs on to max_new_tokens."""
    from conftest import tiny_llama

    import lowbit
    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    model = tiny_llama(vocab=61, max_positions=32)
    model.generation_config.eos_token_id = 500
    compiled = lowbit.compile_model(model, generation=GenerationSpec(max_length=16, max_batch=1))
    generator = compiled._step_generator()
    calls = []
    runner = generator.runner
    generator.runner = lambda *args: calls.append(args[0].shape) or runner(*args)
    with pytest.raises(GenerationError, match=r"stop_tokens: 61 is outside the vocabulary \(61 logits"):
        compiled.generate([[3, 4, 5]], 4, stop_tokens=[7, 61])
    assert calls == []
    with pytest.warns(UserWarning, match=r"end-of-sequence id 500 .* outside its vocabulary \(61 logits") as said:
        out = compiled.generate([[3, 4, 5]], 4)
    assert len(out.tokens[0]) == 4 and calls[0] == (1, 3)
    assert "each runs to max_new_tokens" in str(said[0].message)


def test_cli_generate_refuses_a_stop_token_outside_a_lowbit_directorys_vocabulary_up_front(tiny_lowbit_dir):
    """On a compiled lowbit directory the vocabulary was not read (no config): --stop-token past it reached generate()
    below the echoed prompt. The step graph's logits give it, and the flag is a usage error before any prompt."""
    from typer.testing import CliRunner

    import lowbit
    from lowbit.cli.main import app
    from lowbit.generate import logits_vocab

    vocab = logits_vocab(lowbit.load(tiny_lowbit_dir).graph)
    res = CliRunner().invoke(app, ["generate", str(tiny_lowbit_dir), "--prompt", "hi", "-n", "2", "--stop-token",
                                   str(vocab)])
    assert res.exit_code == 2, res.output
    assert f"--stop-token {vocab} is outside the model's vocabulary ({vocab} ids" in res.output, res.output


def test_an_exported_step_graph_refuses_a_stop_token_outside_its_vocabulary_before_the_prefill(tmp_path):
    """lowbit.export.load(step.onnx).generate(stop_tokens=[id past the vocabulary]) ran every prompt's prefill before
    refusing it (only the logits told the vocabulary); the file's logits output declares it, so it is refused first."""
    from conftest import tiny_llama

    import lowbit
    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(vocab=61, max_positions=32),
                                    generation=GenerationSpec(max_length=16, max_batch=1))
    loaded = lowbit.export.load(lowbit.export(compiled, tmp_path / "step.onnx"))
    calls = []
    runner = loaded.generator.runner
    loaded.generator.runner = lambda *args: calls.append(args[0].shape) or runner(*args)
    with pytest.raises(GenerationError, match=r"stop_tokens: 61 is outside the vocabulary \(61 logits"):
        loaded.generate([[3, 4, 5]], 3, stop_tokens=[61])
    assert calls == []
    assert len(loaded.generate([[3, 4, 5]], 3, stop_tokens=()).tokens[0]) == 3 and calls


def test_soft_capped_step_captures_with_its_cache_length_dynamic():
    """Gemma 2's step (soft-capped attention written out: 6 query heads over 2 KV heads) failed to capture on torch
    2.11 with "Constraints violated (slots)": its KV-head repeat (expand + reshape) merged two dims into a stride
    export could not prove for every cache length. Captured once, the step now runs at other batches and cache
    lengths than its example's, with the eager step's logits and cache."""
    import transformers as t

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.Gemma2Config(
        hidden_size=96, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=128, sliding_window=8, pad_token_id=0)).eval()
    step = CausalLMStep(model).eval()
    cm = compile_model(step, generation=GenerationSpec(max_length=64, max_batch=3))
    for batch, slots in ((1, 9), (3, 64)):
        ids = torch.randint(3, 128, (batch, 4))
        pos = torch.arange(5, 9).repeat(batch, 1)
        cache = [torch.randn(batch, 2, slots, 16) for _ in range(4)]
        with torch.no_grad():
            ref = step(ids, pos, [c.clone() for c in cache])
        out = cm.runner(ids, pos, *[c.clone() for c in cache])
        torch.testing.assert_close(out[0], ref[0][:, -1:], rtol=1e-4, atol=1e-4)  # logits="last"
        for got, want in zip(out[1:], ref[1:]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled again is not exported again."""


def test_a_step_guard_on_its_dynamic_dims_is_not_blamed_on_the_caller(monkeypatch):
    """A generation step whose code constrains its batch, tokens or cache slots (Gemma 2's stride guard on the slots
    under torch 2.11) failed with "a dimension you marked dynamic is fixed by the model's code: mark it static or
    widen its range": the caller marked nothing, and GenerationSpec has no such option. The advice now says lowbit
    marks them and what to do, beside the guard itself."""
    import lowbit.models

    rotate_half = lowbit.models._rotate_half

    def branch_on_tokens(x: torch.Tensor) -> torch.Tensor:  # a step whose code branches on its number of tokens
        return rotate_half(x) if x.shape[2] > 2 else rotate_half(x) * 1.0

    monkeypatch.setattr(lowbit.models, "_rotate_half", branch_on_tokens)
    torch.manual_seed(0)
    with pytest.raises(LowbitError) as err:
        compile_model(tiny_llama(), generation=GenerationSpec(max_length=16, max_batch=1))
    msg = str(err.value)
    assert "Constraints violated (tokens)" in msg and "satisfy the generated guard" in msg, msg
    assert "you marked" not in msg and "lowbit, not you, marks the generation step's batch, tokens and cache " \
        "slots dynamic" in msg and "LlamaForCausalLM's step cannot run at every size under torch" in msg and \
        "compile without generation=" in msg, msg


def _sample_by_full_sort(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                         generator: torch.Generator) -> torch.Tensor:
    """The sampling definition ``_sample`` kept until session 43: the nucleus from a full ascending sort per row."""
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[..., -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def test_top_p_sampling_skips_the_full_sort_and_draws_the_same_tokens(smollm2, monkeypatch):
    """Sampling with top_p sorted all 49152 logits of every row each step: ~80 of the ~110 ms a batch-16 SmolLM2
    step's sampling took on one CPU thread. A top-k of the few likely tokens finds the nucleus now (a wider one from
    the tokens at least (1 - top_p) / V likely), and the seeded tokens are those of the sort, on real logits."""
    from lowbit.generate import _sample

    model, tokenizer = smollm2
    prompts = PROMPTS + ["Dear Sir,", "import torch\n", "Q: What is 2+2?\nA:", "The quick brown fox", "My name"]
    with torch.no_grad():
        logits = torch.stack([model(tokenizer(p, return_tensors="pt").input_ids).logits[0, -1] for p in prompts])
    # a narrow nucleus (one top-k), a wide one (a second, of thousands), a half-vocabulary one, with top-k, greedy-like
    for options in [(0.7, None, 0.9), (1.0, None, 0.9), (1.5, None, 0.95), (0.8, 50, 0.9), (1e-40, None, 0.5),
                    (1.0, None, None), (0.7, 20, None)]:
        for seed in range(4):
            want = _sample_by_full_sort(logits, *options, torch.Generator().manual_seed(seed))
            got = _sample(logits, *options, torch.Generator().manual_seed(seed))
            assert torch.equal(got, want), (options, seed, got, want)

    sorted_rows = []

    def no_full_sort(original):
        def sort(self, *args, **kwargs):
            sorted_rows.append(tuple(self.shape))
            return original(self, *args, **kwargs)
        return sort

    monkeypatch.setattr(torch, "sort", no_full_sort(torch.sort))
    monkeypatch.setattr(torch.Tensor, "sort", no_full_sort(torch.Tensor.sort))
    _sample(logits, 0.7, None, 0.9, torch.Generator().manual_seed(0))
    assert not sorted_rows, f"top_p sampling sorted whole rows {sorted_rows}"


def test_top_p_keeps_every_token_tied_with_the_last_one_it_keeps(monkeypatch):
    """The nucleus is the fewest most likely tokens whose probability reaches top_p; where the last one it needs is
    tied with others (float16 logits tie often), all of them stay, as top_k keeps the ties of its k-th: the sort
    kept whichever of the tied tokens it happened to order last."""
    from lowbit.generate import _sample

    logits = torch.tensor([[4.0, 2.0, 2.0, 2.0, 0.0, -1.0]])
    captured = []
    multinomial = torch.multinomial

    def capturing(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        captured.append(probs)
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", capturing)
    _sample(logits, 1.0, None, 0.75, torch.Generator().manual_seed(0))
    probs = logits.double().softmax(-1)[0]
    assert probs[0] < 0.75 < probs[:2].sum()  # the nucleus needs one of the three tied tokens
    kept = probs[:4] / probs[:4].sum()
    want = torch.cat([kept, torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(captured[0][0], want, rtol=1e-12, atol=0)
