"""The launcher: the sandbox's first process, run as a script by path.

The host (`runner.py`) starts it as `python -I -S launcher.py --launch CONFIG` (CONFIG: its settings,
marshalled, in hex), inside the new namespaces when there are any, as root when the host is root. `-I -S`
puts neither this directory nor site-packages on `sys.path`: this file and `mounts.py` beside it (loaded by
path, for the filesystem set-up) use the standard library only, and import only cheap modules up front (its
start-up is paid on every run). It sets up the mounts, starts the program in a child (limits, cgroups, uid,
exec), and the peer program in a second child when there is one, waits for the program with the wall-time
limit, kills what is left and writes a report (marshal) to the result pipe. Nothing here may assume a
namespace: every check is made on the spot. The host imports the helpers of the first section from here too.
"""

from __future__ import annotations

import marshal
import os
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (about 10 ms)
if TYPE_CHECKING:
    from typing import Any

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_SIGKILL = 9


# ------------------------------------------------------------------------- helpers shared with the host
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


# ---------------------------------------------------------------------------------------------- program
def _child(cfg: dict, prog: dict, cgroup_fds: list[int], ready_w: int, go_r: int, channel: int | None
           ) -> None:
    """In the forked child: join the cgroups, wait until the launcher has set up the filesystem, then limits,
    privileges and exec of `prog` (the program or the peer). Never returns. (The cgroups are joined before
    the mounts turn read-only, and by the child only, so the launcher is never the cgroup's OOM victim.)"""
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
    if prog["uid"] is not None:
        os.setgroups([])
        os.setresgid(prog["gid"], prog["gid"], prog["gid"])
        os.setresuid(prog["uid"], prog["uid"], prog["uid"])
    elif os.geteuid() == 0:
        try:
            os.setgroups([])
        except OSError:
            pass
    os.chdir(prog["workdir"])
    os.umask(0o022)
    if prog.get("output_fd") is not None:  # the peer writes to a stream of its own, not the program's
        os.dup2(prog["output_fd"], 1)
        os.dup2(prog["output_fd"], 2)
    if channel is not None:  # fd 3 in both programs: the two ends of one socket pair
        if channel != 3:
            os.dup2(channel, 3)
        os.set_inheritable(3, True)
    os.execve(cfg["python"], prog["argv"], prog["env"])


def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _fork_program(cfg: dict, prog: dict, channel: int | None) -> tuple[int, int, int, int]:
    """Fork a process for `prog` (`_child`). Returns its pid and the launcher's ends of three pipes: exec
    error (EOF once the exec happened), ready (the child joined its cgroups), go (let the child exec)."""
    import fcntl

    cgroup_fds = [os.open(p, os.O_WRONLY) for p in cfg["cgroup_procs"]]
    # Above fd 3 (close-on-exec: EOF means the exec happened), so that moving the channel to fd 3 keeps it.
    err_r, err_w = os.pipe()
    err_w_high = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 4)
    os.close(err_w)
    err_w = err_w_high
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (err_r, ready_r, go_w):
                os.close(fd)
            _child(cfg, prog, cgroup_fds, ready_w, go_r, channel)
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


def _kill_rest(cfg: dict, children: list[int], in_pidns: bool) -> None:
    """Kill the programs and everything they started. `children` are the ones not reaped yet (a pid, and so
    its process group id, stays reserved until then)."""
    if in_pidns:  # init of our own PID namespace: -1 means exactly the sandbox's processes
        _kill(-1)
        return
    for child in children:
        _kill(child)
        _kill_group(child)
    _kill_cgroup_members(cfg["cgroup_procs"])  # same PID namespace as the host here: these pids are ours
    for prog in (cfg, cfg["peer"] or {}):
        if prog.get("uid") is not None and prog["uid_unique"]:
            _sweep_uid(prog["uid"], prog["gid"])


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
        from mounts import setup_mounts  # beside this file (see _launcher_main)

        setup_mounts(cfg, enforced, notes)
    dropped = cfg["uid"] is not None
    enforced["unprivileged"] = dropped or not cfg["root"]
    # RLIMIT_NPROC binds any uid but root's; unique uid (or user namespace): only this sandbox counts.
    enforced["processes"] = (dropped and cfg["uid_unique"]) or not cfg["root"] or cfg["cgroup_pids"]
    enforced["no_new_privs"] = True
    for key in ("cpu_time", "memory_per_process", "file_size"):
        enforced[key] = True
    peer = cfg["peer"]
    if peer is not None:  # two distinct private uids: the peer can neither signal, trace nor read the program
        enforced["peer_separated"] = (dropped and cfg["uid_unique"] and peer["uid"] is not None
                                      and peer["uid_unique"] and peer["uid"] != cfg["uid"])
    missing = [k for k in cfg["require"] if not enforced.get(k)]
    if missing:
        raise RuntimeError(f"required isolation not available: {', '.join(missing)}")


