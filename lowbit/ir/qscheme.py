"""What to quantize and how: ``QScheme`` (one tensor's format) and ``QuantConfig`` (module patterns → schemes).

This is the *annotation* half of quantization (torch.ao pt2e's ``Quantizer``): it says which linear gets which
weight and input scheme and how the KV cache is quantized, and nothing else. ``lowbit.passes.insert_qdq``
is the *transformation* half that turns a resolved annotation into QDQ nodes.

Module patterns are shell globs (``fnmatch``) over a node's module path. A pattern also matches any suffix of
the path after a dot, so ``lm_head`` and ``*.down_proj`` match whether or not a wrapper put a prefix in front
(``model.lm_head``). Rules apply in order and later rules override earlier ones field by field.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lowbit.ir.quant import QDTYPES, get_qdtype

__all__ = ["QScheme", "KVCacheScheme", "ModuleRule", "QuantConfig", "Granularity", "ObserverName",
           "module_matches", "DEFAULT_KEEP_FLOAT", "kivi_scheme"]

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token", "per_block"]
ObserverName = Literal["minmax", "ema", "percentile", "mse", "histogram"]

DEFAULT_KEEP_FLOAT = ["lm_head", "*embed*", "predictions.decoder", "lm_head.decoder", "vocab_projector", "mlp.gate",
                      "block_sparse_moe.router"]
"""Kept float unless a config says otherwise: the output head and embeddings (tied in SmolLM2), which are
large, read once per token, and where quantization error lands directly on the logits. A masked-LM encoder's
vocabulary projection is its output head (BERT's ``cls.predictions.decoder``, RoBERTa's ``lm_head.decoder``,
DistilBERT's ``vocab_projector``; tied to the word embeddings): it was quantized, and its tie silently broken.
A mixture-of-experts router (``mlp.gate``: Mixtral, Qwen2/3-MoE, OLMoE; GraniteMoE's ``block_sparse_moe.router``; E
rows, a tiny share of the params) picks each token's experts: its rounding flips choices (int8 on a 4-expert
Mixtral: 0.014 relative logit error with it quantized, 0.009 float), so it stays float, as llm-compressor's and
ModelOpt's MoE recipes keep it."""


