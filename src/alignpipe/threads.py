"""How many threads torch should use: the cores this process may actually run on.

`os.cpu_count()` counts the machine's cores, not the ones a container or `taskset` grants: with 2 cores
allowed out of 64, torch's default of 64 intra-op threads spin-wait for each other and every step is many
times slower. The count here is the smallest of the CPU affinity mask and the cgroup CPU quota (v2
`cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, rounded up). `ALIGNPIPE_THREADS=N` overrides it, e.g.
`ALIGNPIPE_THREADS=1`. The N processes of a multi-process run on one machine (LOCAL_WORLD_SIZE, set by the
launcher) take a 1/N share each.

Cores that other processes keep busy are not available either: torch's threads wait for each other at every
operation, so one thread that shares its core with another busy process stalls them all (on a 2-core machine
with one other busy process, 2 threads generated at 4 tokens/s against 30 with 1). At start the count is
lowered by the cores other processes keep busy, measured from /proc/stat over a moment
(`ALIGNPIPE_LOAD_AWARE=0` turns that off). It is measured once: a load that starts later is not seen.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")


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


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """Per CPU: (idle + iowait jiffies, all jiffies) since boot, from /proc/stat."""
    out = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return out


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]) -> float:
    """How many of `cpus` were busy between two /proc/stat readings: the non-idle share of each, summed."""
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        idle = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        if total > 0:
            busy += 1 - idle / total
    return busy


def busy_cores(seconds: float = 0.3, stat: Path = PROC_STAT) -> float:
    """How many of the cores this process may use other processes keep busy (this one sleeps meanwhile);
    0 where /proc/stat cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(stat)
        time.sleep(seconds)
        return busy_between(before, _cpu_times(stat), cpus)
    except (AttributeError, OSError, ValueError, IndexError):
        return 0.0


def configure_threads() -> int:
    """Set torch's intra-op threads to `ALIGNPIPE_THREADS` or the available cores; returns the count."""
    import torch

    override = os.environ.get("ALIGNPIPE_THREADS", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            from alignpipe import AlignpipeError

            raise AlignpipeError(f"ALIGNPIPE_THREADS must be a positive integer, not {override!r}")
        n = int(override)
    else:  # the processes of a multi-process run on this machine share its cores; busy cores are not free
        cores = available_cores()
        n = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if os.environ.get("ALIGNPIPE_LOAD_AWARE", "1") != "0":
            n = max(1, min(n, cores - math.floor(busy_cores() + 0.5)))
    torch.set_num_threads(n)
    return n
