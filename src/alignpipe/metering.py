"""Wall time and peak memory of each stage of a round, for the round's metrics and the report.

`ru_maxrss` only ever grows over a process's life, so it cannot say which stage needed the memory. A
`StageMeter` samples the resident set size (/proc/self/statm) on a background thread while a stage runs
and keeps the stage's own peak; where /proc is missing it falls back to the process peak so far.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterator

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident set size now, in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StageMeter:
    """`with meter.stage("sampling"): ...` records the stage's seconds and peak RSS (MB)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.interval_s = interval_s

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peak = [rss_mb()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.interval_s):
                peak[0] = max(peak[0], rss_mb())

        sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), peak[0], rss_mb())
