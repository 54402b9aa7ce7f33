"""glibc's allocator, set for training: fast by default, lean on request (issue 11 item 3).

glibc serves allocations above a threshold (128 KiB at start) with mmap and returns them to the system when they
are freed. Each time such a block is freed, it raises that threshold to the block's size, up to 32 MiB. After
the first few steps, a training step's tensors of a few MiB (activations, gradients) therefore come from the heap.
That is fast: their pages are reused without a page fault. But freed heap memory stays with the process, and the
shapes change from batch to batch, so RSS grows to several times what is live.

Three policies, chosen with `ALIGNPIPE_MALLOC` (docs/performance.md has the measurements):

- `fast` (the default): glibc's own thresholds, at most 2 arenas, and `release_free_memory()` (malloc_trim,
  which also returns free pages in the middle of the heap) after every optimizer step and every stage. Within a
  step the heap is reused at full speed; between steps what was freed goes back.
- `lean`: the mmap threshold fixed at 64 KiB (a fixed threshold also turns off the adjustment) and the heap
  trimmed at 128 KiB, so every tensor above 64 KiB is returned the moment it is freed. RSS then follows what is
  live, about half of `fast`'s peak in a training step, but every such tensor is page-faulted in afresh: a
  training step took twice as long on a 2-core VM.
- `default`: glibc left as it is (no trimming either).

Other C libraries (musl, macOS) are left alone. Settings use mallopt, so they take effect in the running process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
POLICIES = {
    "fast": {M_ARENA_MAX: 2},
    "lean": {M_MMAP_THRESHOLD: 64 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_ARENA_MAX: 2},
    "default": {},
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


def configure_allocator() -> bool:
    """Apply the policy's settings where the C library is glibc; returns whether any were applied."""
    libc, settings = _glibc(), POLICIES[policy()]
    if libc is None or not settings:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), unless the policy is `default`.
    Called between optimizer steps and stages: it costs a walk over the free chunks, milliseconds."""
    libc = _glibc()
    if libc is not None and policy() != "default":
        libc.malloc_trim(0)
