"""The sandbox's filesystem: ownership of the working directory and, in a private mount namespace, the mounts.

Standard library only and no package imports: the launcher (run as a script, `python -I -S`) loads this file
from its own directory, and the host imports it as part of the package (ownership and mountinfo helpers).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the launcher's start-up is paid per run)
if TYPE_CHECKING:
    from typing import Any

PEER_DIR = "peer"  # the peer program's directory inside the working directory (see `runner.run_python`)

# mount(2) flags
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """Give `top` and everything below it to uid:gid."""
    for dirpath, _dirs, names in os.walk(top):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
            os.chown(p, uid, gid)


def _set_owners(workdir: str, uid: int | None, gid: int | None, peer: dict | None) -> None:
    """Give the working directory to the program's uid (None: leave it) and, with a peer, its `peer/`
    directory to the peer's uid. With a peer, the program's own files are closed to everyone else and the
    top directory is only passable (mode 711): the peer reaches its directory but can neither list nor
    read the program's files (the harness's tests, for one)."""
    if uid is not None:
        _chown_tree(workdir, uid, gid if gid is not None else uid)
    if peer is None:
        return
    peer_dir = os.path.join(workdir, PEER_DIR)
    if peer["uid"] is not None:
        _chown_tree(peer_dir, peer["uid"], peer["gid"])
    for dirpath, dirs, names in os.walk(workdir):
        if dirpath == workdir and PEER_DIR in dirs:
            dirs.remove(PEER_DIR)
        for p in [os.path.join(dirpath, n) for n in names + dirs]:
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o700)
    os.chmod(workdir, 0o711)
    os.chmod(peer_dir, 0o700)


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


def setup_mounts(cfg: dict, enforced: dict, notes: list) -> None:
    """In the launcher's private mount namespace: a fresh /proc, everything read-only, the hidden paths
    covered, the working directory a size-limited tmpfs holding a copy of the host directory's files."""
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
    _set_owners(workdir, uid, gid, cfg["peer"])
    enforced["disk_total"] = enforced["private_workdir"] = True
