"""A calibrating pass's own peak host memory: anonymous resident memory sampled by a thread while the pass works.

Why a thread: a step's peak (a forward's activations, a backward's saved tensors) lives for milliseconds to
seconds between two points a loop could sample, and ``ru_maxrss`` is the process's high-water mark since it
started, which loading the model usually set already. Why the number can still be low: glibc keeps freed heap
memory for reuse, so an allocation that fits in what an earlier step freed does not raise the resident size.
Large blocks (above ``M_MMAP_THRESHOLD``) are mapped and unmapped one by one; glibc raises that threshold after
the first large free unless ``MALLOC_MMAP_THRESHOLD_`` fixes it, which is why ``tools/bench_learning_memory.py``
runs each method in a fresh process with it set: then every tensor over the threshold is resident exactly while
it lives.
"""

from __future__ import annotations

import os
import threading

__all__ = ["PeakRss", "anon_rss_mb", "rss_mb"]

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE = 4096


def rss_mb() -> float | None:
    """The process's resident memory now, in MiB (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return None


def anon_rss_mb() -> float | None:
    """The process's resident *anonymous* memory now (``RssAnon``, MiB): heap and mapped allocations, without the
    shared libraries' code pages that a first call of a kernel maps in (hundreds of MB for torch and MKL on a
    first forward and backward, which are not the method's memory). None where ``/proc`` lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRss:
    """``with PeakRss() as mem: ...``: ``mem.start_mb`` (anonymous resident memory at entry, ``anon_rss_mb``),
    ``mem.peak_mb`` (the highest sample while the body ran, every ``interval`` seconds, the exit included) and
    ``mem.above_start_mb`` (their difference: what the body added at its peak). None where ``/proc`` is missing."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start_mb: float | None = None
        self.peak_mb: float | None = None

    @property
    def above_start_mb(self) -> float | None:
        if self.start_mb is None or self.peak_mb is None:
            return None
        return round(self.peak_mb - self.start_mb, 1)

    def _sample(self) -> None:
        now = anon_rss_mb()
        if now is not None:
            self.peak_mb = now if self.peak_mb is None else max(self.peak_mb, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self.start_mb = self.peak_mb = anon_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lowbit-peak-rss", daemon=True)
        if self.start_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
