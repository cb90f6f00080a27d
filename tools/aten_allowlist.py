"""Print the ops capture emits on SmolLM2, MiniLM and tiny random decoders/encoders that are not yet in
``lowbit.ir.allowlist`` (the ATen overloads and Python functions IR text may name).

Run after a torch/transformers upgrade: every printed op is one capture now produces that a saved ``.lowbit``
file could not be read back with. Review it, then add it to ``ATEN_OPS`` / ``PY_FUNCTIONS`` by hand.

    PYTHONPATH=$PWD python tools/aten_allowlist.py [--no-real]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lowbit.api import _default_example
from lowbit.ir.capture import capture
from lowbit.ir.ops import check_op
from lowbit.models import CausalLMLogits, SentenceEmbedder

DECODERS = {
    "llama": {}, "qwen2": {}, "mistral": {}, "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16},
    "qwen3": {"head_dim": 16}, "olmo": {}, "granite": {}, "phi": {}, "stablelm": {}, "starcoder2": {},
    "phi3": {}, "gpt_neox": {}, "olmo2": {}, "gemma3_text": {"head_dim": 16},
}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def ops_of(model: torch.nn.Module, tokenizer: object = None) -> set[str]:
    """Every op name in the captured IR, raised and unraised, static and dynamic shapes, three dtypes."""
    out: set[str] = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = model.to(dtype)
        example, dynamic = _default_example(m, tokenizer)
        for raise_ops in (True, False):
            for dyn in (dynamic, None):
                out |= {n.op for n in capture(m, example, dyn, raise_ops=raise_ops).nodes}
    return out


def models(real: bool):
    for arch, extra in DECODERS.items():
        torch.manual_seed(0)
        yield arch, CausalLMLogits(AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **SMALL, **extra))
                                   ).eval(), None
    yield "gpt2", CausalLMLogits(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=256))).eval(), None
    from lowbit.models import load_minilm, load_model

    embedder, tok = load_minilm()
    for arch in ("bert", "roberta", "electra"):
        cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=512)
        yield arch, SentenceEmbedder(AutoModel.from_config(cfg)).eval(), tok
    if real:
        yield "minilm", embedder, tok
        smollm2, tok2, _ = load_model("smollm2")
        yield "smollm2", smollm2, tok2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-real", action="store_true", help="tiny random models only (no SmolLM2/MiniLM)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    missing: dict[str, list[str]] = {}
    for name, model, tok in models(not args.no_real):
        for op in sorted(ops_of(model, tok)):
            if check_op(op) is not None:
                missing.setdefault(op, []).append(name)
        print(f"{name}: checked", flush=True)
    for op, where in sorted(missing.items()):
        print(f"missing {op!r}  (emitted on {', '.join(where)})")
    print("allowlist covers every op captured" if not missing else f"{len(missing)} op(s) missing")


if __name__ == "__main__":
    main()
