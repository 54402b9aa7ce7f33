"""The launcher: the sandbox's first process, run as a script by path.

The host (`runner.py`) starts it as `python -I -S launcher.py --launch CONFIG` (CONFIG: its settings,
marshalled, in hex), inside the new namespaces when there are any, as root when the host is root. `-I -S`
puts neither this directory nor site-packages on `sys.path`: this file stands alone, standard library only,
and imports only cheap modules up front (its start-up is paid on every run). It sets up the mounts, starts
the program in a child (limits, cgroups, uid, exec), waits for it with the wall-time limit, kills what is
left and writes a report (marshal) to the result pipe. Nothing here may assume a namespace: every check
is made on the spot. The host imports the helpers of the first section from here too.
"""

from __future__ import annotations

import marshal
import os
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (about 10 ms)
if TYPE_CHECKING:
    from typing import Any

# mount(2) flags
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_SIGKILL = 9


# ------------------------------------------------------------------------- helpers shared with the host
def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """Give `top` and everything below it to uid:gid."""
    for dirpath, _dirs, names in os.walk(top):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
            os.chown(p, uid, gid)


def _kill(pid: int) -> None:
    """SIGKILL `pid` (-1: every process in reach), ignoring processes already gone."""
    try:
        os.kill(pid, _SIGKILL)
    except OSError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, _SIGKILL)
    except OSError:
        pass


def _kill_cgroup_members(procs_files: list[str]) -> None:
    """SIGKILL every process listed in these `cgroup.procs` files (pids as seen from the host)."""
    for procs in procs_files:
        try:
            with open(procs) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for p in pids:
            _kill(p)


# ------------------------------------------------------------------------------------------- filesystem
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _mount(libc: Any, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
           ) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        import ctypes

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
    _chown_tree(workdir, uid, gid)
    enforced["disk_total"] = enforced["private_workdir"] = True


# ---------------------------------------------------------------------------------------------- program
def _child(cfg: dict, cgroup_fds: list[int], ready_w: int, go_r: int) -> None:
    """In the forked child: join the cgroups, wait until the launcher has set up the filesystem, then limits,
    privileges and exec of the program. Never returns. (The cgroups are joined before the mounts turn
    read-only, and by the child only, so the launcher is never the cgroup's OOM victim.)"""
    os.setsid()
    for fd in cgroup_fds:
        os.write(fd, b"0")  # "0": the writing process
        os.close(fd)
    os.write(ready_w, b"1")
    os.close(ready_w)
    if os.read(go_r, 1) != b"1":  # set-up failed: the program must not run
        os._exit(126)
    os.close(go_r)
    import resource

    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (soft, hard))
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
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


def _fork_program(cfg: dict) -> tuple[int, int, int, int]:
    """Fork the program's process (`_child`). Returns its pid and the launcher's ends of three pipes: exec
    error (EOF once the exec happened), ready (the child joined its cgroups), go (let the child exec)."""
    cgroup_fds = [os.open(p, os.O_WRONLY) for p in cfg["cgroup_procs"]]
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec happened
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (err_r, ready_r, go_w):
                os.close(fd)
            _child(cfg, cgroup_fds, ready_w, go_r)
        except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then a hard exit
            try:
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            finally:
                os._exit(127)
    for fd in (err_w, ready_w, go_r, *cgroup_fds):
        os.close(fd)
    return pid, err_r, ready_r, go_w


# ---------------------------------------------------------------------------------------------- cleanup
def _sweep_uid(uid: int, gid: int) -> None:
    """Kill every process of a sandbox-private uid (kill(-1) from a helper running as that uid)."""
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, _SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _kill_rest(cfg: dict, child: int, in_pidns: bool) -> None:
    """Kill the program and everything it started. `child` must not be reaped yet (its pid, and so its
    process group id, stays reserved until then)."""
    if in_pidns:  # init of our own PID namespace: -1 means exactly the sandbox's processes
        _kill(-1)
        return
    _kill(child)
    _kill_group(child)
    _kill_cgroup_members(cfg["cgroup_procs"])  # same PID namespace as the host here: these pids are ours
    if cfg["uid"] is not None and cfg["uid_unique"]:
        _sweep_uid(cfg["uid"], cfg["gid"])


