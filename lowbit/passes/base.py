"""The pass contract: a small object with a name and typed options that rewrites a Graph in place.

Like onnx-ir's and torch.fx's passes, ``run`` returns a ``PassResult`` saying whether anything changed and
with statistics; a pass never prints (instruments do). Options are pydantic models, so a pipeline string
``quantize(w=int4,group=64)`` is validated and coerced with messages that name the option — every range is a
constraint on the model, so a bad spec fails when it is parsed, not after capture and calibration.

What a pass declares besides (docs/design.md "Pass contract"):

* ``requires`` / ``ensures`` — ``Condition`` objects on the IR before / after ``run`` (onnx-ir's ``requires`` and
  ``ensures``), checked by the ``PassManager``; a failure names the pass and the nodes.
* ``after`` — passes that must come before this one when both are in a pipeline (``quantize`` after
  ``rotate``, ``fuse-qlinear`` after every quantizing pass); checked when the pipeline is parsed.
* ``undone_by`` — a later pass that would silently undo this one's work (``fold-norms`` folding smooth-quant's
  norm scales back), refused when the pipeline is parsed, with the reason.
* ``creates`` — ops the pass may emit (MLIR's ``dependentDialects``), so a backend that cannot lower one is
  reported before the pipeline runs (``lowbit.api.plan_compile``).
* ``exact`` — the pass must not change the model's outputs: checked in float64 on a real model by
  ``tests/test_pass_contract.py`` for every registered pass that declares it.
* ``precheck`` — refusals of the model itself (its architecture) that the ``PassManager`` asks every pass for
  before the first pass runs, so a late pass does not refuse the model after earlier ones calibrated.
* ``quant_config`` / ``fallback_schemes`` — the Q/DQ schemes the pass writes, from its options alone (checked
  against a backend's quantization rules before capture) and those only the model decides (``group_fallback``'s
  group where ``group`` does not divide a linear's input size; checked on the captured graph before any pass runs).
* ``needs_reference`` — the pass reads the model as it was when the pipeline started (``distill``'s teacher):
  the ``PassManager`` snapshots the graph before the first pass (a structural clone; tensors are shared) and
  hands it to the pass as ``reference`` for its run.
* a ``modules`` scope (``ScopedOptions``) — a regex on module paths limiting what the pass changes, the common
  handle ``debug bisect`` and ``debug sensitivity`` restrict passes with.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowbit.errors import CorruptFileError, LowbitError, unread_options
from lowbit.calibration.data import (
    DEFAULT_CALIBRATION_TEXT,
    calibration_ids,
    calibration_tensor,
    check_default_tokenizer,
    check_tokenizer_matches,
    check_vocabulary,
    given_windows,
    graph_tokenizer,
)
from lowbit.calibration.engine import CalibrationError, resolve_device, static_batch
from lowbit.ir.graph import Graph, Node
from lowbit.ir.qdq import fallback_weights
from lowbit.ir.qscheme import QScheme, QuantConfig


class PassOptions(BaseModel):
    """Base of every pass's options: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def input_files(self) -> list[tuple[str, str]]:
        """(option, path) of every file the pass will read, checked when the pipeline is parsed (before the
        model is loaded): a typo in a path must not cost a model load and a capture."""
        return []

    def unread_message(self, needs: Mapping[str, str | None],
                       note: str = "without that it would be silently ignored") -> str | None:
        """The refusal for options set away from their default that the other options leave unread
        (``quantize(w=int4,kv_window=32)``): the run would succeed with the option silently ignored. ``needs``
        maps an option to ``None`` when it is read, else to what would make it read (``"kv="``); the test is
        ``lowbit.errors.unread_options``, shared with the backends' options."""
        unread = unread_options(self, needs)
        if not unread:
            return None
        (k, why), rest = unread[0], unread[1:]
        more = f" (so would {', '.join(k for k, _ in rest)})" if rest else ""
        return f"option {k}={_fmt(getattr(self, k))} is read only with {why}; {note}{more}"

    def refuse_unread(self, needs: Mapping[str, str | None]) -> None:
        """Raise ``ValueError`` (the parser names the pass) with :meth:`unread_message`'s refusal, if any."""
        message = self.unread_message(needs)
        if message:
            raise ValueError(message)


