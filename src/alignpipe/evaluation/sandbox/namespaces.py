"""Namespaces: which ones `unshare` (util-linux) can create on this machine, and the command that does.

The launcher checks on the spot which namespaces it really is in (against the host's namespace inodes,
from `_host_namespaces`); `capabilities()` tells what the machine allows before any run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from typing import Any

from alignpipe.evaluation.sandbox.cgroups import _Cgroup
from alignpipe.evaluation.sandbox.config import SandboxConfig

_NS_FLAGS = {"net": ["--net"], "pid": ["--pid", "--fork", "--kill-child"], "mount": ["--mount"],
             "ipc": ["--ipc"], "uts": ["--uts"]}


def _minimal_env() -> dict[str, str]:
    """The whole environment of every process the host starts (unshare, the launcher, helpers)."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _unshare_exe() -> str | None:
    for path in ("/usr/bin/unshare", "/bin/unshare"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("unshare")


def _unshare_cmd(names: list[str], cmd: list[str]) -> list[str]:
    """`cmd` run in new namespaces `names` (keys of `_NS_FLAGS`); `cmd` itself when there are none. Not
    root: a user namespace is added, with the caller mapped to root in it."""
    flags = [f for name in names for f in _NS_FLAGS[name]]
    if not flags:
        return cmd
    return [_unshare_exe(), *([] if os.geteuid() == 0 else ["--user", "--map-root-user"]), *flags, "--", *cmd]


@functools.cache
def _namespace_support() -> dict[str, bool]:
    """Which namespaces `unshare` can create here (probed once per process)."""
    support = dict.fromkeys(_NS_FLAGS, False)
    if _unshare_exe() is None:
        return support

    def works(names: list[str]) -> bool:
        cmd = _unshare_cmd(names, [sys.executable, "-I", "-S", "-c", ""])
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=_minimal_env(), timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    if works(list(_NS_FLAGS)):
        return dict.fromkeys(_NS_FLAGS, True)
    return {name: works([name]) for name in _NS_FLAGS}


def _namespaces_to_use(cfg: SandboxConfig) -> dict[str, bool]:
    """name -> whether a run creates it: what the machine supports, less what `cfg` switches off."""
    ns = _namespace_support()
    return {"net": cfg.network_namespace and ns["net"], "pid": cfg.pid_namespace and ns["pid"],
            "mount": cfg.mount_namespace and ns["mount"], "ipc": ns["ipc"], "uts": ns["uts"]}


@functools.cache
def _host_namespaces() -> dict[str, int]:
    out = {}
    for kind in ("net", "mnt", "pid"):
        try:
            out[kind] = os.stat(f"/proc/self/ns/{kind}").st_ino
        except OSError:
            out[kind] = -1
    return out


def capabilities() -> dict[str, Any]:
    """What this machine lets the sandbox enforce, before any run (the run's `enforced` is the truth)."""
    ns = _namespace_support()
    return {"root": os.geteuid() == 0, "unshare": _unshare_exe() is not None,
            **{f"{k}_namespace": v for k, v in ns.items()},
            "cgroups": sorted(_Cgroup._parents()) if os.geteuid() == 0 else []}
