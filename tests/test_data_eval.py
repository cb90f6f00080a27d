"""Shipped text, the WikiText-2 perplexity protocol, and embedding similarity, on real models."""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch

from lowbit.data import TEXTS, read_text, text_path
from lowbit.eval import EVALS, embedding_similarity, load_sentences, perplexity, run_eval, token_ids, windows
from lowbit.models import CausalLMLogits

WT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WT2_VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"  # lowbit/data/README.md


def test_named_texts_decompress_to_the_sources():
    test = text_path("wikitext2-test")
    assert hashlib.sha256(test.read_bytes()).hexdigest() == WT2_TEST_SHA256
    assert text_path("wikitext2-test") == test  # decompressed once, then reused
    calib = text_path("wikitext2-valid-calib")
    assert calib.stat().st_size == 249_925
    assert read_text(calib).startswith(" \n = Homarus gammarus = \n")
    assert "\r" not in read_text("wikitext2-test")  # text mode: CRLF -> LF
    valid = text_path("wikitext2-valid")  # the whole split, of which the calibration text is the first 249,925 B
    assert hashlib.sha256(valid.read_bytes()).hexdigest() == WT2_VALID_SHA256
    assert valid.read_bytes()[:249_925] == calib.read_bytes()
    assert set(TEXTS) == {"wikitext2-test", "wikitext2-valid-calib", "wikitext2-valid"}


def test_text_path_rejects_missing_empty_and_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.*wikitext2-test"):
        text_path(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        text_path(empty)
    with pytest.raises(ValueError, match="not a file"):
        text_path(tmp_path)
    mine = tmp_path / "mine.txt"
    mine.write_text("my own text\n")
    assert text_path(str(mine)) == mine


def test_wikitext2_test_token_and_window_counts(smollm2):
    _, tokenizer = smollm2
    ids = token_ids("wikitext2-test", tokenizer)
    assert ids.dtype == torch.int64 and ids.shape == (301_948,)
    assert windows(ids, 512).shape == (589, 512)
    assert windows(ids, 2048).shape == (147, 2048)
    assert windows(ids, 512, max_windows=40).shape == (40, 512)
    assert torch.equal(windows(ids, 512)[1], ids[512:1024])  # non-overlapping, in order
    assert torch.equal(token_ids("wikitext2-test", tokenizer), ids)  # cached copy is the same


def test_tokenizer_fingerprint_follows_the_split_not_call_state(smollm2):
    """The token cache's key: a call that leaves truncation and padding set does not change it (the split is the
    same), an added token does (the split changes), and a fresh load of the same files gives the same key."""
    from lowbit.data.model_files import load_smollm2_tokenizer
    from lowbit.data.tokens import tokenizer_fingerprint

    tokenizer = copy.deepcopy(smollm2[1])
    before = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_smollm2_tokenizer()) == before
    tokenizer(["a b c d e f", "g"], truncation=True, max_length=3, padding=True)
    assert tokenizer.backend_tokenizer.truncation is not None and tokenizer.backend_tokenizer.padding is not None
    assert tokenizer_fingerprint(tokenizer) == before
    tokenizer.add_tokens(["zqxjlowbit"])
    assert tokenizer("zqxjlowbit", add_special_tokens=False)["input_ids"] == [len(tokenizer) - 1]
    assert tokenizer_fingerprint(tokenizer) != before


def test_slow_tokenizer_fingerprint_follows_its_settings(tmp_path):
    """A slow (Python) tokenizer's key was its class and vocabulary only: BertTokenizer with do_lower_case=False
    shared cached ids with the lower-casing one, so one of them read the other's split."""
    from transformers import BertTokenizer

    from lowbit.data.tokens import tokenizer_fingerprint

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello", "world"]) + "\n")
    lower, cased = BertTokenizer(str(vocab), do_lower_case=True), BertTokenizer(str(vocab), do_lower_case=False)
    assert lower.tokenize("Hello") != cased.tokenize("Hello")
    assert tokenizer_fingerprint(lower) != tokenizer_fingerprint(cased)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "vocab.txt").write_text(vocab.read_text())
    assert tokenizer_fingerprint(BertTokenizer(str(moved / "vocab.txt"), do_lower_case=True)) == \
        tokenizer_fingerprint(lower)