class ScopedOptions(PassOptions):
    """Options of a pass that can be limited to some modules (the ``modules`` scope every such pass honours)."""

    modules: str = ""
    """Regex searched in module paths: only nodes whose module matches are changed; empty changes every one."""

    @field_validator("modules")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
        return v

    def in_scope(self, module: str) -> bool:
        """Whether a node of ``module`` is inside the scope."""
        return not self.modules or re.search(self.modules, module) is not None


class CalibrationOptions(PassOptions):
    """The calibration data of a pass that runs text through the model block by block (GPTQ, AWQ, AutoRound,
    SmoothQuant, static activation scales): one set of names, defaults and checks for all of them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, arbitrary_types_allowed=True)

    calib: str | torch.Tensor = DEFAULT_CALIBRATION_TEXT
    """Calibration data: a shipped text name, a text file, a ``.safetensors`` file of token ids, or (Python API)
    a tensor of token ids — ``[n, L]`` windows used as they are (the first ``calib_n`` when it is set; a calib_n
    above n is refused), or a 1-D stream cut like a text. A model whose input is float (a ViT's pixels, features)
    takes float inputs ``[n, ...]`` instead (a tensor or a ``.safetensors`` file of one)."""
    calib_n: int = Field(default=32, ge=1)
    """Calibration sequences (the shipped text has 123 windows of 512; give a longer file for more)."""
    calib_len: int = Field(default=512, ge=2)
    """Tokens per calibration sequence; unset, at most the encoder's ``max_seq_length`` where it has one (MiniLM:
    256, the most sentence-transformers feeds it)."""
    tokenizer: str | None = None
    """Tokenizer of the calibration text (``smollm2``, ``minilm`` or a HF tokenizer directory); unset: the one
    ``compile_model`` loaded with the model, else SmolLM2's."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per calibration batch (the engine runs each block on one batch at a time)."""
    progress: bool = True
    """Show the calibration engine's per-block progress bar."""
    device: str | None = None
    """Where calibration runs (``cuda``: block runs and statistics on the GPU); unset: where the params are.
    The graph's params, and what the pass computes for them, stay on their device either way."""

    @field_validator("calib", mode="before")
    @classmethod
    def _calib_path(cls, calib: Any) -> Any:
        """A ``pathlib.Path`` is a file like its string (it was refused as 'Input should be a valid string'); any
        other type is named with what calib takes."""
        if isinstance(calib, os.PathLike):
            return os.fspath(calib)
        if not isinstance(calib, (str, torch.Tensor)):
            raise ValueError(f"calib takes a text name or file path, a .safetensors file of token ids or a tensor "
                             f"of token ids, got {type(calib).__name__}")
        return calib

    @field_validator("calib")
    @classmethod
    def _calib_ids(cls, calib: str | torch.Tensor) -> str | torch.Tensor:
        """A tensor must be integer token ids, ``[n, L]`` windows or a 1-D stream (checked when the pass is built),
        or float model inputs (a model whose input is pixels or features; checked against the graph's input)."""
        if isinstance(calib, torch.Tensor) and not calib.dtype.is_floating_point:
            if calib.dim() == 1 and calib.numel() < 2:  # not 'n=1 were asked (2 tokens)': the user asked for nothing
                raise ValueError(f"a 1-D stream of calibration token ids needs at least 2 ids, got {calib.numel()}")
            given_windows(calib if calib.dim() != 1 else calib[:2], 1, 2, "calib")  # ValueError: dtype or shape
        return calib

    def reads_calibration(self) -> bool:
        """Whether the pass will read ``calib`` with these options (``compile_model(calib=)`` refuses a pipeline
        where none does, which would ignore it)."""
        return True

    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ("calib", "calib_n", "calib_len", "tokenizer", "batch_size", "device")
    """The options that choose the calibration data and where it runs: all unread when ``reads_calibration()`` is
    false (``progress`` is left out: pipelines pass ``progress=false`` to every pass alike)."""

    def data_needs(self, why: str) -> dict[str, str | None]:
        """``refuse_unread``'s entries for :attr:`DATA_OPTIONS`: read when the pass reads data, else refused naming
        ``why`` (the options that would make it read them). A pass whose options make it read no data must say
        so rather than run with ``calib_n=4`` or ``compile_model(calib=)`` silently ignored."""
        read = self.reads_calibration()
        return {k: None if read else why for k in self.DATA_OPTIONS}

    def input_files(self) -> list[tuple[str, str]]:
        from lowbit.data import TEXTS

        files = [] if isinstance(self.calib, torch.Tensor) or self.calib in TEXTS else [("calib", self.calib)]
        if self.tokenizer not in (None, "smollm2", "minilm"):
            files.append(("tokenizer", self.tokenizer))
        return files

    def window_length(self, max_seq_length: int | None) -> int:
        """``calib_len``, or where it was left unset, the model's ``max_seq_length`` when shorter: sentence-
        transformers feeds an encoder at most that many tokens (MiniLM: 256 of its 512 positions), and 512-token
        windows calibrated positions 256-511, which it never reads."""
        if max_seq_length is not None and "calib_len" not in self.model_fields_set and max_seq_length < self.calib_len:
            return max_seq_length
        return self.calib_len

    def calib_len_for(self, graph: Graph) -> int:
        """``window_length`` for ``graph``'s model (its ``max_seq_length``, recorded at capture for an encoder)."""
        return self.window_length((graph.meta.get("source") or {}).get("max_seq_length"))

    def torch_device(self, pass_name: str) -> torch.device | None:
        """``device`` as a torch device (None: where the params are), or a PassError naming the option."""
        try:
            return resolve_device(self.device)
        except CalibrationError as exc:
            raise PassError(f"pass {pass_name}: option device={self.device!r}: {exc}") from None

    def token_ids(self, graph: Graph, pass_name: str) -> torch.Tensor:
        """The ``[calib_n, calib_len]`` calibration windows, tokenized as ``graph``'s model reads text (or the
        token ids given), every id checked against the model's vocabulary."""
        shown = _fmt(self.calib) if isinstance(self.calib, torch.Tensor) else repr(self.calib)
        try:
            given = calibration_tensor(self.calib)
            first = graph.inputs[0].tensor_type if graph.inputs else None
            if first is not None and first.dtype.is_floating_point:
                inputs = _float_inputs(given, graph.inputs[0].name, first, self.calib_n)
                self._check_enough(given.shape[0], "samples")  # type: ignore[union-attr]  # None: refused above
                return inputs
            if given is not None:
                if given.dtype.is_floating_point:
                    raise ValueError(f"calibration token ids must be integers, got {given.dtype} (float inputs "
                                     f"calibrate a model whose input is float; this graph's input "
                                     f"%{graph.inputs[0].name} is {first})")
                ids, source = given_windows(given, self.calib_n, self.calib_len_for(graph), shown), \
                    "the given token ids"
                if given.dim() == 2:  # [n, L] windows are used as given, but not against options the user set
                    ids = self._fit_given_windows(ids)
            else:
                check_default_tokenizer(graph, self.tokenizer)
                tok = graph_tokenizer(graph, self.tokenizer)
                if self.tokenizer is not None:
                    check_tokenizer_matches(tok, graph.meta.get("tokenizer"), self.tokenizer)
                ids = calibration_ids(self.calib, tok, self.calib_n, self.calib_len_for(graph))
                source = f"tokenizer {getattr(tok, 'name_or_path', '') or type(tok).__name__!r}"
            check_vocabulary(ids, graph, source)
            return ids
        except (CorruptFileError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            # the file, not the pipeline: the CLI exits 3 for it, as for a missing one
            raise PassFileError(f"pass {pass_name}: option calib={shown}: {exc}") from None
        except ValueError as exc:
            raise PassError(f"pass {pass_name}: option calib={shown}: {exc}") from None

    def check_text_length(self, tokenizer: Any, pass_name: str, positions: int | None = None,
                          max_seq_length: int | None = None) -> None:
        """Refuse a calibration text too short for ``calib_n`` windows of ``calib_len`` tokens before the model is
        captured (the pass found it after capture and every pass before it had run). ``tokenizer``: the model's
        (the pass' own ``tokenizer=`` wins); nothing is checked without one, nor for given token ids (a tensor or a
        ``.safetensors`` file: checked when the pass reads them). The token ids are cached, so the pass does not
        tokenize the text again. ``positions``: the model's ``max_position_embeddings``, where known; a text's windows
        longer than it are refused too (the pass refused them after the capture). ``max_seq_length``: an encoder's,
        which an unset ``calib_len`` is capped to (``window_length``)."""
        if not self.reads_calibration() or isinstance(self.calib, torch.Tensor) or \
                str(self.calib).endswith(".safetensors"):
            return
        length = self.window_length(max_seq_length)
        if positions is not None and length > positions:
            raise PassError(f"pass {pass_name}: option calib_len={length}: the model takes at most {positions} "
                            f"positions (max_position_embeddings in its config), so windows that long cannot run: "
                            f"give calib_len={positions} or less")
        if self.tokenizer is not None:
            from lowbit.calibration.data import load_tokenizer

            try:  # a directory transformers cannot read was a raw traceback here, before the model was captured
                given = load_tokenizer(self.tokenizer)
            except (OSError, ValueError) as exc:
                raise PassFileError(f"pass {pass_name}: option tokenizer={self.tokenizer!r}: {exc}") from None
            try:
                check_tokenizer_matches(given, tokenizer, self.tokenizer)
            except ValueError as exc:
                raise PassError(f"pass {pass_name}: option tokenizer={self.tokenizer!r}: {exc}") from None
            tokenizer = given
        if tokenizer is None:
            return
        try:
            calibration_ids(self.calib, tokenizer, self.calib_n, self.window_length(max_seq_length))
        except (CorruptFileError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise PassFileError(f"pass {pass_name}: option calib={self.calib!r}: {exc}") from None
        except ValueError as exc:
            raise PassError(f"pass {pass_name}: option calib={self.calib!r}: {exc}") from None

    def _fit_given_windows(self, ids: torch.Tensor) -> torch.Tensor:
        """Given ``[n, L]`` windows under options set explicitly: ``calib_n`` caps the windows taken (the first ones,
        as for float inputs); a ``calib_len`` other than ``L`` is refused. Both were ignored without a word."""
        if "calib_len" in self.model_fields_set and self.calib_len != ids.shape[1]:
            raise ValueError(f"the given windows are {ids.shape[1]} tokens long, but calib_len={self.calib_len} was "
                             "asked; given [n, L] windows are used as they are: drop calib_len, or give a 1-D stream "
                             "of ids to cut")
        self._check_enough(ids.shape[0], "windows")
        return ids[:self.calib_n] if "calib_n" in self.model_fields_set else ids

    def _check_enough(self, given: int, what: str) -> None:
        """Refuse a ``calib_n`` set above the given windows or samples: it was capped to them without a word, where a
        text or 1-D stream too short for it is refused. Unset, the data given is used whole."""
        if "calib_n" in self.model_fields_set and self.calib_n > given:
            raise ValueError(f"calib_n={self.calib_n} was asked, but the given data holds {given} {what}: give "
                             f"calib_n={given} or less (or leave it unset to use them all), or more data")

    def batch_size_for(self, graph: Graph) -> int:
        """``batch_size``, unless ``graph`` was captured with a static batch: it can take no other, so a
        ``batch_size`` set to another is refused, naming both (it was replaced by the static one without a word)."""
        static = static_batch(graph)
        if static is None:
            return self.batch_size
        if "batch_size" in self.model_fields_set and self.batch_size != static:
            first = graph.inputs[0]
            raise PassError(f"option batch_size={self.batch_size}: the graph was captured with a static batch of "
                            f"{static} (%{first.name} {first.tensor_type}: the example inputs' batch), so it "
                            f"calibrates {static} at a time and can take no other batch: give batch_size={static} or "
                            "drop it, or capture with a dynamic batch (compile_model(..., dynamic_shapes=...))")
        return static


def _float_inputs(given: torch.Tensor | None, name: str, expected: Any, n: int) -> torch.Tensor:
    """Calibration inputs of a model that reads floats (pixels, features), not token ids: the given float tensor
    ``[n, ...]`` of the graph's input rank, its first ``n`` rows in the input's dtype."""
    if given is None or not given.dtype.is_floating_point:
        what = "a text" if given is None else f"{given.dtype} token ids"
        raise ValueError(f"the graph's input %{name} is {expected}, not token ids, so {what} cannot calibrate it: "
                         f"give calib= float model inputs [n, {', '.join(str(d) for d in expected.shape[1:])}] (a "
                         "tensor in Python, or a .safetensors file holding one)")
    if given.dim() != expected.rank or given.shape[0] < 1:
        raise ValueError(f"calibration inputs {tuple(given.shape)} do not fit the graph's input %{name} {expected} "
                         f"(rank {expected.rank}, one row per sample)")
    return given[:n].to(expected.dtype)


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """A property of the IR a pass requires or ensures: ``check(graph)`` lists what violates it, each item naming
    a node (``%name (op) in module '...'``); empty means it holds."""

    name: str
    check: Callable[[Graph], list[str]]

    def __call__(self, graph: Graph) -> list[str]:
        return self.check(graph)


def unmet_condition(kind: str, conditions: Sequence[Condition], graph: Graph) -> str | None:
    """``"requires NAME, which does not hold before it runs: <nodes>"`` (``kind`` ``"ensures"``: after it ran) for
    the first of a pass's ``conditions`` that ``graph`` fails, or None: what ``Pass.__call__`` and the
    ``PassManager`` say, each with its own prefix and error type."""
    when = "before it runs" if kind == "requires" else "after it ran"
    for cond in conditions:
        problems = cond(graph)
        if problems:
            from lowbit.ir.verifier import listed

            return f"{kind} {cond.name}, which does not hold {when}: {listed(problems)}"
    return None


def _where(node: Any) -> str:
    return f"%{node.name} ({node.op})" + (f" in module {node.module!r}" if node.module else "")


def no_op(op: str, why: str) -> Condition:
    """No node of ``op`` is in the graph (``why`` says what the pass would get wrong)."""
    return Condition(f"no {op} node ({why})", lambda g: [_where(n) for n in g.nodes if n.op == op])


def _dead_nodes(graph: Graph) -> list[str]:
    live = {id(v) for v in graph.outputs}
    dead = []
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs())
        else:
            dead.append(_where(node))
    return dead[::-1]


NO_DEAD_NODES = Condition("no node whose results nothing reads", _dead_nodes)
WEIGHT_REWRITES = ("rotate", "sparsify", "prune-mlp", "prune-heads", "prune-blocks", "slice-residual", "distill")
WEIGHT_PASSES = ("quantize", "gptq", "awq", "autoround", "smooth-quant", "fold-norms", "tune-qparams", *WEIGHT_REWRITES)
"""Every pass that calibrates or rewrites the model's own linears: the fusion passes (fuse-qlinear, merge-linears,
fuse-norm-quant) run after all of them."""
"""Passes that rewrite float weights or shapes: a quantizer in the same pipeline must come after them (it
rounds the weights they leave; GPTQ keeps a sparsified weight's zeros)."""

NO_QLINEAR = no_op("qlinear", "it rewrites linear nodes and a fused qlinear is already quantized: run fuse-qlinear "
                   "after it")
NO_DEQUANTIZE = no_op("dequantize", "it rewrites float weights; a quantized graph's linears read dequantize "
                      "nodes, whose scales fit the unpruned weights: prune before quantizing")


class Pass:
    """Subclass, set ``name`` and ``Options``, implement ``run``. The class docstring is the help text."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    exact: ClassVar[bool] = False
    """True where the pass must not change the model's outputs (checked in tests in float64)."""
    requires: ClassVar[tuple[Condition, ...]] = ()
    """Conditions the IR must meet before ``run`` (checked by the PassManager)."""
    ensures: ClassVar[tuple[Condition, ...]] = ()
    """Conditions the IR meets after ``run`` (checked by the PassManager)."""
    after: ClassVar[tuple[str, ...]] = ()
    """Passes that must come before this one when both are in a pipeline (checked when it is parsed)."""
    creates: ClassVar[tuple[str, ...]] = ()
    """Ops this pass may add to the graph (checked against the backend before the pipeline runs)."""
    scope_unit: ClassVar[str] = "linear"
    """The least a ``modules`` scope can pick out: ``linear`` (any one linear), or ``mlp`` / ``attention`` /
    ``block`` for a pass that rewrites those whole and matches each by one module (the down projection, the output
    projection, the block): ``debug sensitivity --granularity linear`` needs ``linear``."""
    needs_reference: ClassVar[bool] = False
    """The pass reads ``self.reference``: the graph as it was when the pipeline started (set by the PassManager
    for the pass's run; a caller running the pass alone sets it)."""
    reference: Graph | None = None

    def __init__(self, **options: Any) -> None:
        import pydantic

        try:
            self.options = self.Options(**options)
        except pydantic.ValidationError as exc:
            raise options_error(self.name, exc) from None

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def precheck(self, graph: Graph) -> None:
        """Refuse ``graph`` (raise ``PassError``) for what this pass would refuse when it runs and no earlier pass
        changes: the model's architecture (an encoder's bidirectional attention under a KV window). The
        ``PassManager`` calls it on the input graph for every pass it will run, before the first one, so a pipeline
        that cannot finish fails before minutes of calibration (``w8a8kv4`` on MiniLM smoothed for ~8 s before
        ``quantize`` refused the window). Default: nothing to check."""

    def quant_config(self) -> QuantConfig | None:
        """The quantization this pass writes, as its options alone say it (no graph needed), or None where it writes
        no Q/DQ: what a backend with rules of its own on Q/DQ forms (TensorRT's explicit quantization) checks before
        capture and calibration, through ``lowbit.api.plan_compile``. Default: None."""
        return None

    def fallback_schemes(self, graph: Graph) -> list[tuple[Node, QScheme]]:
        """The linears of ``graph`` this pass quantizes with a scheme ``quant_config`` does not show, each with that
        scheme: a ``group_fallback`` option's group, where ``group`` does not divide the input size. A backend with
        rules on Q/DQ forms checks these too, on the captured model before any pass runs (``lowbit.api``): TensorRT
        refusing a fallback of 32 was found only in the exported ONNX, after the whole pipeline's calibration."""
        options = getattr(self, "options", None)
        group_fallback = getattr(options, "group_fallback", None)
        config = self.quant_config()
        if group_fallback is None or config is None:
            return []
        return fallback_weights(graph, config, group_fallback, getattr(options, "in_scope", lambda module: True))

    def undone_by(self, later: Pass) -> str | None:
        """Why ``later``, run after this pass in the same pipeline, would undo what this pass did while both report
        success (None: it would not); checked when the pipeline is parsed, like ``after``."""
        return None

    def __call__(self, graph: Graph) -> PassResult:
        """``run`` between its ``requires`` and ``ensures`` checks (onnx-ir's ``PassBase.__call__``): a pass called
        alone on a graph it does not take (``kv-cache`` on a graph without a KV cache) raised a bare
        ``KeyError: 'generation'``; the ``PassManager`` checks the same conditions around ``run`` itself."""
        self._check("requires", self.requires, graph)
        result = self.run(graph)
        self._check("ensures", self.ensures, graph)
        return result

    def _check(self, kind: str, conditions: tuple[Condition, ...], graph: Graph) -> None:
        why = unmet_condition(kind, conditions, graph)
        if why is not None:
            raise PassError(f"pass {self.spec()} {why}")

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def spec(self) -> str:
        """This pass as pipeline text, with the options that differ from their defaults. Display options
        (``DISPLAY_OPTIONS``) change nothing the pass computes, so they are left out: ``lowbit compile -q`` sets
        ``progress=false`` and it was recorded into report.json, reproducers and replays as if the user had."""
        defaults = self.Options()
        # what the pass does first, the calibration data (inherited, so first in pydantic's order) last
        # and the scope just before the data (pydantic puts a mixin's fields first)
        items = sorted(((k, v) for k, v in self.options.model_dump().items() if k not in DISPLAY_OPTIONS),
                       key=lambda kv: 2 if kv[0] in CalibrationOptions.model_fields else int(kv[0] == "modules"))
        diffs = [
            f"{k}={_fmt(v)}" for k, v in items if isinstance(v, torch.Tensor) or getattr(defaults, k, None) != v
        ] if _all_defaulted(self.Options) else [f"{k}={_fmt(v)}" for k, v in items]
        return f"{self.name}({','.join(diffs)})" if diffs else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


DISPLAY_OPTIONS = frozenset({"progress"})
"""Options that only change what a pass shows, never its result: not part of ``Pass.spec()``."""


def _all_defaulted(options: type[PassOptions]) -> bool:
    return all(not f.is_required() for f in options.model_fields.values())


def split_top(text: str, seps: str, where: str, offset: int = 0) -> list[str]:
    """Split on any character of ``seps`` outside parentheses, brackets and quotes (pipeline text); ``text`` starts
    at column ``offset + 1`` of ``where`` (error columns count in ``where``). A bracket that is never closed, or
    closed by the other kind, is named with its column: 'unclosed parenthesis' alone left the user counting."""
    parts: list[str] = []
    opened: list[tuple[str, int]] = []  # (bracket, column) of each bracket still open, innermost last
    quote, quote_col, start = "", 0, 0
    for i, ch in enumerate(text):
        col = offset + i + 1
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote, quote_col = ch, col
        elif ch in "([":
            opened.append((ch, col))
        elif ch in ")]":
            if not opened:
                raise PassError(f"unbalanced {ch!r} at column {col} in {quote_pipeline(where)}: no {_OPENING[ch]!r} "
                                "before it")
            ch_open, col_open = opened.pop()
            if _OPENING[ch] != ch_open:
                raise PassError(f"mismatched {ch!r} at column {col} in {quote_pipeline(where)}: it closes the "
                                f"{ch_open!r} opened at column {col_open}, which needs {_CLOSING[ch_open]!r}")
        elif ch in seps and not opened:
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise PassError(f"unclosed quote {quote!r} opened at column {quote_col} in {quote_pipeline(where)}")
    if opened:
        ch_open, col_open = opened[-1]
        kind = "parenthesis" if ch_open == "(" else "bracket"
        raise PassError(f"unclosed {kind} {ch_open!r} opened at column {col_open} in {quote_pipeline(where)}: add "
                        f"{_CLOSING[ch_open]!r}" + (f" (and {len(opened) - 1} more)" if len(opened) > 1 else ""))
    parts.append(text[start:])
    return parts


_OPENING = {")": "(", "]": "["}
_CLOSING = {"(": ")", "[": "]"}


def _text(s: str, seps: str) -> str:
    """``s`` as an option value in pipeline text: quoted where the bare text would not parse back as ``s`` (a comma
    in ``layers\\.\\d{1,2}``, an unbalanced ``[(]``, a quote, edge spaces), so ``spec()`` round-trips: it is what
    reproducers, bisect's and sensitivity's commands and reports replay."""
    bare = s == s.strip() and not any(q in s for q in "\"'") and not (s.startswith("[") and s.endswith("]"))
    if bare:
        try:
            bare = len(split_top(s, seps, s)) == 1
        except PassError:
            bare = False
    if bare:
        return s
    quote = next((q for q in "\"'" if q not in s), None)
    return s if quote is None else f"{quote}{s}{quote}"  # both quote kinds inside: no form parses back


def _fmt(v: Any, seps: str = ",") -> str:
    if isinstance(v, torch.Tensor):  # calibration ids given in Python: shown, not replayable as text
        return f"<tensor {list(v.shape)} {str(v.dtype).removeprefix('torch.')}>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ";".join(_fmt(e, ";,") for e in v) + "]"
    if hasattr(v, "value"):
        return str(v.value)
    return _text(v, seps) if isinstance(v, str) else str(v)


