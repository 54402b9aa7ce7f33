"""`SandboxConfig`: the limits and isolation switches of one run."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HIDDEN_PATHS: tuple[str, ...] = ("/root", "/home", "~", "/tmp", "/var/tmp", "/run", "/dev/shm")
"""Directories covered by an empty read-only tmpfs inside the sandbox (`~` is the parent's home)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation switches of one sandboxed run. Switching a layer off is for tests and for
    machines where it cannot work; `require` names `enforced` keys without which the program must not run
    (the run then ends with status `error`)."""

    wall_time_s: float = 10.0
    cpu_time_s: float | None = None  # None: the wall-time limit, rounded up
    memory_bytes: int = 1 << 30  # address space per process (RLIMIT_AS) and total memory (cgroup)
    max_processes: int = 32  # processes and threads of the sandbox (RLIMIT_NPROC, cgroup pids)
    file_size_bytes: int = 16 << 20  # largest file the program may write (RLIMIT_FSIZE)
    disk_bytes: int = 64 << 20  # size of the tmpfs working directory (mount namespace only)
    max_open_files: int = 256
    max_output_bytes: int = 64 << 10  # per stream; the tail is kept
    network_namespace: bool = True
    pid_namespace: bool = True
    mount_namespace: bool = True
    drop_privileges: bool = True  # as root: run the program under a private unprivileged uid
    cgroups: bool = True
    hidden_paths: tuple[str, ...] = DEFAULT_HIDDEN_PATHS
    require: tuple[str, ...] = ()
    python: str | None = None  # interpreter for the program; default: the running one
    setup_grace_s: float = 10.0  # host backstop beyond wall_time_s for sandbox start and teardown

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "memory_bytes", "max_processes", "file_size_bytes", "disk_bytes",
                     "max_open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.cpu_time_s is not None and self.cpu_time_s <= 0:
            raise ValueError(f"SandboxConfig.cpu_time_s must be positive, got {self.cpu_time_s!r}")


def _cpu_limit_s(cfg: SandboxConfig) -> float:
    """The CPU-time limit of a run: `cpu_time_s`, or the wall-time limit when that is None."""
    return cfg.cpu_time_s if cfg.cpu_time_s is not None else cfg.wall_time_s