def test_float_smollm2_perplexity_on_two_windows(smollm2):
    model, tokenizer = smollm2
    logits_fn = CausalLMLogits(model)
    one = perplexity(logits_fn, "wikitext2-test", seq_len=512, max_windows=2, tokenizer=tokenizer, progress=False)
    assert (one.n_windows, one.n_predicted, one.seq_len) == (2, 2 * 511, 512)
    assert math.isfinite(one.ppl) and 10 < one.ppl < 60  # wt2-512x40 is about 29
    assert one.ppl == pytest.approx(math.exp(one.nll_sum / one.n_predicted))
    assert one.seconds_per_window == pytest.approx(one.seconds / 2)

    # batching changes no number; checked on 128-token windows (the same code at a quarter of the tokens: a second
    # pass over the 512-token windows was half this test's time)
    short = perplexity(logits_fn, "wikitext2-test", seq_len=128, max_windows=2, tokenizer=tokenizer, progress=False)
    batched = perplexity(
        logits_fn, "wikitext2-test", seq_len=128, max_windows=2, tokenizer=tokenizer, progress=False, batch_size=2
    )
    assert batched.n_predicted == short.n_predicted == 2 * 127
    assert batched.nll_sum == pytest.approx(short.nll_sum, rel=1e-5)


def test_perplexity_rejects_bad_inputs(smollm2, tmp_path):
    model, tokenizer = smollm2
    short = tmp_path / "short.txt"
    short.write_text("Too short for a window.\n")
    with pytest.raises(ValueError, match="fewer than one window of seq_len=512"):
        perplexity(CausalLMLogits(model), short, tokenizer=tokenizer, progress=False)
    with pytest.raises(TypeError, match=r"logits \[B, L, V\]"):
        perplexity(lambda ids: ids.float(), "wikitext2-test", max_windows=1, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="unknown evaluation 'wt2'.*wt2-512x40"):
        run_eval("wt2", CausalLMLogits(model), tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        perplexity(CausalLMLogits(model), tmp_path / "missing.txt", tokenizer=tokenizer)
    # SmolLM2's byte-level BPE makes tokens of spaces and newlines: a blank file long enough for the windows was
    # scored as if it were text (calibration refused it already)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n" * 4000)
    with pytest.raises(ValueError, match="blank.txt' is whitespace only"):
        perplexity(CausalLMLogits(model), blank, seq_len=64, max_windows=2, tokenizer=tokenizer, progress=False)


@pytest.mark.slow
def test_float_smollm2_wt2_512x40(smollm2):
    model, tokenizer = smollm2
    result = run_eval("wt2-512x40", CausalLMLogits(model), tokenizer, progress=False)
    assert result.n_windows == EVALS["wt2-512x40"]["max_windows"]
    assert result.ppl == pytest.approx(28.74, abs=0.02)  # measured: 28.738


def test_load_sentences_is_deterministic_and_clean():
    sentences = load_sentences(64)
    assert len(sentences) == 64 and len(set(sentences)) == 64
    assert sentences == load_sentences(64)
    assert sentences[0] == "Robert Boulter is an English film , television and theatre actor ."
    for s in sentences:
        assert not s.startswith("=") and "@" not in s and 6 <= len(s.split()) <= 60


def test_embedding_similarity_of_minilm(minilm):
    embedder, tokenizer = minilm
    sentences = load_sentences(32)
    same = embedding_similarity(embedder, embedder, tokenizer, sentences, batch_size=16)
    assert same.n == 32
    assert same.mean_cos == pytest.approx(1.0, abs=1e-6) and same.min_cos == pytest.approx(1.0, abs=1e-6)

    perturbed = copy.deepcopy(embedder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in perturbed.encoder.encoder.layer:
            weight = layer.intermediate.dense.weight
            weight += 0.1 * weight.std() * torch.randn(weight.shape, generator=generator)
    moved = embedding_similarity(embedder, perturbed, tokenizer, sentences, batch_size=16)
    assert 0.5 < moved.min_cos <= moved.mean_cos < 1 - 1e-4

    with pytest.raises(ValueError, match="sentences is empty"):
        embedding_similarity(embedder, embedder, tokenizer, [])
    # past the model's 512 positions a long sentence failed inside the encoder with torch's 'expanded size' error;
    # the tokenizer's limit is all-MiniLM-L6-v2's max_seq_length, 256, where sentence-transformers truncates
    with pytest.raises(ValueError, match=r"max_length=1000 is longer than the tokenizer's model_max_length=256"):
        embedding_similarity(embedder, embedder, tokenizer, ["word " * 700], max_length=1000)


def test_cache_writes_are_all_or_nothing(tmp_path, monkeypatch):
    from lowbit.cache import atomic_dir, atomic_file, cache_dir

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "c"))
    root = cache_dir("x")
    assert root == tmp_path / "c" / "x" and root.is_dir()
    with pytest.raises(RuntimeError), atomic_dir(root / "entry") as tmp:
        (tmp / "half").write_text("written before the crash")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_file(root / "file") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(root.iterdir()) == []  # neither the entries nor their temporaries remain
    with atomic_dir(root / "entry") as tmp:
        (tmp / "whole").write_text("done")
    assert (root / "entry" / "whole").read_text() == "done"