def nonfinite_problem(w: torch.Tensor) -> str | None:
    """Where ``w`` holds NaN or inf (count, first row and column), or None when every value is finite.

    A finite sum says every value is finite (a NaN or an inf makes the sum NaN or inf) in one reduction: the boolean
    mask took 10-25x a sum's time, and quantize checks every weight on every run (each evaluation of debug bisect and
    sensitivity). A sum that overflows on finite values falls through to the mask."""
    if w.is_floating_point() and math.isfinite(float(w.sum())):
        return None
    bad = ~torch.isfinite(w)
    if not bool(bad.any()):
        return None
    idx = bad.nonzero()[0].tolist()
    kinds = [k for k, m in (("nan", torch.isnan(w)), ("inf", torch.isinf(w))) if bool(m.any())]
    at = f"row {idx[0]}" + (f", column {idx[1]}" if len(idx) > 1 else "")
    return f"{int(bad.sum())} non-finite value(s) ({'/'.join(kinds)}), the first at {at}"


class PassError(LowbitError, ValueError):
    """A pipeline or pass cannot run as asked; the message names the pass, option or node."""


class PassFileError(PassError):
    """A file a pass option names (calibration text, tokenizer, quantization config) is missing or unreadable:
    the CLI exits 3 (a file problem), not 2 (a typo in the pipeline)."""


