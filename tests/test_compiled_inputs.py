"""Compiled models check each call against the graph's declared inputs and symbol ranges, the same way on every
backend, with messages that name the input (a 1-layer SmolLM2 slice, captured as compile_model captures it)."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit.api import _default_example, lower
from lowbit.ir.capture import capture
from lowbit.ir.signature import InputError

from conftest import smollm2_slice


@pytest.fixture(scope="module")
def compiled(smollm2):
    wrapper = smollm2_slice(smollm2[0], 1)
    example, dynamic = _default_example(wrapper, smollm2[1])
    graph = capture(wrapper, example, dynamic)
    runners = {"torch": lower(graph, "torch"), "onnxruntime": lower(graph, "onnxruntime")}
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        runners["triton"] = lower(graph, "triton", options={"compile": False})
    return graph, runners


def test_graph_declares_what_the_checks_read(compiled):
    graph, _ = compiled
    (ids,) = graph.inputs
    assert str(ids.type) == "i64[s0,s1]"
    assert (graph.symbols["s0"].max, graph.symbols["s1"].min) == (1024, 2)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("make, fragment", [
    (lambda: torch.ones(1, 2, 8, dtype=torch.long), "input %input_ids (declared i64[s0,s1]): expected 2 dims, got 3"),
    (lambda: torch.ones(1, 0, dtype=torch.long), "dim 1 (s1) is 0, outside the range [1,"),
    (lambda: torch.ones(0, 8, dtype=torch.long), "dim 0 (s0) is 0, outside the range [1, 1024]"),
    (lambda: torch.ones(1025, 2, dtype=torch.long), "dim 0 (s0) is 1025, outside the range [1, 1024]"),
    (lambda: torch.full((1, 8), 49152), "id 49152 at position (0, 0) is outside the vocabulary of embedding "
                                        "@lm_head.weight (49152 rows"),  # tied: capture names it lm_head
    (lambda: torch.tensor([[1, 2, -3, 4]]), "id -3 at position (0, 2)"),
    (lambda: torch.ones(1, 8), "expected dtype torch.int64, got torch.float32"),
    (lambda: [[1, 2, 3]], "expected a tensor, got list"),
    (lambda: torch.ones(1, 8, dtype=torch.long, device="meta"), "input %input_ids (declared i64[s0,s1]): is on the "
                                                                "meta device, which holds shapes but no values"),
])
def test_bad_inputs_are_refused_naming_the_input(compiled, backend, make, fragment):
    """triton's runner did not check at all: an empty sequence was a raw reshape error, an id past the vocabulary
    torch's IndexError, and a sequence beyond the captured range ran."""
    _, runners = compiled
    if backend not in runners:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    with pytest.raises(InputError) as info:
        runners[backend](make())
    assert fragment in str(info.value)


def test_int32_ids_run_the_same_on_every_backend(compiled):
    _, runners = compiled
    ids = torch.randint(0, 49152, (2, 12))
    ref = runners["torch"](ids)
    assert runners["torch"](ids[:1, :1]).shape == (1, 1, 49152)  # batch 1, one token: inside the contract
    for runner in runners.values():
        assert torch.equal(runner(ids.to(torch.int32)), runner(ids))
    torch.testing.assert_close(runners["onnxruntime"](ids.to(torch.int32)), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_inputs_by_name_are_bound_once_each(compiled, backend):
    """An input given by position and again by name ran with the positional one; a missing name was a KeyError
    (onnxruntime too: every runner binds through ``signature.ordered_inputs``)."""
    _, runners = compiled
    if backend not in runners:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    ids = torch.randint(0, 49152, (1, 4))
    runner = runners[backend]
    assert torch.equal(runner(input_ids=ids), runner(ids))
    with pytest.raises(TypeError, match=r"inputs \['input_ids'\] given both by position and by name"):
        runner(ids, input_ids=ids)
    with pytest.raises(TypeError, match="unexpected inputs \\['ids'\\]"):
        runner(ids=ids)


def _tiny_sentence_encoder(tok):
    """A 1-layer random BERT sentence encoder with MiniLM's tokenizer, captured from its default example (ids,
    mask) with their dynamic dims and lowered to torch; returns the runner and that example."""
    from transformers import AutoConfig, AutoModel

    from lowbit.models import SentenceEmbedder

    cfg = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=128)
    model = SentenceEmbedder(AutoModel.from_config(cfg)).eval()
    example, dynamic = _default_example(model, tok)
    return lower(capture(model, example, dynamic), "torch"), example


