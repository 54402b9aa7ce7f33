"""The run's cgroup (host side, root only): total memory and number of all the sandbox's processes."""

from __future__ import annotations

import functools
import itertools
import os
import time

from alignpipe.evaluation.sandbox.launcher import _kill_cgroup_members
from alignpipe.evaluation.sandbox.mounts import _unescape


class _Cgroup:
    """A memory + pids cgroup for one run (v1 hierarchies or a v2 tree that delegates both); best effort."""

    _counter = itertools.count()

    def __init__(self, memory_bytes: int, max_pids: int) -> None:
        self.dirs: dict[str, str] = {}  # controller -> directory
        name = f"alignpipe-sandbox-{os.getpid()}-{next(self._counter)}"
        by_base: dict[str, list[str]] = {}
        for controller, base in self._parents().items():
            by_base.setdefault(base, []).append(controller)
        for base, controllers in by_base.items():
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except OSError:
                continue
            try:
                if "memory" in controllers:
                    if os.path.exists(os.path.join(path, "memory.max")):  # v2
                        self._write(path, "memory.max", memory_bytes)
                        if os.path.exists(os.path.join(path, "memory.swap.max")):
                            self._write(path, "memory.swap.max", 0)
                    else:
                        self._write(path, "memory.limit_in_bytes", memory_bytes)
                        if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                            self._write(path, "memory.memsw.limit_in_bytes", memory_bytes)
                if "pids" in controllers:
                    self._write(path, "pids.max", max_pids)
            except OSError:
                self._rmdir(path)
                continue
            for controller in controllers:
                self.dirs[controller] = path

    @staticmethod
    def _write(path: str, name: str, value: int) -> None:
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))

    @staticmethod
    @functools.cache
    def _parents() -> dict[str, str]:
        """controller -> this process's own cgroup directory in a writable hierarchy holding it."""
        try:
            with open("/proc/self/cgroup") as f:
                own = [line.rstrip("\n").split(":", 2) for line in f if line.strip()]
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split() for line in f]
        except OSError:
            return {}
        found: dict[str, str] = {}
        for fields in mounts:
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
            for hier, controllers, path in own:
                if fstype == "cgroup" and hier != "0":
                    wanted = [c for c in ("memory", "pids") if c in controllers.split(",") and c in options]
                elif fstype == "cgroup2" and hier == "0":
                    wanted = None  # whatever the tree delegates below this process's cgroup
                else:
                    continue
                rel = os.path.relpath(path, root)
                if rel.startswith(".."):
                    continue
                base = os.path.normpath(os.path.join(mountpoint, rel))
                if wanted is None:
                    try:
                        with open(os.path.join(base, "cgroup.subtree_control")) as f:
                            wanted = [c for c in ("memory", "pids") if c in f.read().split()]
                    except OSError:
                        continue
                if wanted and os.access(base, os.W_OK):
                    for c in wanted:
                        found.setdefault(c, base)
        return found

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values()))]

    def _read(self, controller: str, name: str) -> str:
        try:
            with open(os.path.join(self.dirs[controller], name)) as f:
                return f.read()
        except (OSError, KeyError):
            return ""

    def oom_kills(self) -> int:
        text = self._read("memory", "memory.events") or self._read("memory", "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids_denied(self) -> int:
        for line in self._read("pids", "pids.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def kill_all(self) -> None:
        _kill_cgroup_members(self.procs_files)

    def remove(self) -> bool:
        ok = True
        for path in sorted(set(self.dirs.values())):
            deadline = time.monotonic() + 3.0
            while True:
                self.kill_all()
                if self._rmdir(path):
                    break
                if time.monotonic() > deadline:
                    ok = False
                    break
                time.sleep(0.02)
        return ok

    @staticmethod
    def _rmdir(path: str) -> bool:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False
