"""How many threads torch should use: the cores this process may actually run on.

`os.cpu_count()` counts the machine's cores, not the ones a container or `taskset` grants: with 2 cores
allowed out of 64, torch's default of 64 intra-op threads spin-wait for each other and every step is many
times slower. The count here is the smallest of the CPU affinity mask and the cgroup CPU quota (v2
`cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, rounded up). `ALIGNPIPE_THREADS=N` overrides it, e.g.
`ALIGNPIPE_THREADS=1` when another busy process shares a 2-core machine. The N processes of a multi-process
run on one machine (LOCAL_WORLD_SIZE, set by the launcher) take a 1/N share each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota_cores(root: Path = CGROUP) -> int | None:
    """Cores allowed by the cgroup CPU quota, or None when there is no quota (or no cgroup to read)."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = (v2.read_text().split() + ["100000"])[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / int(period_file.read_text())))
    except (OSError, ValueError):
        return None
    return None


def available_cores(root: Path = CGROUP) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        cores = os.cpu_count() or 1
    quota = cgroup_quota_cores(root)
    return min(cores, quota) if quota else cores


def configure_threads() -> int:
    """Set torch's intra-op threads to `ALIGNPIPE_THREADS` or the available cores; returns the count."""
    import torch

    override = os.environ.get("ALIGNPIPE_THREADS", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            from alignpipe import AlignpipeError

            raise AlignpipeError(f"ALIGNPIPE_THREADS must be a positive integer, not {override!r}")
        n = int(override)
    else:  # the processes of a multi-process run on this machine share its cores
        n = max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    return n
