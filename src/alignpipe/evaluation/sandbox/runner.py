"""Host side of a run: `run_python` writes the program (and the peer) into a fresh directory, starts the
launcher (under `unshare` when there are namespaces to create), collects the programs' output and the
launcher's report, kills and cleans up whatever is left, and turns the report into a `SandboxResult`."""

from __future__ import annotations

import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from alignpipe.evaluation.sandbox import launcher
from alignpipe.evaluation.sandbox.cgroups import _Cgroup
from alignpipe.evaluation.sandbox.config import SandboxConfig
from alignpipe.evaluation.sandbox.launcher import _kill_group
from alignpipe.evaluation.sandbox.limits import _choose_uid, _release_uid, _rlimits
from alignpipe.evaluation.sandbox.mounts import PEER_DIR, _set_owners
from alignpipe.evaluation.sandbox.namespaces import (
    _host_namespaces,
    _minimal_env,
    _namespaces_to_use,
    _unshare_cmd,
)
from alignpipe.evaluation.sandbox.result import SandboxResult, _verdict

_LAUNCHER = os.path.abspath(launcher.__file__)  # run as a script by path, never imported by the sandbox
# World-writable directories a program without a mount namespace could leave files in (swept by uid).
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def run_python(code: str, config: SandboxConfig | None = None,
               files: dict[str, str | bytes] | None = None, peer: str | None = None,
               peer_files: dict[str, str | bytes] | None = None) -> SandboxResult:
    """Run `code` as `main.py` in the sandbox; `files` (relative path -> content) are placed beside it.

    `peer`: a second program, run at the same time as `peer/main.py` (its cwd and home; `peer_files` beside
    it) under a uid of its own where the host can give one (`enforced["peer_separated"]`): it can then
    neither signal, trace nor read the memory or files of the program. Both get fd 3, the two ends of one
    Unix stream socket. The peer writes to `SandboxResult.peer_output` (stdout and stderr), never to the
    program's streams; the verdict is the program's. This is how a harness runs untrusted code it
    talks to without sharing its process (`code_verifier`)."""
    cfg = config or SandboxConfig()
    started = time.monotonic()
    root = os.geteuid() == 0
    python = os.path.abspath(cfg.python or sys.executable)
    use = _namespaces_to_use(cfg)
    notes: list[str] = []

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="alignpipe-sandbox-"))
    uids: list[tuple[int | None, bool]] = []  # (uid, unique) of the program, then of the peer
    cgroup: _Cgroup | None = None
    try:
        if peer is not None and any(_under_peer_dir(rel) for rel in files or {}):
            raise ValueError(f"sandbox file paths under {PEER_DIR}/ are the peer's")
        _write_files(workdir, {"main.py": code, **(files or {})})
        if peer is not None:
            _write_files(os.path.join(workdir, PEER_DIR), {"main.py": peer, **(peer_files or {})})
        uids.append(_choose_uid(python, use["mount"], notes) if root and cfg.drop_privileges else (None, False))
        if peer is not None:  # a second private uid, or the program's (no separation) when it has none
            uids.append(_choose_uid(python, use["mount"], notes) if uids[0][0] is not None else (None, False))
        if root and cfg.cgroups:
            cgroup = _Cgroup(cfg.memory_bytes, cfg.max_processes + len(uids))
            if not cgroup.dirs:
                notes.append("no writable memory/pids cgroup: total memory and the cgroup process limit are "
                             "not enforced")
        launch = _launch_config(cfg, workdir, python, uids, use, cgroup)
        if not use["mount"]:
            _set_owners(workdir, launch["uid"], launch["gid"], launch["peer"])
        proc, result_r, peer_r = _start(launch, use)
        streams, report_bytes, backstop = _collect(proc, result_r, peer_r, cfg)
        if cgroup:
            cgroup.kill_all()
        for uid, unique in uids:
            if uid is not None and unique and not use["pid"] and (backstop or not report_bytes):
                _host_sweep_uid(python, uid)  # the launcher did not get to its own sweep
        for uid, unique in uids:
            if uid is not None and unique:
                _remove_files_of(uid, keep=workdir)
    except BaseException:
        _cleanup(workdir, uids, cgroup)
        raise
    oom_kills = cgroup.oom_kills() if cgroup else 0
    pids_denied = cgroup.pids_denied() if cgroup else 0
    workdir_removed = _cleanup(workdir, uids, cgroup)
    out, err, peer_out = streams
    uid = uids[0][0]

    try:
        report = marshal.loads(report_bytes) if report_bytes else {}
    except (EOFError, ValueError, TypeError):
        report = {}
    if pids_denied:
        notes.append(f"cgroup refused {pids_denied} process creation(s)")
    res = SandboxResult(status="error", reason="", stdout=out.text(), stderr=err.text(),
                        stdout_bytes=out.total, stderr_bytes=err.total,
                        stdout_truncated=out.total > out.cap, stderr_truncated=err.total > err.cap,
                        elapsed_s=time.monotonic() - started, uid=uid, workdir=workdir,
                        workdir_removed=workdir_removed, notes=notes + report.get("notes", []))
    if peer is not None:
        res.peer_output, res.peer_uid = peer_out.text(), uids[1][0]
        res.peer_exit_code, res.peer_cpu_s = report.get("peer_exit_code"), report.get("peer_cpu_s")
        if report.get("peer_signal"):
            res.peer_signal = signal.Signals(report["peer_signal"]).name
    enforced = report.get("enforced", {})
    # The program's own environment is always clean; its ancestors' (/proc/PID/environ: the host process
    # holds the secrets) are out of reach only in a /proc of its own or under a uid other than the host's.
    res.enforced = {**enforced, "wall_time": True, "stdin_closed": True, "output_cap": True,
                    "clean_env": bool(enforced.get("private_proc")) or uid is not None}
    res.duration_s = report.get("duration_s", res.elapsed_s)
    res.cpu_s, res.max_rss_kib = report.get("cpu_s"), report.get("max_rss_kib")
    res.exit_code = report.get("exit_code")
    if report.get("signal"):
        res.signal = signal.Signals(report["signal"]).name
    res.status, res.reason = _verdict(report, res, cfg, backstop, proc.returncode, oom_kills)
    return res