def _wait(pid: int, deadline: float, peer: int | None, statuses: dict) -> bool:
    """Wait until the program exits (left unreaped) or the deadline passes; returns whether it timed out.
    The peer's status and rusage, when it is reaped here, go into `statuses`."""
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
            _, status, rusage = os.wait4(info.si_pid, 0)
            if info.si_pid == peer:
                statuses[peer] = (status, rusage)
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


def _programs(cfg: dict) -> list[dict]:
    """The program and, when there is one, the peer, as `_child` takes them."""
    main = {"workdir": cfg["workdir"], "argv": cfg["argv"], "env": cfg["env"], "uid": cfg["uid"],
            "gid": cfg["gid"]}
    return [main] + ([cfg["peer"]] if cfg["peer"] is not None else [])


def _status(status: int) -> tuple[int | None, int | None]:
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


def _launch(cfg: dict, report: dict) -> None:
    enforced, notes = report["enforced"], report["notes"]
    os.umask(0o022)
    in_pidns = _check_namespaces(cfg, enforced)
    progs = _programs(cfg)
    channels: list[int | None] = [None]
    if len(progs) == 2:
        import socket

        channels = [s.detach() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)]
        os.set_inheritable(cfg["peer"]["output_fd"], False)
    forks: list[tuple[int, int, int, int]] = []
    try:
        for prog, channel in zip(progs, channels, strict=True):
            forks.append(_fork_program(cfg, prog, channel))
        for channel in channels:  # only the two programs hold the socket pair: EOF when one ends
            if channel is not None:
                os.close(channel)
        for _, _, ready_r, _ in forks:
            if os.read(ready_r, 1) != b"1":
                raise RuntimeError("the program's process could not join its cgroups")
            os.close(ready_r)
        _isolate(cfg, enforced, notes)
    except BaseException:
        for *_, go_w in forks:
            os.close(go_w)  # the child sees EOF and exits without running anything
        _kill_rest(cfg, [f[0] for f in forks], in_pidns)
        for pid, *_ in forks:
            os.waitpid(pid, 0)
        raise
    started = time.monotonic()
    for *_, go_w in reversed(forks):  # the peer first: it is ready when the program starts calling it
        os.write(go_w, b"1")
        os.close(go_w)
    pid, peer = forks[0][0], (forks[1][0] if len(forks) == 2 else None)
    statuses: dict[int, tuple] = {}
    timed_out = _wait(pid, started + cfg["wall"], peer, statuses)
    duration = time.monotonic() - started
    _kill_rest(cfg, [pid] + ([peer] if peer is not None and peer not in statuses else []), in_pidns)
    _, status, rusage = os.wait4(pid, 0)
    if peer is not None and peer not in statuses:
        statuses[peer] = os.wait4(peer, 0)[1:]
    _reap_all(in_pidns)
    for name, (_, err_r, _, _) in zip(("program", "peer")[:len(forks)], forks, strict=True):
        with os.fdopen(err_r, "rb") as f:
            exec_error = f.read().decode(errors="replace")
        if exec_error:
            raise RuntimeError(f"could not start the {name}: {exec_error}")
    exit_code, sig = _status(status)
    report.update(timed_out=timed_out, duration_s=duration, cpu_s=rusage.ru_utime + rusage.ru_stime,
                  max_rss_kib=rusage.ru_maxrss, exit_code=exit_code, signal=sig)
    if peer is not None:
        peer_status, peer_rusage = statuses[peer]
        report["peer_exit_code"], report["peer_signal"] = _status(peer_status)
        report["peer_cpu_s"] = peer_rusage.ru_utime + peer_rusage.ru_stime


def _launcher_main(argv: list[str]) -> int:
    cfg = marshal.loads(bytes.fromhex(argv[2]))
    out = cfg["result_fd"]
    os.set_inheritable(out, False)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `mounts` only (-I leaves it off)
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