def options_error(pass_name: str, exc: Any) -> PassError:
    """A pydantic ``ValidationError`` of a pass's options as one ``PassError`` naming the pass and each option; a
    semantic check that raised a ``PassError`` itself keeps its message (and its type: ``PassFileError``)."""
    msgs = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, PassError):
            return type(cause)(str(cause) + missing_comma(err.get("input")))
        loc = ".".join(str(x) for x in err["loc"])
        text = err["msg"].removeprefix("Value error, ")
        if not loc:  # a check across options: its message names them; the input is every option given
            msgs.append(text)
            continue
        msg = f"option {loc}: {text} (got {err.get('input')!r}){missing_comma(err.get('input'))}"
        bound = next(((op, v) for k, op in _BOUNDS.items() if err["type"] == k
                      for v in (err.get("ctx") or {}).values()), None)
        if bound is not None:
            msg += f"; option {loc}={err.get('input')} must be {bound[0]} {bound[1]}"
        if err["type"] == "list_type" and isinstance(err.get("input"), str):  # the pipeline text's list syntax
            # an unclosed '[lm_head' (CLI --set keep=[lm_head) is suggested once bracketed, not as '[[lm_head]'
            msg += f"; write a list in brackets: {loc}=[{err['input'].strip('[]')}] ({loc}=[a;b] for several)"
        msgs.append(msg)
    return PassError(f"pass {pass_name}: " + "; ".join(msgs))