def test_encoder_inputs_must_agree_on_shared_symbols(minilm):
    runner, (ids, mask) = _tiny_sentence_encoder(minilm[1])
    assert runner(ids, mask).shape == (2, 32)
    with pytest.raises(InputError, match=r"input %attention_mask .*dim 1 \(s1\) is 5, but input %input_ids dim 1"):
        runner(ids, mask[:, :5])
    with pytest.raises(TypeError, match=r"missing inputs \['attention_mask'\]"):  # was KeyError('attention_mask')
        runner(input_ids=ids)


def test_a_static_size_refusal_says_how_to_capture_it_dynamic():
    """compile_model(model, example_inputs) captures every size as given: a ViT compiled on a batch of 2 refused a
    batch of 1 with "the graph takes exactly 2" and no word on how to make the batch vary. The message now gives
    the dynamic_shapes= that does, and that call works."""
    from lowbit.api import compile_model

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.proj(pixel_values).softmax(-1)

    model, x = Head().eval(), torch.randn(2, 4)
    with pytest.raises(InputError) as info:
        compile_model(model, (x,))(x[:1])
    hint = "compile_model(model, example_inputs, dynamic_shapes={'pixel_values': {0: torch.export.Dim.AUTO}})"
    assert "dim 0 is 1, the graph takes exactly 2 (the size it was captured at" in str(info.value)
    assert hint in str(info.value)
    dynamic = compile_model(model, (x,), dynamic_shapes={"pixel_values": {0: torch.export.Dim.AUTO}})
    torch.testing.assert_close(dynamic(x[:1]), model(x[:1]))


def test_python_constant_input_other_than_the_traced_one_is_refused():
    """A bool given at capture (ViT's interpolate_pos_encoding=True) is a constant of the graph: a call with False was
    accepted and silently computed with True. Refused naming the input and the captured value; True still runs."""
    import transformers as tf

    from lowbit.api import compile_model

    torch.manual_seed(0)
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                   image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    c = compile_model(vit, {"pixel_values": x, "interpolate_pos_encoding": True})
    torch.testing.assert_close(c(x, True)[0], vit(x, interpolate_pos_encoding=True).last_hidden_state)
    with pytest.raises(InputError, match=r"input %interpolate_pos_encoding was True at capture.*got False: pass True"):
        c(pixel_values=x, interpolate_pos_encoding=False)


def test_a_model_compiled_from_named_inputs_takes_positions_in_its_forwards_order():
    """compile_model(bert, dict(tokenizer(a, b))) made the graph's inputs in the dict's order (input_ids,
    token_type_ids, attention_mask); BertModel's own positional call (ids, mask, token_type_ids) then fed the mask
    to the token types, both 0/1 int64, and returned other embeddings without an error. The graph now takes its
    inputs in forward's order, so the compiled model is called as the model was."""
    import transformers as tf

    from lowbit.api import compile_model

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_hidden_layers=1, max_position_embeddings=32)).eval()
    ids = torch.randint(1, 64, (2, 9))
    types = torch.tensor([[0] * 5 + [1] * 4, [0] * 3 + [1] * 6])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    c = compile_model(bert, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
    assert [v.name for v in c.graph.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        ref = bert(ids, mask, types).last_hidden_state
    torch.testing.assert_close(c(ids, mask, types)[0], ref)
    torch.testing.assert_close(c(input_ids=ids, token_type_ids=types, attention_mask=mask)[0], ref)


def test_a_bert_tokenizers_token_type_ids_are_refused_saying_why(minilm):
    """A sentence encoder compiled by lowbit takes (input_ids, attention_mask); BERT's own tokenizer also returns
    token_type_ids, and compiled(**tokenizer(texts)) was refused with the bare "unexpected inputs
    ['token_type_ids']". The refusal says why and what to do."""
    runner, (ids, mask) = _tiny_sentence_encoder(minilm[1])
    with pytest.raises(TypeError, match=r"unexpected inputs \['token_type_ids'\]; the model takes \['input_ids', "
                                        r"'attention_mask'\]: a sentence encoder embeds one segment "
                                        r".*compiled\.tokenizer"):
        runner(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert runner(input_ids=ids, attention_mask=mask).shape == (2, 32)