# -------------------------------------------------------------------------------------------- start-up


def _under_peer_dir(rel: str) -> bool:
    return os.path.normpath(rel).split(os.sep)[0] == PEER_DIR


def _write_files(workdir: str, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        target = os.path.normpath(os.path.join(workdir, rel))
        if not target.startswith(workdir + os.sep):
            raise ValueError(f"sandbox file path escapes the working directory: {rel!r}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def _hidden_dirs(paths: tuple[str, ...]) -> list[str]:
    """`SandboxConfig.hidden_paths` resolved: existing directories other than /, each once."""
    hidden = []
    for p in paths:
        p = os.path.realpath(os.path.expanduser(p))
        if p != "/" and os.path.isdir(p) and p not in hidden:
            hidden.append(p)
    return hidden


def _interpreter_dirs(python: str) -> list[str]:
    """Directories the interpreter needs: its install prefix, and the venv for the running one."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    else:
        dirs = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
                os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    return sorted({os.path.realpath(d) for d in dirs})


def _program_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8"}


def _launch_config(cfg: SandboxConfig, workdir: str, python: str, uids: list[tuple[int | None, bool]],
                   use: dict[str, bool], cgroup: _Cgroup | None) -> dict[str, Any]:
    """The launcher's settings (marshalled onto its command line; `_start` adds `result_fd` and the peer's
    `output_fd`). The program runs under uid:gid `uids[0]` (None: the launcher's own), the peer, when there
    is one, under `uids[1]`."""
    root = os.geteuid() == 0
    (uid, uid_unique), argv = uids[0], [python, "-I", "-B", "main.py"]
    peer = None
    if len(uids) == 2:
        peer_dir = os.path.join(workdir, PEER_DIR)
        # Unbuffered (-u): the peer is killed when the program ends, and its last words are the useful ones.
        peer = {"workdir": peer_dir, "argv": [python, "-I", "-B", "-u", "main.py"],
                "env": _program_env(peer_dir), "uid": uids[1][0], "gid": uids[1][0], "uid_unique": uids[1][1]}
    return {
        "workdir": workdir, "python": python, "argv": argv, "env": _program_env(workdir), "peer": peer,
        "uid": uid, "gid": uid, "uid_unique": uid_unique, "wall": cfg.wall_time_s,
        "rlimits": _rlimits(cfg, count_user_processes=not root and not any(use.values())),
        "mounts": use["mount"], "hidden": _hidden_dirs(cfg.hidden_paths), "expose": _interpreter_dirs(python),
        "disk_bytes": cfg.disk_bytes, "cgroup_procs": cgroup.procs_files if cgroup else [],
        "cgroup_pids": bool(cgroup and "pids" in cgroup.dirs),
        "cgroup_memory": bool(cgroup and "memory" in cgroup.dirs),
        "host_ns": _host_namespaces(), "require": list(cfg.require), "root": root,
    }


def _start(launch: dict[str, Any], use: dict[str, bool]) -> tuple[subprocess.Popen, int, int | None]:
    """Start the launcher in a new session, with a minimal environment; returns it, the read end of the pipe
    it writes its report to and, with a peer, the read end of the peer's output pipe."""
    result_r, result_w = os.pipe()
    peer_r, peer_w = os.pipe() if launch["peer"] is not None else (None, None)
    launch = {**launch, "result_fd": result_w}
    if launch["peer"] is not None:
        launch["peer"] = {**launch["peer"], "output_fd": peer_w}
    cmd = _unshare_cmd([name for name, on in use.items() if on],
                       [sys.executable, "-I", "-S", _LAUNCHER, "--launch", marshal.dumps(launch).hex()])
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=tuple(fd for fd in (result_w, peer_w) if fd is not None),
                                start_new_session=True, env=_minimal_env(), cwd="/")
    except BaseException:
        for fd in (result_r, peer_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (result_w, peer_w):
            if fd is not None:
                os.close(fd)
    return proc, result_r, peer_r


# ------------------------------------------------------------------------------------- waiting, output


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


def _exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it (so its pid and process group id stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen, result_r: int, peer_r: int | None, cfg: SandboxConfig
             ) -> tuple[tuple[_Tail, _Tail, _Tail], bytes, bool]:
    """Read stdout, stderr, the peer's output and the launcher's report until all close; kill everything at
    the backstop. Returns the three streams, the report and whether the backstop fired."""
    out, err, peer_out = _Tail(cfg.max_output_bytes), _Tail(cfg.max_output_bytes), _Tail(cfg.max_output_bytes)
    report = _Tail(1 << 20)
    sel = selectors.DefaultSelector()
    for fd, sink in ((proc.stdout.fileno(), out), (proc.stderr.fileno(), err), (result_r, report),
                     (peer_r, peer_out)):
        if fd is not None:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, sink)
    deadline = time.monotonic() + cfg.wall_time_s + cfg.setup_grace_s
    backstop = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and _exited(proc.pid):
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
        if peer_r is not None:
            os.close(peer_r)
        proc.stdout.close()
        proc.stderr.close()
        _kill_group(proc.pid)  # before reaping: the group id cannot have been reused
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (out, err, peer_out), bytes(report.buf), backstop


# --------------------------------------------------------------------------------------------- cleanup


def _host_sweep_uid(python: str, uid: int) -> None:
    """Kill every process of a sandbox-private uid from the host (used when the launcher died)."""
    code = "import os\nfor _ in range(2):\n    try:\n        os.kill(-1, 9)\n    except OSError:\n        pass\n"
    try:
        subprocess.run([python, "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=_minimal_env(), cwd="/", timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


def _rmtree(path: str) -> bool:
    """Remove `path` and everything below it (whether it is gone). A directory the program made unwritable
    is opened up for its owner and tried again, but never `path`'s own parent (the shared /tmp, say)."""
    top = os.path.abspath(path)

    def retry(func: Any, p: str, _exc: Any) -> None:
        parent = os.path.dirname(os.path.abspath(p))
        if not (parent == top or parent.startswith(top + os.sep)):
            return
        try:
            os.chmod(parent, 0o700)
            func(p)
        except OSError:
            pass

    if not os.path.lexists(top):
        return True
    shutil.rmtree(top, onerror=retry)
    return not os.path.lexists(top)


def _remove_files_of(uid: int, keep: str) -> None:
    """Remove what a sandbox-private uid left in the shared world-writable directories (only reachable
    without a mount namespace: with one they are empty read-only tmpfs). Its processes are all dead by now.
    World-writable subdirectories of other owners are searched too; anything the uid owns goes, except
    `keep` (the working directory, which `_cleanup` removes)."""
    todo = list(_SHARED_DIRS)
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.path == keep:
                continue
            if st.st_uid == uid:
                if e.is_dir(follow_symlinks=False):
                    _rmtree(e.path)
                else:
                    try:
                        os.unlink(e.path)
                    except OSError:
                        pass
            elif e.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
                todo.append(e.path)


def _cleanup(workdir: str, uids: list[tuple[int | None, bool]], cgroup: _Cgroup | None) -> bool:
    """Remove the cgroup, give back the private uids and remove the working directory (whether it went)."""
    if cgroup:
        cgroup.remove()
    for uid, unique in uids:
        if uid is not None and unique:
            _release_uid(uid)
    return _rmtree(workdir)
