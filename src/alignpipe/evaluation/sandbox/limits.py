"""Resource limits (setrlimit in the program's process) and the uid the program runs under.

RLIMIT_NPROC does not apply to root, so as root the program runs under a uid of its own, unique to its
run, which makes the limit apply and count this run's processes only (and lets the cleanup kill every
process of that uid).
"""

from __future__ import annotations

import os
import threading

from alignpipe.evaluation.sandbox.config import SandboxConfig, _cpu_limit_s

# Unique uids for sandboxed programs when the parent is root: base + host pid * slots + slot.
# The kernel caps pids at 2**22, so every uid stays below 2**31.
_UID_BASE = 1_500_000_000
_UID_SLOTS = 64
_NOBODY = 65534

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _rlimits(cfg: SandboxConfig, count_user_processes: bool) -> dict[str, list[int]]:
    """name -> [soft, hard] for the launcher to set. `count_user_processes`: RLIMIT_NPROC counts all of
    this user's processes (no private uid, no user namespace), so it is raised by their current number."""
    nproc = cfg.max_processes
    if count_user_processes:
        nproc += _count_processes_of(os.getuid())
    cpu = max(1, int(-(-_cpu_limit_s(cfg) // 1)))  # whole seconds, rounded up
    return {"CPU": [cpu, cpu + 1],  # SIGXCPU at the soft limit, SIGKILL one second later
            "AS": [cfg.memory_bytes] * 2, "FSIZE": [cfg.file_size_bytes] * 2,
            "NOFILE": [cfg.max_open_files] * 2, "NPROC": [nproc] * 2, "CORE": [0, 0]}


def _count_processes_of(uid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _choose_uid(python: str, mount_namespace: bool, notes: list[str]) -> tuple[int | None, bool]:
    """As root: the uid to run the program under (None: stay root) and whether it is unique to this run.
    A private uid needs the interpreter in its reach, or a mount namespace to bind it in."""
    if mount_namespace or _reachable_by_others(python):
        uid, unique = _acquire_uid()
        if not unique:
            notes.append("no private uid available: running as the shared `nobody`")
        return uid, unique
    notes.append(f"interpreter {python} is not reachable by an unprivileged uid and there is no "
                 "mount namespace to bind it in: the program runs as root")
    return None, False


def _id_mapped(n: int, map_file: str) -> bool:
    try:
        with open(map_file) as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return n == _NOBODY
    return any(inside <= n < inside + count for inside, _outside, count in rows)


def _acquire_uid() -> tuple[int, bool]:
    """A uid for one sandbox run and whether it is unique to it (else the shared `nobody`)."""
    with _uid_lock:
        for slot in range(_UID_SLOTS):
            uid = _UID_BASE + os.getpid() * _UID_SLOTS + slot
            if uid not in _uids_in_use:
                if _id_mapped(uid, "/proc/self/uid_map") and _id_mapped(uid, "/proc/self/gid_map"):
                    _uids_in_use.add(uid)
                    return uid, True
                break
    return _NOBODY, False


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _reachable_by_others(path: str) -> bool:
    """Whether an unprivileged uid can reach `path`: every directory on the way searchable by others."""
    for p in {os.path.abspath(path), os.path.realpath(path)}:
        parts = p.split(os.sep)
        for i in range(2, len(parts) + 1):
            try:
                mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
            except OSError:
                return False
            if not mode & 0o001:
                return False
    return True