def _children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _reap_all(in_pidns: bool) -> None:
    """Kill and reap every remaining descendant. They are all this launcher's children by now: as init of
    the PID namespace, or as a child subreaper, it inherits every orphan."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        targets = [-1] if in_pidns else _children_of(os.getpid())
        for p in targets:
            _kill(p)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------- run
def _check_namespaces(cfg: dict, enforced: dict) -> bool:
    """Record which namespaces this process is really in (compared with the host's); returns whether it is
    init of its own PID namespace. Outside one, it becomes a child subreaper: orphans of the program become
    its children, not init's, so none escapes the sweep."""
    host = cfg["host_ns"]
    in_pidns = os.getpid() == 1 and os.stat("/proc/self/ns/pid").st_ino != host["pid"]
    enforced["pid_namespace"] = in_pidns
    if not in_pidns:
        _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with open("/proc/self/net/dev") as f:  # the interfaces of this process's network namespace
        interfaces = {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}
    enforced["network"] = os.stat("/proc/self/ns/net").st_ino != host["net"] and interfaces <= {"lo"}
    return in_pidns


def _isolate(cfg: dict, enforced: dict, notes: list) -> None:
    """Set up the filesystem, record what the program will run under; raise if a required layer is missing."""
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


def _wait(pid: int, deadline: float) -> bool:
    """Wait until the program exits (left unreaped) or the deadline passes; returns whether it timed out."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    import select

    while True:
        # Reap orphans (zombies count against the process limit); leave the program itself unreaped until
        # the rest is killed, so that its pid and process group id stay reserved.
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        while info is not None and info.si_pid != pid:
            os.waitpid(info.si_pid, 0)
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        if pidfd is not None:
            select.select([pidfd], [], [], min(remaining, 0.5))
        else:
            time.sleep(min(remaining, 0.01))


def _launch(cfg: dict, report: dict) -> None:
    enforced, notes = report["enforced"], report["notes"]
    os.umask(0o022)
    in_pidns = _check_namespaces(cfg, enforced)
    pid, err_r, ready_r, go_w = _fork_program(cfg)
    try:
        if os.read(ready_r, 1) != b"1":
            raise RuntimeError("the program's process could not join its cgroups")
        os.close(ready_r)
        _isolate(cfg, enforced, notes)
    except BaseException:
        os.close(go_w)  # the child sees EOF and exits without running anything
        _kill_rest(cfg, pid, in_pidns)
        os.waitpid(pid, 0)
        raise
    started = time.monotonic()
    os.write(go_w, b"1")
    os.close(go_w)
    timed_out = _wait(pid, started + cfg["wall"])
    duration = time.monotonic() - started
    _kill_rest(cfg, pid, in_pidns)
    _, status, rusage = os.wait4(pid, 0)
    _reap_all(in_pidns)
    with os.fdopen(err_r, "rb") as f:
        exec_error = f.read().decode(errors="replace")
    if exec_error:
        raise RuntimeError(f"could not start the program: {exec_error}")
    report.update(timed_out=timed_out, duration_s=duration, cpu_s=rusage.ru_utime + rusage.ru_stime,
                  max_rss_kib=rusage.ru_maxrss,
                  exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


def _launcher_main(argv: list[str]) -> int:
    cfg = marshal.loads(bytes.fromhex(argv[2]))
    out = cfg["result_fd"]
    os.set_inheritable(out, False)
    report: dict[str, Any] = {"enforced": {}, "notes": []}
    try:
        _launch(cfg, report)
    except BaseException as exc:  # noqa: BLE001 - the program did not run: say why
        report["setup_error"] = f"{type(exc).__name__}: {exc}"
    with os.fdopen(out, "wb") as f:
        marshal.dump(report, f)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--launch":
    sys.exit(_launcher_main(sys.argv))
