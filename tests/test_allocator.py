"""glibc's allocator under alignpipe's policies (allocator.py), in a real process that frees 400 MB of tensors,
each between two small live ones: with glibc's defaults the process keeps them; `lean` gives them back the moment
they are freed; `fast` keeps what it keeps until `release_free_memory()`, which runs between stages. And `fast` puts
large tensors on huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignpipe import AlignpipeError
from alignpipe.allocator import configure_allocator, policy

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
from alignpipe.allocator import configure_allocator, release_free_memory

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
kept = rss_mb() - start
release_free_memory()
print(json.dumps({"applied": applied, "held": peak - start, "kept": kept, "released": rss_mb() - start}))
"""


def _run(malloc: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ALIGNPIPE_MALLOC": malloc})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_policy_gives_freed_memory_back_when_it_says():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc settings, read from /proc")
    lean, fast, default = _run("lean"), _run("fast"), _run("default")
    if not lean["applied"]:
        pytest.skip("the C library is not glibc")
    for run in (lean, fast, default):
        assert run["held"] > 350, run  # every process really held the 400 MB
    assert default["kept"] > 300 and default["released"] > 300, default  # the cause: glibc keeps what was freed
    assert lean["kept"] < 50, lean  # returned at once
    # whatever `fast` keeps for reuse (its 2 MiB-aligned huge-page blocks are partly returned at once), the trim
    # between stages returns
    assert fast["released"] < 50, fast


def test_unknown_policy_is_an_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv("ALIGNPIPE_MALLOC", "tiny")
    with pytest.raises(AlignpipeError, match="ALIGNPIPE_MALLOC='tiny': expected one of fast, lean, default"):
        configure_allocator()
    monkeypatch.delenv("ALIGNPIPE_MALLOC")
    assert policy() == "fast"


HUGE_PAGES = r"""
import json
from alignpipe.allocator import configure_allocator

configure_allocator()  # before torch's first allocation, as the CLI runs it
import torch

def anon_huge_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0

before = anon_huge_mb()
block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched: every page faulted in
print(json.dumps({"huge_mb": anon_huge_mb() - before}))
"""


def _huge_mb(malloc: str, **env: str) -> float:
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ALIGNPIPE_MALLOC": malloc, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["huge_mb"]


def test_fast_puts_large_tensors_on_huge_pages_and_keeps_the_users_choice(monkeypatch):
    from alignpipe.allocator import THP_SETTING, huge_pages_supported

    if not sys.platform.startswith("linux") or not huge_pages_supported():
        pytest.skip("no transparent huge pages in this kernel")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert _huge_mb("fast") >= 32  # a 64 MiB tensor, most of it on 2 MiB pages
    if "[madvise]" in THP_SETTING.read_text():  # under `always` every process gets them, asked or not
        assert _huge_mb("default") < 4
        assert _huge_mb("fast", THP_MEM_ALLOC_ENABLE="0") < 4  # a value the user set is kept