def missing_comma(value: Any) -> str:
    """A hint when an option's value holds ``... key=``: ``quantize(w=int4 group=64)`` lost a comma."""
    if isinstance(value, str) and re.search(r"\s[A-Za-z_]\w*=", value):
        return "; options are separated by commas"
    return ""


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def quote_pipeline(text: str) -> str:
    """Pipeline text in single quotes, as a shell reads it back after ``--pipeline``: quoted with ``repr`` a
    ``modules=layers\\.1`` regex showed each backslash doubled (another regex, pasted back), and a column number
    counted in the text pointed elsewhere in what was shown."""
    import shlex

    if "'" not in text:
        return f"'{text}'"
    return f'"{text}"' if '"' not in text and "$" not in text and "`" not in text else shlex.quote(text)


def closest(name: str, choices: list[str]) -> str:
    """``; did you mean ...?`` for the nearest names, compared case-insensitively (``DCE`` -> ``dce``)."""
    lowered: dict[str, str] = {}
    for c in choices:
        lowered.setdefault(c.lower(), c)
    near = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)]
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    if name not in REGISTRY:
        raise PassError(f"unknown pass {name!r}{closest(name, sorted(REGISTRY))} (see `lowbit passes`)")
    return REGISTRY[name]


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(REGISTRY.items()))


_loaded = False


def _load_builtin_passes() -> None:
    """Import every module in lowbit.passes once so their @register_pass decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    import lowbit.passes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in {"base", "manager", "pipeline"}:
            importlib.import_module(f"lowbit.passes.{info.name}")


def function_pass(name: str, doc: str, exact: bool = False, **contract: Any
                  ) -> Callable[[Callable[[Graph], PassResult]], type[Pass]]:
    """Make an option-less pass from a function ``graph -> PassResult``; ``contract`` sets ``requires``,
    ``ensures``, ``after`` or ``creates``."""

    def deco(fn: Callable[[Graph], PassResult]) -> type[Pass]:
        cls = type(fn.__name__.title().replace("_", ""), (Pass,), {
            "name": name, "__doc__": doc, "exact": exact, "run": lambda self, g: fn(g), **contract,
        })
        return register_pass(cls)

    return deco