class QScheme(BaseModel):
    """How one tensor is quantized.

    ``granularity`` is read with the tensor's role (see ``lowbit.ir.quant.layout_for``): for weights,
    ``per_channel`` is one scale per output channel, ``per_group`` one per ``group_size`` input channels and
    ``per_block`` one per ``group_size`` x ``group_size`` tile of ``[out, in]`` (DeepSeek-V3's 128 x 128 fp8 blocks);
    for activations, ``per_token`` is one scale per token (or per ``group_size`` channels of a token) and
    ``per_channel`` one per input channel; for KV keys, ``per_channel`` with ``group_size`` is KIVI's one
    scale per (head, channel) over each block of ``group_size`` tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    qdtype: str = "int8"
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int | None = Field(default=None, gt=0)
    dynamic: bool = False
    """Activations only: scales computed in-graph from each input (True) or fixed from calibration (False)."""
    observer: ObserverName = "minmax"
    """How static scales are chosen (weights, static activations); dynamic scales are always min/max."""
    clip_ratio: float = Field(default=1.0, gt=0, le=1)
    """Dynamic scales only: the range is ``clip_ratio·[min, max]`` of each block (QuaRot: 0.9 for A4, 0.95 for
    the KV cache); values outside are clamped."""

    @field_validator("qdtype", mode="before")
    @classmethod
    def _qdtype(cls, v: object) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"int{v}"
        if not isinstance(v, str) or v not in QDTYPES:
            raise ValueError(f"unknown qdtype {v!r}; known: {', '.join(QDTYPES)} (or a bit width 8/4/3/2)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QScheme:
        qd = get_qdtype(self.qdtype)
        if qd.is_float and not self.symmetric:
            raise ValueError(f"qdtype {self.qdtype} is symmetric only: set symmetric=true")
        if self.symmetric and not qd.is_float and qd.qmin == 0:
            raise ValueError(f"qdtype {self.qdtype} has no negative codes, so a symmetric scheme (zero point 0) would "
                             f"clamp every negative value to 0: use int{qd.bits} for a symmetric grid, or an "
                             "asymmetric one with a zero point (symmetric=false; pass options sym / a_sym / "
                             "kv_sym=false)")
        if self.granularity in ("per_group", "per_block") and self.group_size is None:
            raise ValueError(f"granularity {self.granularity} needs group_size")
        if self.granularity == "per_block" and self.observer != "minmax":  # observers read rows of one length
            raise ValueError(f"granularity per_block takes the minmax observer (RTN), not {self.observer}")
        if self.clip_ratio != 1.0 and not self.dynamic:
            raise ValueError(f"clip_ratio={self.clip_ratio} applies to dynamic scales only (static ones come from "
                             "their observer)")
        return self

    @property
    def bits(self) -> int:
        return get_qdtype(self.qdtype).bits

    def short(self) -> str:
        """Compact text for reports: ``int4-asym-g64``, ``int8-sym-pc``, ``int8-sym-tok-dyn``, ``fp8e4m3-sym-b128``."""
        gran = {"per_tensor": "pt", "per_channel": "pc", "per_token": "tok", "per_group": "g",
                "per_block": "b"}[self.granularity]
        if self.group_size is not None:
            gran = f"{gran}{self.group_size}"
        parts = [self.qdtype, "sym" if self.symmetric else "asym", gran]
        if self.dynamic:
            parts.append("dyn")
            if self.clip_ratio != 1.0:
                parts.append(f"clip{self.clip_ratio:g}")
        elif self.observer != "minmax":
            parts.append(self.observer)
        return "-".join(parts)


class KVCacheScheme(BaseModel):
    """Quantization of the attention KV cache: keys after rotary, values, as read by ``attention``.

    Scales are always per head and computed in-graph (the cache is filled at run time). ``window`` keeps the
    most recent ``window`` tokens of every query's context in float, as KIVI's residual does during decoding:
    query ``t`` reads keys/values ``j > t - window`` unquantized and older ones quantized.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: QScheme
    value: QScheme
    window: int = Field(default=0, ge=0)
    sink: int = Field(default=0, ge=0)
    """The first ``sink`` tokens stay float for every query (the attention sink's outlier keys/values)."""
    modules: str = "*"
    """Glob over the attention node's module path (``*self_attn``); every matching attention is quantized."""

    @model_validator(mode="after")
    def _kv_granularity(self) -> KVCacheScheme:
        for name, s in (("key", self.key), ("value", self.value)):
            if s.granularity in ("per_group", "per_block"):
                raise ValueError(f"kv {name}: use per_token (with group_size = channels per group) or per_channel "
                                 f"(with group_size = tokens per group), not {s.granularity}")
        return self


def kivi_scheme(qdtype: str, group: int = 32, window: int = 0, symmetric: bool = False) -> KVCacheScheme:
    """KIVI's layout: keys per channel over ``group``-token blocks, values per token over ``group``-channel groups."""
    return KVCacheScheme(
        key=QScheme(qdtype=qdtype, symmetric=symmetric, granularity="per_channel", group_size=group, dynamic=True),
        value=QScheme(qdtype=qdtype, symmetric=symmetric, granularity="per_token", group_size=group, dynamic=True),
        window=window,
    )


class ModuleRule(BaseModel):
    """Override the schemes of the linears whose module path matches ``pattern``.

    ``weight``/``input``: a scheme, ``"float"`` to keep that tensor float, or omitted to leave it as is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str
    weight: QScheme | Literal["float"] | None = None
    input: QScheme | Literal["float"] | None = None


def module_matches(path: str, pattern: str) -> bool:
    """Glob match on the whole path or on any suffix of it that starts after a dot. A pattern without a glob
    character is compared as a string: ``lowbit.load`` gives one exact rule per quantized linear, and fnmatch of
    each against every linear's every suffix was ~0.3 CPU-s of a SmolLM2 load (quadratic in the linears)."""
    if not any(c in pattern for c in "*?["):
        return path == pattern or path.endswith("." + pattern)
    if fnmatchcase(path, pattern):
        return True
    parts = path.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))