def test_perplexity_of_a_blown_up_model_is_inf_not_an_overflow(smollm2):
    """A model whose logits blew up (mean loss past 709 nats) made perplexity() raise OverflowError from
    math.exp (the debug tools had been fixed alone); it now reports inf, as they do."""
    import math

    from lowbit.eval.perplexity import perplexity, ppl_of

    _, tok = smollm2
    vocab = len(tok)

    def blown(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        logits[..., 0] = 1e4  # every next token but id 0 costs 1e4 nats
        return logits

    r = perplexity(blown, "wikitext2-test", seq_len=16, max_windows=1, tokenizer=tok, progress=False)
    assert r.ppl == math.inf and r.nll_sum > 709 * r.n_predicted
    assert ppl_of(1.0) == math.e and ppl_of(710.0) == math.inf


def test_perplexity_refuses_a_json_text_as_calibration_does(tmp_path, monkeypatch):
    """A .jsonl dataset given as the evaluation text was scored on its records' syntax (braces, keys) without a
    word, where calibration refuses it; perplexity and `python -m lowbit --text` refuse it, naming the file, before
    a model or tokenizer is read."""
    import json

    from lowbit.__main__ import main
    from lowbit.cli.common import Exit

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"The quick brown fox jumps over dog {i}.", "id": i}) + "\n"
                            for i in range(300)))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 49152)

    with pytest.raises(ValueError, match=r"evaluation text '.*eval.jsonl' is JSON: lowbit reads evaluation texts as "
                                         r"plain text.*write their text to a plain text file"):
        perplexity(logits, data, seq_len=16, max_windows=2, progress=False)
    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["--text", str(data), "--pipeline", "dce"]) == int(Exit.NOT_FOUND)


def test_python_m_lowbit_with_a_cli_command_runs_that_command(capsys):
    """``python -m lowbit compile ...`` (how ``python -m pip`` users reach a tool) was the main job's "unrecognized
    arguments: compile"; a first word that is a ``lowbit`` command runs that command with its own output and exit
    codes (``recipes`` lists the recipes; ``compile`` without a model exits 2 as ``lowbit compile`` does), and the
    main job keeps its options (a bad one still exits 2 from its own parser)."""
    from lowbit.__main__ import cli_commands, main
    from lowbit.recipes import RECIPES

    assert {"compile", "generate", "debug", "recipes", "inspect"} <= cli_commands()
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in RECIPES)
    assert main(["compile"]) == 2
    assert "Missing argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-option"])
    assert exc.value.code == 2
