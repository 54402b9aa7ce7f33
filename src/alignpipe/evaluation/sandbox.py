"""Run untrusted Python code in a separate, locked-down process.

`run_python(code)` writes the program into a fresh temporary directory and runs it with `python -I -B`
under a small launcher (this same file, run as a script). Every layer of isolation below is applied when
the machine allows it, and what was actually in force is reported in `SandboxResult.enforced`, measured
in the sandbox (a namespace counts as enforced only when the launcher sees that it differs from the
host's), never assumed from the configuration. `docs/sandbox.md` has the full table.

- limits (setrlimit in the child before exec): CPU time (RLIMIT_CPU, SIGXCPU then SIGKILL), address
  space per process (RLIMIT_AS), file size (RLIMIT_FSIZE), open files, no core dumps, processes
  (RLIMIT_NPROC: the kernel does not apply it to root, so as root the program runs under a uid of its
  own, unique to this sandbox, which makes the limit apply and count this sandbox's processes only);
- wall time: the launcher kills the program and everything it started when the limit passes; the host
  kills the launcher's whole process group as a backstop;
- namespaces via `unshare` (util-linux): a new network namespace (only a loopback device, which is
  down: no connection leaves the sandbox, not even to the host's 127.0.0.1), a new PID namespace (the
  launcher is its init; when it exits the kernel kills every process left in it, so no child outlives
  the sandbox), a new mount namespace, IPC and UTS namespaces. Not root: a user namespace is added;
- filesystem (mount namespace): every mount read-only, the working directory a size-limited tmpfs that
  disappears with the sandbox, home directories, /tmp, /var/tmp, /run and /dev/shm covered by empty
  read-only tmpfs (the interpreter is bound back in when it lives under one of them), a fresh /proc;
- cgroups (root, v1 or v2 where writable): total memory of all the sandbox's processes and a process
  count limit;
- no privileges: no_new_privs (setuid binaries do not elevate), all supplementary groups dropped;
- an empty environment (PATH, HOME, TMPDIR, locale only: no variable of the parent reaches the program),
  stdin from /dev/null, stdout and stderr captured through pipes with only the last `max_output_bytes`
  of each kept.

Without the namespaces (no `unshare`, or the kernel forbids them) the program still runs with the
limits, the private uid and the process-group/uid/cgroup sweeps, and `enforced` says what is missing.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_HIDDEN_PATHS", "SandboxConfig", "SandboxResult", "capabilities", "run_python"]

_LAUNCHER = os.path.abspath(__file__)

DEFAULT_HIDDEN_PATHS: tuple[str, ...] = ("/root", "/home", "~", "/tmp", "/var/tmp", "/run", "/dev/shm")
"""Directories covered by an empty read-only tmpfs inside the sandbox (`~` is the parent's home)."""

# Unique uids for sandboxed programs when the parent is root: base + host pid * slots + slot.
# The kernel caps pids at 2**22, so every uid stays below 2**31.
_UID_BASE = 1_500_000_000
_UID_SLOTS = 64
_NOBODY = 65534

# mount(2) flags
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_PR_SET_NO_NEW_PRIVS = 38


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


@dataclass
class SandboxResult:
    """Outcome of one run. `status`: `passed` (exit code 0), `failed` (the program ran and exited non-zero
    or was killed by a limit other than time), `timeout` (wall-time or CPU-time limit) or `error` (the
    sandbox itself could not run the program: nothing is known about the program)."""

    status: str
    reason: str
    exit_code: int | None = None
    signal: str | None = None  # name of the signal that killed the program
    stdout: str = ""  # tail, at most max_output_bytes
    stderr: str = ""
    stdout_bytes: int = 0  # everything the program wrote, before truncation
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0  # wall time of the program
    elapsed_s: float = 0.0  # wall time including sandbox set-up and teardown
    cpu_s: float | None = None
    max_rss_kib: int | None = None
    enforced: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    uid: int | None = None  # host uid the program ran as
    workdir: str = ""
    workdir_removed: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------------------------- host side


def _minimal_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _unshare_exe() -> str | None:
    for path in ("/usr/bin/unshare", "/bin/unshare"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("unshare")


_NS_FLAGS = {"net": ["--net"], "pid": ["--pid", "--fork", "--kill-child"], "mount": ["--mount"],
             "ipc": ["--ipc"], "uts": ["--uts"]}


@functools.lru_cache(maxsize=None)
def _namespace_support() -> dict[str, bool]:
    """Which namespaces `unshare` can create here (probed once per process)."""
    exe = _unshare_exe()
    support = dict.fromkeys(_NS_FLAGS, False)
    if exe is None:
        return support
    base = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]

    def works(flags: list[str]) -> bool:
        cmd = [exe, *base, *flags, "--", sys.executable, "-I", "-S", "-c", ""]
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=_minimal_env(), timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    if works([f for flags in _NS_FLAGS.values() for f in flags]):
        return dict.fromkeys(_NS_FLAGS, True)
    return {name: works(flags) for name, flags in _NS_FLAGS.items()}


def _id_mapped(n: int, map_file: str) -> bool:
    try:
        with open(map_file) as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return n == _NOBODY
    return any(inside <= n < inside + count for inside, _outside, count in rows)


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


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


def _interpreter_dirs(python: str) -> list[str]:
    """Directories the interpreter needs: its install prefix, and the venv for the running one."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    else:
        dirs = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
                os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    return sorted({os.path.realpath(d) for d in dirs})


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
    @functools.lru_cache(maxsize=None)
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
        for procs in self.procs_files:
            try:
                with open(procs) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

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


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@functools.lru_cache(maxsize=None)
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


class _Tail:
    """The last `cap` bytes of a stream, and how many bytes went through."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.total = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf += chunk[-self.cap:]
        if len(self.buf) > self.cap:
            del self.buf[: len(self.buf) - self.cap]

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _rmtree(path: str) -> bool:
    def retry(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)
    return not os.path.lexists(path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def run_python(code: str, config: SandboxConfig | None = None,
               files: dict[str, str | bytes] | None = None) -> SandboxResult:
    """Run `code` as `main.py` in the sandbox; `files` (relative path -> content) are placed beside it."""
    cfg = config or SandboxConfig()
    started = time.monotonic()
    root = os.geteuid() == 0
    python = os.path.abspath(cfg.python or sys.executable)
    ns = _namespace_support()
    use = {"net": cfg.network_namespace and ns["net"], "pid": cfg.pid_namespace and ns["pid"],
           "mount": cfg.mount_namespace and ns["mount"], "ipc": ns["ipc"], "uts": ns["uts"]}
    notes: list[str] = []

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="alignpipe-sandbox-"))
    uid = gid = None
    uid_unique = False
    cgroup: _Cgroup | None = None
    try:
        for rel, content in {"main.py": code, **(files or {})}.items():
            target = os.path.normpath(os.path.join(workdir, rel))
            if not target.startswith(workdir + os.sep):
                raise ValueError(f"sandbox file path escapes the working directory: {rel!r}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)

        if root and cfg.drop_privileges:
            if use["mount"] or _reachable_by_others(python):
                uid, uid_unique = _acquire_uid()
                gid = uid
                if not uid_unique:
                    notes.append("no private uid available: running as the shared `nobody`")
            else:
                notes.append(f"interpreter {python} is not reachable by an unprivileged uid and there is no "
                             "mount namespace to bind it in: the program runs as root")
        if uid is not None and not use["mount"]:
            for dirpath, _dirs, names in os.walk(workdir):
                for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                    os.chown(p, uid, gid)
        if root and cfg.cgroups:
            cgroup = _Cgroup(cfg.memory_bytes, cfg.max_processes + 1)
            if not cgroup.dirs:
                notes.append("no writable memory/pids cgroup: total memory and the cgroup process limit are "
                             "not enforced")

        nproc = cfg.max_processes
        if not root and not any(use.values()):  # RLIMIT_NPROC counts all of this user's processes
            nproc += _count_processes_of(os.getuid())
        hidden = []
        for p in cfg.hidden_paths:
            p = os.path.realpath(os.path.expanduser(p))
            if p != "/" and os.path.isdir(p) and p not in hidden:
                hidden.append(p)
        cpu = cfg.cpu_time_s if cfg.cpu_time_s is not None else cfg.wall_time_s
        program_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                       "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        result_r, result_w = os.pipe()
        launch = {
            "result_fd": result_w, "workdir": workdir, "python": python,
            "argv": [python, "-I", "-B", "main.py"], "env": program_env,
            "uid": uid, "gid": gid, "uid_unique": uid_unique, "wall": cfg.wall_time_s,
            "rlimits": {"CPU": [max(1, int(-(-cpu // 1)))] * 2, "AS": [cfg.memory_bytes] * 2,
                        "FSIZE": [cfg.file_size_bytes] * 2, "NOFILE": [cfg.max_open_files] * 2,
                        "NPROC": [nproc] * 2, "CORE": [0, 0]},
            "mounts": use["mount"], "hidden": hidden, "expose": _interpreter_dirs(python),
            "disk_bytes": cfg.disk_bytes, "cgroup_procs": cgroup.procs_files if cgroup else [],
            "cgroup_pids": bool(cgroup and "pids" in cgroup.dirs),
            "cgroup_memory": bool(cgroup and "memory" in cgroup.dirs),
            "host_ns": _host_namespaces(), "require": list(cfg.require), "root": root,
        }
        launch["rlimits"]["CPU"][1] += 1  # SIGXCPU at the soft limit, SIGKILL one second later
        cmd = [sys.executable, "-I", "-S", _LAUNCHER, "--launch", json.dumps(launch)]
        flags = [f for name, on in use.items() if on for f in _NS_FLAGS[name]]
        if flags:
            cmd = [_unshare_exe(), *([] if root else ["--user", "--map-root-user"]), *flags, "--", *cmd]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(result_w,), start_new_session=True,
                                    env=_minimal_env(), cwd="/")
        finally:
            os.close(result_w)
        out, err, report_bytes, backstop = _collect(proc, result_r, cfg)
        _kill_group(proc.pid)
        if cgroup:
            cgroup.kill_all()
    except BaseException:
        _cleanup(workdir, uid, uid_unique, cgroup)
        raise
    oom_kills = cgroup.oom_kills() if cgroup else 0
    pids_denied = cgroup.pids_denied() if cgroup else 0
    workdir_removed = _cleanup(workdir, uid, uid_unique, cgroup)

    try:
        report = json.loads(report_bytes.decode()) if report_bytes else {}
    except ValueError:
        report = {}
    if pids_denied:
        notes.append(f"cgroup refused {pids_denied} process creation(s)")
    res = SandboxResult(status="error", reason="", stdout=out.text(), stderr=err.text(),
                        stdout_bytes=out.total, stderr_bytes=err.total,
                        stdout_truncated=out.total > out.cap, stderr_truncated=err.total > err.cap,
                        elapsed_s=time.monotonic() - started, uid=uid, workdir=workdir,
                        workdir_removed=workdir_removed, notes=notes + report.get("notes", []))
    res.enforced = {**report.get("enforced", {}), "wall_time": True, "clean_env": True, "stdin_closed": True,
                    "output_cap": True}
    res.duration_s = report.get("duration_s", res.elapsed_s)
    res.cpu_s, res.max_rss_kib = report.get("cpu_s"), report.get("max_rss_kib")
    res.exit_code = report.get("exit_code")
    if report.get("signal"):
        res.signal = signal.Signals(report["signal"]).name
    res.status, res.reason = _verdict(report, res, cfg, backstop, proc.returncode, oom_kills)
    return res


def _collect(proc: subprocess.Popen, result_r: int, cfg: SandboxConfig) -> tuple[_Tail, _Tail, bytes, bool]:
    """Read stdout, stderr and the launcher's report until all close; kill everything at the backstop."""
    out, err = _Tail(cfg.max_output_bytes), _Tail(cfg.max_output_bytes)
    report = _Tail(1 << 20)
    sel = selectors.DefaultSelector()
    for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ, sink)
    os.set_blocking(result_r, False)
    sel.register(result_r, selectors.EVENT_READ, report)
    deadline = time.monotonic() + cfg.wall_time_s + cfg.setup_grace_s
    backstop = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 2.0:
                break  # the launcher is gone; whatever still holds a pipe is killed below
            if now > deadline:
                backstop = True
                _kill_group(proc.pid)
                deadline = now + 5.0
            for key, _ in sel.select(timeout=0.1 if exited_at is None else 0.02):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fd)
    finally:
        sel.close()
        os.close(result_r)
        proc.stdout.close()
        proc.stderr.close()
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out, err, bytes(report.buf), backstop


def _cleanup(workdir: str, uid: int | None, uid_unique: bool, cgroup: _Cgroup | None) -> bool:
    if cgroup:
        cgroup.remove()
    if uid is not None and uid_unique:
        _release_uid(uid)
    return _rmtree(workdir)


def _verdict(report: dict, res: SandboxResult, cfg: SandboxConfig, backstop: bool, launcher_rc: int | None,
             oom_kills: int) -> tuple[str, str]:
    if report.get("setup_error"):
        return "error", f"sandbox set-up failed: {report['setup_error']}"
    if backstop and "exit_code" not in report:
        return "timeout", f"wall-time limit of {cfg.wall_time_s:g}s exceeded (killed by the host backstop)"
    if "timed_out" not in report:
        return "error", (f"sandbox launcher ended (code {launcher_rc}) without a report: "
                         f"{_last_line(res.stderr) or 'no output'}")
    if report["timed_out"]:
        return "timeout", f"wall-time limit of {cfg.wall_time_s:g}s exceeded"
    sig = report.get("signal")
    cpu_limit = cfg.cpu_time_s if cfg.cpu_time_s is not None else cfg.wall_time_s
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and (res.cpu_s or 0) >= cpu_limit):
        return "timeout", f"CPU-time limit of {cpu_limit:g}s exceeded"
    if res.exit_code == 0:
        return "passed", "exit code 0"
    if sig == signal.SIGKILL and oom_kills:
        return "failed", "memory limit exceeded (killed by the cgroup OOM killer)"
    if sig == signal.SIGXFSZ:
        return "failed", "file-size limit exceeded"
    if sig:
        return "failed", f"killed by {signal.Signals(sig).name}"
    last = _last_line(res.stderr)
    return "failed", f"exit code {res.exit_code}" + (f": {last}" if last else "")


# ----------------------------------------------------------------------------------------- launcher side
# Runs as `python -I -S sandbox.py --launch CONFIG`, inside the new namespaces when there are any, as root
# when the parent is root. Standard library only. It sets up the mounts, starts the program in a child
# (limits, cgroups, uid, exec), waits for it with the wall-time limit, kills what is left and writes a JSON
# report to the result pipe. Nothing here may assume a namespace: every check is made on the spot.


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _mount(libc: Any, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
           ) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def _kept_flags(path: str) -> int:
    """Per-mount flags a remount must repeat (in a user namespace they are locked)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC),
                   (os.ST_NOATIME, _MS_NOATIME), (os.ST_NODIRATIME, _MS_NODIRATIME),
                   (os.ST_RELATIME, _MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _remount_ro(libc: Any, path: str) -> None:
    _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _kept_flags(path))


def _snapshot(workdir: str) -> dict[str, bytes]:
    files = {}
    for dirpath, _dirs, names in os.walk(workdir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = f.read()
    return files


def _setup_mounts(cfg: dict, enforced: dict, notes: list) -> None:
    libc = _libc()
    workdir, uid = cfg["workdir"], cfg["uid"] if cfg["uid"] is not None else 0
    gid = cfg["gid"] if cfg["gid"] is not None else 0
    # Never touch the host's mounts: only in a namespace of our own, made private first.
    if os.stat("/proc/self/ns/mnt").st_ino == cfg["host_ns"]["mnt"]:
        raise RuntimeError("not in a private mount namespace")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    files = _snapshot(workdir)
    expose = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"] if os.path.isdir(p)}

    if os.getpid() == 1:  # a /proc that shows this PID namespace only
        _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        enforced["private_proc"] = True

    failed = []
    with open("/proc/self/mountinfo") as f:
        mountpoints = list(dict.fromkeys(_unescape(line.split()[4]) for line in f))
    for mp in mountpoints:
        try:
            if not os.statvfs(mp).f_flag & os.ST_RDONLY:
                _remount_ro(libc, mp)
        except OSError:
            failed.append(mp)
    enforced["readonly_fs"] = not failed
    if failed:
        notes.append(f"could not make read-only: {', '.join(failed)}")

    def under(path: str, d: str) -> bool:
        return path == d or path.startswith(d.rstrip("/") + "/")

    hidden_ok, done = True, []
    for d in sorted(cfg["hidden"]):
        if any(under(d, h) for h in done):
            continue
        try:
            _mount(libc, "tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
            for p, fd in expose.items():
                if under(p, d) and p != d:
                    os.makedirs(p, mode=0o755, exist_ok=True)
                    _mount(libc, f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC)
                    _remount_ro(libc, p)
            if under(workdir, d):
                os.makedirs(workdir, mode=0o755, exist_ok=True)
            _remount_ro(libc, d)
            done.append(d)
        except OSError as exc:
            hidden_ok = False
            notes.append(f"could not hide {d}: {exc}")
    enforced["hidden_paths"] = hidden_ok
    for fd in expose.values():
        os.close(fd)

    _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={cfg['disk_bytes']},nr_inodes=4096,mode=700,uid={uid},gid={gid}")
    for rel, data in files.items():
        path = os.path.join(workdir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    for dirpath, dirs, names in os.walk(workdir):
        for p in [*(os.path.join(dirpath, n) for n in dirs + names)]:
            os.chown(p, uid, gid)
    enforced["disk_total"] = enforced["private_workdir"] = True


def _child(cfg: dict, cgroup_fds: list[int]) -> None:
    """In the forked child: cgroups, limits, privileges, then exec the program. Never returns."""
    os.setsid()
    for fd in cgroup_fds:
        os.write(fd, b"0")  # "0": the writing process
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (soft, hard))
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    elif os.geteuid() == 0:
        try:
            os.setgroups([])
        except OSError:
            pass
    os.chdir(cfg["workdir"])
    os.umask(0o022)
    os.execve(cfg["python"], cfg["argv"], cfg["env"])


def _sweep_uid(uid: int, gid: int) -> None:
    """Kill every process of a sandbox-private uid (kill(-1) from a helper running as that uid)."""
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _kill_rest(cfg: dict, child: int) -> None:
    if os.getpid() == 1:  # init of our own PID namespace: -1 means exactly the sandbox's processes
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        return
    try:
        os.killpg(child, signal.SIGKILL)
    except OSError:
        pass
    if cfg["uid"] is not None and cfg["uid_unique"]:
        _sweep_uid(cfg["uid"], cfg["gid"])


def _launch(cfg: dict, report: dict) -> None:
    enforced, notes = report["enforced"], report["notes"]
    os.umask(0o022)
    host = cfg["host_ns"]
    in_pidns = os.getpid() == 1 and os.stat("/proc/self/ns/pid").st_ino != host["pid"]
    enforced["pid_namespace"] = in_pidns
    import socket

    enforced["network"] = (os.stat("/proc/self/ns/net").st_ino != host["net"]
                           and {name for _i, name in socket.if_nameindex()} <= {"lo"})
    cgroup_fds = [os.open(p, os.O_WRONLY) for p in cfg["cgroup_procs"]]
    enforced["memory_total"] = cfg["cgroup_memory"]
    for key in ("readonly_fs", "hidden_paths", "disk_total", "private_workdir", "private_proc"):
        enforced[key] = False
    if cfg["mounts"]:
        _setup_mounts(cfg, enforced, notes)
    dropped = cfg["uid"] is not None
    enforced["unprivileged"] = dropped or not cfg["root"]
    # RLIMIT_NPROC binds any uid but root's; unique uid (or user namespace): only this sandbox counts.
    enforced["processes"] = (dropped and cfg["uid_unique"]) or not cfg["root"] or cfg["cgroup_pids"]
    enforced["no_new_privs"] = True
    for key in ("cpu_time", "memory_per_process", "file_size"):
        enforced[key] = True
    missing = [k for k in cfg["require"] if not enforced.get(k)]
    if missing:
        raise RuntimeError(f"required isolation not available: {', '.join(missing)}")

    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec happened
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            _child(cfg, cgroup_fds)
        except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then a hard exit
            try:
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            finally:
                os._exit(127)
    os.close(err_w)
    for fd in cgroup_fds:
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    import select

    deadline = started + cfg["wall"]
    status = rusage = None
    timed_out = False
    while status is None:
        while True:  # reap the program and, as init of a PID namespace, any orphan
            try:
                wpid, wstatus, wrusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if wpid == 0:
                break
            if wpid == pid:
                status, rusage = wstatus, wrusage
                break
        if status is not None:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            _kill_rest(cfg, pid)
            os.kill(pid, signal.SIGKILL) if not in_pidns else None
            _, status, rusage = os.wait4(pid, 0)
            break
        if pidfd is not None:
            select.select([pidfd], [], [], min(remaining, 0.5))
        else:
            time.sleep(min(remaining, 0.01))
    duration = time.monotonic() - started
    _kill_rest(cfg, pid)
    with os.fdopen(err_r, "rb") as f:
        exec_error = f.read().decode(errors="replace")
    if exec_error:
        raise RuntimeError(f"could not start the program: {exec_error}")
    report.update(timed_out=timed_out, duration_s=duration, cpu_s=rusage.ru_utime + rusage.ru_stime,
                  max_rss_kib=rusage.ru_maxrss,
                  exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


def _launcher_main(argv: list[str]) -> int:
    cfg = json.loads(argv[2])
    out = cfg["result_fd"]
    os.set_inheritable(out, False)
    report: dict[str, Any] = {"enforced": {}, "notes": []}
    try:
        _launch(cfg, report)
    except BaseException as exc:  # noqa: BLE001 - the program did not run: say why
        report["setup_error"] = f"{type(exc).__name__}: {exc}"
    with os.fdopen(out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--launch":
    sys.exit(_launcher_main(sys.argv))
