"""Memory for training: glibc's allocator and torch's huge pages, fast by default, lean on request (issue 11
item 3).

glibc serves allocations above a threshold (128 KiB at start) with mmap and returns them to the system when they
are freed. Each time such a block is freed, it raises that threshold to the block's size, up to 32 MiB. After
the first few steps, a training step's tensors of a few MiB (activations, gradients) therefore come from the heap.
That is fast: their pages are reused without a page fault. But freed heap memory stays with the process, and the
shapes change from batch to batch, so RSS can grow past what is live.

Every page a process touches for the first time costs a page fault, and with 4 KiB pages a training step of the
embedded model took hundreds of thousands of them. Torch can put tensors of 2 MiB and more on transparent huge
pages (its `THP_MEM_ALLOC_ENABLE`): one fault per 2 MiB, and fewer TLB misses.

Three policies, chosen with `ALIGNPIPE_MALLOC` (docs/performance.md has the measurements):

- `fast` (the default): huge pages for tensors of 2 MiB and more where the kernel allows them (transparent huge
  pages in mode `always` or `madvise`), glibc's own thresholds, at most 2 arenas, and `release_free_memory()`
  (malloc_trim, which also returns free pages in the middle of the heap) between stages. Within a stage freed
  memory is reused without page faults. (Until session 12 `fast` also trimmed after every optimizer step: with
  4 KiB pages that cost 2-3 million page faults and ~10 s of system time per 6 training steps, and with huge
  pages it was not needed to keep the peak.)
- `lean`: the mmap threshold fixed at 64 KiB (a fixed threshold also turns off the adjustment) and the heap
  trimmed at 128 KiB, so every tensor above 64 KiB is returned the moment it is freed. RSS then follows what is
  live, but every such tensor is page-faulted in afresh: a training step took twice as long on a 2-core VM.
- `default`: glibc and torch left as they are (no trimming either).

Other C libraries (musl, macOS) are left alone. Settings use mallopt, so they take effect in the running process;
huge pages must be chosen before torch's first allocation (see `configure_allocator`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class Policy:
    mallopt: dict[int, int] = field(default_factory=dict)
    huge_pages: bool = False  # torch's THP_MEM_ALLOC_ENABLE: tensors of 2 MiB and more on transparent huge pages


POLICIES = {
    "fast": Policy({M_ARENA_MAX: 2}, huge_pages=True),
    "lean": Policy({M_MMAP_THRESHOLD: 64 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_ARENA_MAX: 2}),
    "default": Policy(),
}


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def policy() -> str:
    """The policy `ALIGNPIPE_MALLOC` names (`fast` when unset); an unknown name is an error naming the choices."""
    name = os.environ.get("ALIGNPIPE_MALLOC", "").strip().lower() or "fast"
    if name not in POLICIES:
        from alignpipe import AlignpipeError

        raise AlignpipeError(f"ALIGNPIPE_MALLOC={name!r}: expected one of {', '.join(POLICIES)}")
    return name


def huge_pages_supported() -> bool:
    """Whether the kernel has transparent huge pages and lets a process ask for them (mode `always` or `madvise`)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def configure_allocator() -> bool:
    """Apply the policy's settings where the C library is glibc; returns whether any were applied.
    Huge pages: torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so this must run before torch
    allocates (the CLI runs it before importing torch); a value the user set is kept."""
    libc, chosen = _glibc(), POLICIES[policy()]
    if chosen.huge_pages and huge_pages_supported():
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if libc is None or not chosen.mallopt:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in chosen.mallopt.items())


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), unless the policy is `default`.
    Called between stages (not between optimizer steps: the next step would page-fault them all back in): it
    costs a walk over the free chunks, milliseconds."""
    libc = _glibc()
    if libc is not None and policy() != "default":
        libc.malloc_trim(0)

