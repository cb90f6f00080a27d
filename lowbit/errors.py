"""The one base class of every error lowbit raises on purpose.

A caller (the CLI, a fuzz test, a service loading files from strangers) can tell "lowbit refused this input,
and the message says why" (``LowbitError``) from "lowbit has a bug" (anything else). Each concrete error also
derives from the builtin it has always been (``ValueError``, ``RuntimeError``, ...), so existing ``except``
clauses keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LowbitError(Exception):
    """Base of lowbit's deliberate errors: the message names the file, node, op or option at fault."""


class UntrustedInputError(LowbitError, ValueError):
    """An artefact (IR text, reproducer, weights file) asks for something lowbit never does for a file:
    an op outside the registry and the ATen allowlist, a path outside its directory, an expression that
    is not a dimension."""


class CorruptFileError(LowbitError, ValueError):
    """A file exists but cannot be read as what it claims to be (truncated, wrong format, bad header);
    the message is the file's name followed by ``what`` ("is truncated ...", "has no weights")."""

    def __init__(self, path: object, what: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path!r} {what}")


class OptionError(LowbitError, TypeError):
    """A keyword option a function does not take, named with the closest one and every option it takes (a
    ``TypeError`` as Python's "unexpected keyword argument" is; a ``LowbitError`` so a caller tells the refusal from
    a bug)."""


class MissingTokenizerError(LowbitError, FileNotFoundError):
    """A model directory without tokenizer files: lowbit reads text through the model's tokenizer (transformers
    built an empty one for some families, failed with a backend error for others)."""


class DeviceError(LowbitError, ValueError):
    """A ``device=`` that is not a torch device, or names a GPU this machine or torch build does not have."""


def check_device(device: object) -> None:
    """Refuse a device the compile could not run on, before the slow capture: ``device="cuda"`` on a CPU-only
    torch raised torch's bare ``AssertionError: Torch not compiled with CUDA enabled`` from deep in lowering,
    and ``"gpu"`` a RuntimeError listing every device type torch knows."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise DeviceError(f"device={device!r} is not a torch device: give 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type not in ("cpu", "cuda"):  # 'meta' holds no data: lowering failed in Tensor.item()
        raise DeviceError(f"device={device!r}: lowbit runs models on 'cpu' or 'cuda' (cuda:N), not on {d.type!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device={device!r}: {why} here (torch {torch.__version__}); use device='cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


class RemoteCodeError(UntrustedInputError):
    """A model or checkpoint directory that transformers can load only by importing Python files it ships
    (``auto_map`` in config.json or tokenizer_config.json naming a class transformers does not have)."""

    def __init__(self, directory: object) -> None:
        self.directory = str(directory)
        super().__init__(f"{self.directory!r} needs its own Python code to load (an 'auto_map' in config.json or "
                         "tokenizer_config.json naming a class transformers does not ship); lowbit never runs a "
                         "checkpoint's code: use a directory whose model and tokenizer classes are transformers' own")


def did_you_mean(name: object, choices: list[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices``, or ``""``: the hint every "unknown option/format/
    backend" message ends its name with (a non-string name has none)."""
    import difflib

    near = difflib.get_close_matches(name, choices, n=n, cutoff=cutoff) if isinstance(name, str) else []
    return f" (did you mean {' or '.join(repr(c) for c in near)}?)" if near else ""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in number agreement ("1 step", "2 steps"), for messages and report lines: they said
    "decode 1 steps" and "prompt 0 has 1 tokens"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def unread_options(options: Any, needs: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """``(option, what would make it read)`` for each option of the pydantic model ``options`` set away from its
    default that the other options leave unread: a run would succeed with it silently ignored. ``needs`` maps an
    option to ``None`` when it is read, else to what would make it read (``"kv="``). Compared by value, not
    ``model_fields_set``: a pass rebuilt from all of its options (cli/restrict.py) restates defaults. One test for
    pass options (``PassOptions.refuse_unread``) and backend options (``backends.registry``)."""
    fields = type(options).model_fields
    return [(k, why) for k, why in needs.items()
            if why is not None and getattr(options, k) != fields[k].get_default(call_default_factory=True)]