class QuantConfig(BaseModel):
    """Which linears and attention caches get quantized, and how; defaults apply to every linear."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: QScheme | None = None
    input: QScheme | None = None
    kv: KVCacheScheme | None = None
    rules: list[ModuleRule] = Field(default_factory=list)
    keep_float: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FLOAT))
    """Linears matching any of these stay float whatever the rules say, and so does the KV cache of an attention
    module matching one (``kv``)."""

    @model_validator(mode="after")
    def _fields_each_role_reads(self) -> QuantConfig:
        """Refuse what a weight or input scheme would silently ignore (or fail on only after capture): weights are
        quantized once, per tensor, channel or group; an input reads ``group_size`` per token only and its
        ``observer`` only with static scales."""
        weights = [(self.weight, "weight")] + [(r.weight, f"rule {r.pattern!r} weight") for r in self.rules]
        for s, where in weights:
            if not isinstance(s, QScheme):
                continue
            if s.granularity == "per_token":
                raise ValueError(f"{where}: granularity per_token applies to activations; weights use per_tensor, "
                                 "per_channel, per_group or per_block")
            if s.group_size is not None and s.granularity not in ("per_group", "per_block"):
                raise ValueError(f"{where}: group_size={s.group_size} is read only with granularity per_group "
                                 f"(granularity {s.granularity} would ignore it)")
            if s.dynamic:
                raise ValueError(f"{where}: dynamic=true applies to inputs only (a weight is quantized once, when the "
                                 "pass runs)")
        inputs = [(self.input, "input")] + [(r.input, f"rule {r.pattern!r} input") for r in self.rules]
        for s, where in inputs:
            if not isinstance(s, QScheme):
                continue
            if s.group_size is not None and s.granularity != "per_token":
                raise ValueError(f"{where}: group_size={s.group_size} is read only with granularity per_token "
                                 f"(channels per scale within a token; {s.granularity} would ignore it)")
            if s.dynamic and s.observer != "minmax":
                raise ValueError(f"{where}: observer {s.observer} is read only with dynamic=false (dynamic scales "
                                 "are each token's min/max, computed in the graph)")
        return self

    @model_validator(mode="after")
    def _input_needs_scheme(self) -> QuantConfig:
        for s, where in [(self.input, "input")] + [(r.input, f"rule {r.pattern!r} input") for r in self.rules]:
            if isinstance(s, QScheme) and s.granularity in ("per_group", "per_block"):
                raise ValueError(f"{where}: activations use per_token (group_size = channels per group), "
                                 "per_channel or per_tensor")
            if isinstance(s, QScheme) and not s.dynamic and s.granularity == "per_token":  # refused only at run time
                raise ValueError(f"{where}: static activation scales cannot be per token (tokens vary at run time): "
                                 "use per_tensor or per_channel with dynamic=false")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> QuantConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"quantization config {str(p)!r}: no such file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"quantization config {str(p)!r} is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:  # a binary file: not the codec's words
            raise ValueError(f"quantization config {str(p)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                             f"at offset {exc.start}): give a JSON file") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # its text quotes each bad value: the file's contents
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors()[:5])
            raise ValueError(f"quantization config {str(p)!r} is not a QuantConfig: {problems}") from None

    def user_patterns(self) -> list[tuple[str, str]]:
        """(where, pattern) of every pattern the user wrote: each must match something.

        The default keep-float patterns are exempt (a model without an ``lm_head`` linear is fine).
        """
        out = [(f"rules[{i}].pattern", r.pattern) for i, r in enumerate(self.rules)]
        out += [(f"keep_float[{i}]", p) for i, p in enumerate(self.keep_float) if p not in DEFAULT_KEEP_FLOAT]
        return out

    def resolve(self, module: str) -> tuple[QScheme | None, QScheme | None]:
        """(weight scheme, input scheme) for a linear at ``module``; None means keep float."""
        if any(module_matches(module, p) for p in self.keep_float):
            return None, None
        weight, inp = self.weight, self.input
        for r in self.rules:
            if module_matches(module, r.pattern):
                if r.weight is not None:
                    weight = None if r.weight == "float" else r.weight
                if r.input is not None:
                    inp = None if r.input == "float" else r.input
        return weight, inp

    def is_empty(self) -> bool:
        has_rules = any(isinstance(r.weight, QScheme) or isinstance(r.input, QScheme) for r in self.rules)
        return self.weight is None and self.input is None and self.kv is None and not has_rules
