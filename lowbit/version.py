"""lowbit's version, read from the installed package's metadata (pyproject.toml is the one place it is set).

A leaf module: the backends stamp the version into the files they write (ONNX metadata, TensorRT engine
headers) without importing the ``lowbit`` package's API.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__: str = version("lowbit")
except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH=...)
    __version__ = "0+unknown"
