"""glibc's allocator set by `configure_allocator` gives freed memory back: a process that frees 400 MB of
tensors, each between two small live ones, is back near where it started; with glibc's defaults it keeps them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignpipe.allocator import configure_allocator

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
from alignpipe.allocator import configure_allocator

def rss_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = configure_allocator()
first = torch.ones(8 * 2**20, dtype=torch.uint8)
del first  # one large free: glibc's defaults raise their mmap threshold to its size here
start = rss_mb()
big, pins = [], []
for i in range(100):  # 4 MB blocks, a small live one after each (it keeps the heap from shrinking)
    big.append(torch.ones(2**20, dtype=torch.float32))
    pins.append(torch.ones(16))
peak = rss_mb()
del big
print(json.dumps({"applied": applied, "held": peak - start, "kept": rss_mb() - start}))
"""


def _run(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_go_back_to_the_system():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc settings, read from /proc")
    configured = _run({})
    if not configured["applied"]:
        pytest.skip("the C library is not glibc")
    defaults = _run({"ALIGNPIPE_MALLOC": "default"})
    assert configured["held"] > 350 and defaults["held"] > 350  # both really held the 400 MB
    assert configured["kept"] < 50, configured
    assert defaults["kept"] > 300, defaults  # the cause, shown: glibc's defaults keep what was freed
    assert configure_allocator() is True  # applies in a running process too
