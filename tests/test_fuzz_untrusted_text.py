"""Fuzzing the two texts lowbit reads from users and files: every pipeline text and every IR text either parses
(and, for IR, verifies) or fails with a ``LowbitError`` that says why — never another exception type, which
would be a lowbit bug (exit 1 with a traceback) instead of a refusal."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.ir.parser import parse_graph
from lowbit.ir.verifier import verify
from lowbit.passes.manager import parse_pipeline

from conftest import TINY_IR  # noqa: E402

# the mutations' seed: the tiny graph plus an aten op node, so the fuzzer also reaches the allowlisted-op path
GOLDEN = TINY_IR.replace("  return %r", "  %q: i8[2,s0,4,4] = aten.add.Tensor(%r, 1)\n  return %r")

PIPELINE_WORDS = ["fold-norms", "dce", "constant-fold", "quantize", "gptq", "awq", "smooth-quant", "autoround",
                  "w", "a", "kv", "group", "damp", "alpha", "calib", "keep", "config", "int4", "int8", "fp8e4m3",
                  "true", "false", "none", "64", "-1", "0", "1e9", "nan", "[", "]", ";", "(", ")", ",", "=", "'",
                  '"', " ", "modules", "sites", "norm", "nonfinite", "keep-float", "/etc/passwd", "..", "\x00"]
IR_PIECES = ["torch.os.system", "builtins.eval", "aten.from_file.default", "__import__('os')", "exec(\"1\")",
             "%x", "%y", "@proj.weight", "s0", "s1", "s0//0", "(", ")", "[", "]", ",", "=", ":", "f32", "i64", "q9",
             "sym(", "-1", "99999999999999999999", "1e400", "nan", '"\\q"', "device(\"nope\")", "#", "\n", "}",
             "return", "param", "symbol", " in [", "hint", "?", "%s", "linear(", "aten.add.Tensor(", "-", "*", "+"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIPELINE_WORDS), max_size=14).map("".join) | st.text(max_size=40))
def test_pipeline_text_parses_or_fails_with_a_lowbit_error(text):
    try:
        parse_pipeline(text)
    except LowbitError:
        pass


@st.composite
def mutated_ir(draw):
    """The golden IR with a few pieces replaced, inserted or deleted at random places."""
    text = GOLDEN
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.sampled_from(IR_PIECES) | st.text(max_size=3))
        if kind == "insert":
            text = text[:pos] + piece + text[pos:]
        elif kind == "replace":
            text = text[:pos] + piece + text[pos + draw(st.integers(1, 12)):]
        else:
            text = text[:pos] + text[pos + draw(st.integers(1, 12)):]
    return text


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_ir())
def test_ir_text_parses_and_verifies_or_fails_with_a_lowbit_error(text):
    try:
        graph = parse_graph(text)
        verify(graph, require_data=False)
    except LowbitError:
        pass


@pytest.mark.parametrize("text", [GOLDEN.replace("s0 in [1, 64]", "s0 in [1, x]"),
                                  GOLDEN.replace('eps=1e-06', 'eps="\\q"'),
                                  GOLDEN.replace("compute_dtype=f32", 'compute_dtype=device("nope")'),
                                  GOLDEN.replace("f32[2,s0,8]", "f32[-2,s0,8]"),
                                  GOLDEN.replace("%x: f32", "%x: f32[2], %x: f32"),
                                  # sizes past 64 bits raised torch's TypeError/RuntimeError from the verifier
                                  GOLDEN.replace("f32[2,s0,8]", "f32[99999999999999999999999,s0,8]"),
                                  GOLDEN.replace("hint 4", "hint 99999999999999999999999"),
                                  GOLDEN.replace("[1, 64]", "[1, 99999999999999999999999]"),
                                  GOLDEN.replace("f32[2,s0,8]", "f32[4294967296,4294967296,8]"),
                                  GOLDEN.replace("f32[2,s0,8]", "f32[2,4294967296*4294967296*s0,8]")])
def test_known_parser_corners_are_lowbit_errors(text):
    with pytest.raises(LowbitError):
        verify(parse_graph(text), require_data=False)
