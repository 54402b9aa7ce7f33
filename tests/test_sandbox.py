"""The sandbox against hostile programs: each must end within its limit, leave the host untouched and leave
nothing behind (no process, no file, no working directory).

Expectations depend on what the machine lets the sandbox enforce; each test states them per layer and
reads `SandboxResult.enforced` (measured inside the sandbox) to pick the right one. On a root machine with
`unshare` (the project's machines) every layer is on, which `test_full_isolation_where_available` checks.
Network tests use loopback only: a port this test opens on 127.0.0.1. Nothing else is ever contacted.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignpipe.evaluation.sandbox import SandboxConfig, SandboxResult, capabilities, run_python
from alignpipe.evaluation.sandbox.cgroups import _Cgroup

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

FAST = SandboxConfig(wall_time_s=4.0, cpu_time_s=3.0, memory_bytes=256 << 20, max_processes=16,
                     max_output_bytes=16 << 10)
# Slack for process start-up, teardown and a loaded 2-core machine; a run never takes longer than this.
SLACK_S = 8.0
CAPS = capabilities()
FULL_ISOLATION = CAPS["root"] and all(CAPS[f"{k}_namespace"] for k in ("net", "pid", "mount"))
NO_NAMESPACES = SandboxConfig(wall_time_s=4.0, cpu_time_s=3.0, memory_bytes=256 << 20, max_processes=16,
                              network_namespace=False, pid_namespace=False, mount_namespace=False)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (uid, command line) of every process on the machine."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (uid, cmdline)
    return out


def _survivors(res: SandboxResult, marker: str | None = None) -> list[tuple[int, str]]:
    time.sleep(0.1)  # let the kernel finish tearing down what was just killed
    found = []
    for pid, (uid, cmdline) in _processes().items():
        private_uid = res.uid is not None and res.uid != 65534 and uid == res.uid
        if private_uid or (marker and marker in cmdline and "pytest" not in cmdline):
            found.append((pid, cmdline))
    return found


def _no_cgroups_left() -> bool:
    return not any(list(Path(parent).glob(f"alignpipe-sandbox-{os.getpid()}-*"))
                   for parent in set(_Cgroup._parents().values()))


def run(code: str, config: SandboxConfig = FAST, concurrent: bool = False, **kw) -> SandboxResult:
    started = time.monotonic()
    res = run_python(textwrap.dedent(code), config, **kw)
    elapsed = time.monotonic() - started
    assert elapsed < config.wall_time_s + SLACK_S, f"run took {elapsed:.1f}s: {res}"
    assert res.workdir_removed and not os.path.exists(res.workdir), res
    assert res.status in {"passed", "failed", "timeout", "error"}
    if CAPS["root"] and not concurrent:  # the run's cgroups are gone too
        assert _no_cgroups_left()
    return res


def test_ordinary_program_passes_and_reports() -> None:
    res = run("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n")
    assert res.status == "passed" and res.exit_code == 0 and res.reason == "exit code 0"
    assert res.stdout == "hello\n" and res.stderr == "warn\n"
    assert res.duration_s < FAST.wall_time_s and res.cpu_s is not None
    for key in ("cpu_time", "memory_per_process", "file_size", "wall_time", "clean_env", "output_cap"):
        assert res.enforced[key], key


def test_exception_is_a_failure_with_its_message() -> None:
    res = run("assert 1 == 2, 'boom'\n")
    assert res.status == "failed" and res.exit_code == 1
    assert "AssertionError: boom" in res.reason


@pytest.mark.skipif(not FULL_ISOLATION, reason="needs root and network/PID/mount namespaces")
def test_full_isolation_where_available() -> None:
    res = run("print('ok')")
    assert res.status == "passed"
    missing = [k for k, v in res.enforced.items() if not v]
    assert not missing, (missing, res.notes)
    assert res.uid is not None and res.uid != 0


# ------------------------------------------------------------------------------------------ hostile suite


@pytest.mark.parametrize("config", [FAST, NO_NAMESPACES], ids=["isolated", "no-namespaces"])
def test_fork_bomb(config: SandboxConfig) -> None:
    marker = f"forkbomb-{uuid.uuid4().hex}"
    res = run(f"""
        import os
        # {marker}
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, config)
    if not res.enforced["processes"]:
        pytest.skip(f"process limit not enforced here: {res.notes}")
    assert res.status == "timeout"
    assert not _survivors(res, marker)


def test_memory_bomb() -> None:
    res = run("""
        hoard = []
        while True:
            hoard.append(bytearray(32 << 20))
        """)
    assert res.status == "failed"
    assert "MemoryError" in res.reason or "memory" in res.reason
    assert not _survivors(res)


def test_memory_spread_over_processes_is_capped_in_total() -> None:
    res = run("""
        import os, time
        kids = []
        for _ in range(4):  # 4 x 96 MiB, each under the per-process limit, together over 256 MiB
            pid = os.fork()
            if pid == 0:
                block = b"x" * (96 << 20)
                time.sleep(1.5)
                os._exit(0)
            kids.append(pid)
        print("children", [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids])
        """, SandboxConfig(wall_time_s=8.0, memory_bytes=256 << 20))
    if not res.enforced["memory_total"]:
        pytest.skip("no memory cgroup here: only the per-process limit applies")
    assert "-9" in res.stdout or "memory limit" in res.reason  # the OOM killer stepped in
    assert not _survivors(res)


def test_huge_single_allocation() -> None:
    res = run("x = bytearray(64 << 30)\nprint('allocated')\n")
    assert res.status == "failed" and "MemoryError" in res.reason and "allocated" not in res.stdout


def test_infinite_loop_hits_cpu_limit() -> None:
    res = run("while True:\n    pass\n", SandboxConfig(wall_time_s=10.0, cpu_time_s=1.0))
    assert res.status == "timeout" and "CPU-time" in res.reason
    assert res.duration_s < 10.0


def test_ignoring_sigxcpu_does_not_help() -> None:
    res = run("""
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True:
            pass
        """, SandboxConfig(wall_time_s=10.0, cpu_time_s=1.0))
    assert res.status == "timeout" and "CPU-time" in res.reason


def test_sleeping_forever_hits_wall_limit() -> None:
    res = run("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)\n",
              SandboxConfig(wall_time_s=1.5))
    assert res.status == "timeout" and "wall-time" in res.reason


@pytest.mark.parametrize("config", [FAST, NO_NAMESPACES], ids=["isolated", "no-namespaces"])
def test_children_that_outlive_the_parent_are_killed(config: SandboxConfig) -> None:
    marker = f"straggler-{uuid.uuid4().hex}"
    res = run(f"""
        import os, subprocess, sys
        spin = "import os\\nif os.fork() == 0:\\n    os.setsid()\\n    while True:\\n        pass  # {marker}\\n"
        for _ in range(3):  # busy processes in their own sessions, double-forked away from the parent
            subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time\\ntime.sleep(3600)  # {marker}"])
        print("parent leaves")
        """, config)
    assert res.status == "passed" and "parent leaves" in res.stdout
    assert not _survivors(res, marker)


def test_network_is_blocked_to_host_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        res = run(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("CONNECTED")
            except OSError as exc:
                print("BLOCKED", exc)
            """)
        if not res.enforced["network"]:
            pytest.skip(f"no network namespace on this machine: {res.notes}")
        assert res.status == "passed" and "BLOCKED" in res.stdout and "CONNECTED" not in res.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener


def test_network_not_isolated_is_reported_honestly() -> None:
    """With the network namespace switched off the sandbox must say so (loopback connection succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        res = run(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            print("CONNECTED")
            """, SandboxConfig(wall_time_s=4.0, network_namespace=False))
        assert res.enforced["network"] is False
        assert "CONNECTED" in res.stdout


def test_reading_secrets_of_the_host() -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    secret_dir = tempfile.mkdtemp(prefix="alignpipe-secret-")  # world-readable, under /tmp
    try:
        os.chmod(secret_dir, 0o755)
        secret_file = Path(secret_dir) / "token.txt"
        secret_file.write_text(secret)
        os.chmod(secret_file, 0o644)
        res = run(f"""
            import os
            for path in ["/etc/shadow", {str(secret_file)!r}]:
                try:
                    print(path, "READ", open(path).read())
                except OSError as exc:
                    print(path, "DENIED", type(exc).__name__)
            for d in [{str(Path.home())!r}, os.path.expanduser("~"), "/root", "/home"]:
                try:
                    print(d, "LIST", sorted(os.listdir(d)))
                except OSError as exc:
                    print(d, "DENIED", type(exc).__name__)
            """)
    finally:
        secret_file.unlink(missing_ok=True)
        os.rmdir(secret_dir)
    lines = {line.split(" ", 1)[0]: line for line in res.stdout.splitlines()}
    if res.enforced["unprivileged"]:  # /etc/shadow is root's (mode 640): an unprivileged uid cannot read it
        assert "DENIED" in lines["/etc/shadow"]
    if res.enforced["hidden_paths"]:  # /tmp, /root, /home are empty read-only tmpfs inside the sandbox
        assert secret not in res.stdout and "DENIED" in lines[str(secret_file)]
        home_listing = lines[str(Path.home())]
        visible = set(eval(home_listing.split("LIST", 1)[1])) if "LIST" in home_listing else set()
        real = set(os.listdir(Path.home()))
        exposed = {Path(p).relative_to(Path.home()).parts[0] for p in {sys.prefix, sys.base_prefix}
                   if Path(p).is_relative_to(Path.home())}  # the interpreter, bound back in
        assert visible <= exposed and (real - exposed).isdisjoint(visible)
    assert f"{res.workdir} LIST" in res.stdout  # the sandbox's own ~ is its working directory


def test_writing_outside_the_working_directory_does_not_persist() -> None:
    tag = uuid.uuid4().hex
    targets = [f"/tmp/alignpipe_escape_marker_{tag}", f"/var/tmp/alignpipe_escape_marker_{tag}",
               f"/dev/shm/alignpipe_escape_marker_{tag}", f"{Path.home()}/alignpipe_escape_marker_{tag}",
               f"/alignpipe_escape_marker_{tag}"]
    try:
        res = run(f"""
            import os
            for path in {targets!r} + [os.path.join(os.getcwd(), "..", "alignpipe_escape_marker_{tag}")]:
                try:
                    with open(path, "w") as f:
                        f.write("escaped")
                    print(path, "WROTE")
                except OSError as exc:
                    print(path, "DENIED", type(exc).__name__)
            open("inside.txt", "w").write("fine")  # its own directory is writable
            print("INSIDE", open("inside.txt").read())
            """)
        assert res.status == "passed" and "INSIDE fine" in res.stdout
        if res.enforced["readonly_fs"] and res.enforced["hidden_paths"]:
            assert "WROTE" not in res.stdout
            leftovers = [p for p in targets if os.path.exists(p)]
            leftovers += [str(p) for p in Path(res.workdir).parent.glob(f"alignpipe_escape_marker_{tag}")]
            assert not leftovers
    finally:
        for p in [*targets, str(Path(tempfile.gettempdir()) / f"alignpipe_escape_marker_{tag}")]:
            if os.path.exists(p):
                os.unlink(p)


def test_huge_output_is_capped() -> None:
    res = run("""
        import sys
        chunk = "x" * (1 << 20)
        for _ in range(64):
            sys.stdout.write(chunk)
        sys.stderr.write("e" * (1 << 20) + "END")
        """)
    assert res.status == "passed"
    assert res.stdout_bytes == 64 << 20 and res.stdout_truncated and len(res.stdout) <= FAST.max_output_bytes
    assert res.stderr_truncated and res.stderr.endswith("END") and len(res.stderr) <= FAST.max_output_bytes


@pytest.mark.parametrize("limit", [None, 10**7])
def test_deep_recursion(limit: int | None) -> None:
    res = run(f"""
        import sys
        if {limit!r}:
            sys.setrecursionlimit({limit!r})
        def down(n):
            return down(n + 1) + 1
        down(0)
        """)
    assert res.status in {"failed", "timeout"}
    if limit is None:
        assert "RecursionError" in res.reason
    assert not _survivors(res)


def test_killing_the_parent_and_the_host() -> None:
    host = os.getpid()
    res = run(f"""
        import os, signal
        for target in (os.getppid(), {host}, 1):
            try:
                os.kill(target, signal.SIGKILL)
                print(target, "SENT")
            except OSError as exc:
                print(target, "REFUSED", type(exc).__name__)
        try:
            os.killpg(os.getpgid({host}), signal.SIGKILL)
        except OSError as exc:
            print("pgroup REFUSED", type(exc).__name__)
        print("still here", flush=True)
        try:
            os.kill(-1, signal.SIGKILL)  # everything this uid may signal (Linux spares the caller)
        except OSError as exc:
            print("kill(-1) REFUSED", type(exc).__name__, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    assert os.getpid() == host  # we are alive to assert
    assert res.status == "failed" and res.signal == "SIGKILL"
    assert "still here" in res.stdout
    if res.enforced["unprivileged"] and res.enforced["pid_namespace"]:
        assert f"{host} SENT" not in res.stdout


def test_environment_secrets_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"fake-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ALIGNPIPE_FAKE_SECRET", secret)
    res = run(f"""
        import os
        print(dict(os.environ))
        for pid in ("self", "1", str(os.getppid()), "{os.getpid()}"):
            try:
                print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as exc:
                print(pid, "DENIED", type(exc).__name__)
        """)
    assert res.status == "passed"
    assert secret not in res.stdout and secret not in res.stderr
    assert "ALIGNPIPE_FAKE_SECRET" not in res.stdout
    assert set(eval(res.stdout.splitlines()[0])) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}


@pytest.mark.parametrize(("module", "expected"), [
    ("import sys\nsys.exit(0)\n", ("passed", 0)),
    ("import sys\nsys.exit(5)\n", ("failed", 5)),
    ("import os\nos._exit(3)\n", ("failed", 3)),
])
def test_module_that_exits_on_import(module: str, expected: tuple[str, int]) -> None:
    res = run("import sys\nsys.path.insert(0, '.')\nimport evil\nprint('after import')\n",
              files={"evil.py": module})
    assert (res.status, res.exit_code) == expected
    assert "after import" not in res.stdout


def test_file_size_bomb() -> None:
    res = run("open('big.bin', 'wb').write(b'x' * (64 << 20))\n",
              SandboxConfig(wall_time_s=4.0, file_size_bytes=1 << 20))
    assert res.status == "failed" and "File too large" in res.reason


def test_disk_filling_with_many_files() -> None:
    res = run("""
        for i in range(200):
            with open(f"f{i}.bin", "wb") as f:
                f.write(b"x" * (1 << 20))
        print("wrote all")
        """, SandboxConfig(wall_time_s=4.0, disk_bytes=16 << 20))
    if not res.enforced["disk_total"]:
        pytest.skip("no tmpfs working directory here (no mount namespace)")
    assert res.status == "failed" and "No space left" in res.reason


def test_thread_bomb() -> None:
    res = run("""
        import threading, time
        while True:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        """)
    if not res.enforced["processes"]:
        pytest.skip("process limit not enforced here")
    assert res.status == "failed" and "can't start new thread" in res.stderr


def test_file_descriptor_exhaustion() -> None:
    res = run("""
        files = []
        while True:
            files.append(open("/dev/null"))
        """)
    assert res.status == "failed" and "Too many open files" in res.reason


def test_host_processes_are_invisible() -> None:
    res = run("import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))\n")
    if not res.enforced["private_proc"]:
        pytest.skip("no private /proc here")
    assert int(res.stdout) <= 3  # the launcher and the program itself


def test_required_isolation_refuses_to_run() -> None:
    tag = uuid.uuid4().hex
    res = run(f"print('{tag}')\n", SandboxConfig(wall_time_s=4.0, network_namespace=False,
                                                  require=("network",)))
    assert res.status == "error" and "network" in res.reason and tag not in res.stdout


def test_parallel_runs_do_not_interfere() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda i: run(f"import os\nprint({i}, os.getuid())\n", concurrent=True),
                                range(6)))
    assert all(r.status == "passed" for r in results)
    assert _no_cgroups_left()
    assert [int(r.stdout.split()[0]) for r in results] == list(range(6))
    uids = [r.uid for r in results]
    if CAPS["root"] and all(u is not None and u != 65534 for u in uids):
        assert all(int(r.stdout.split()[1]) == r.uid for r in results)


def test_host_signal_state_and_cwd_unchanged() -> None:
    cwd, handler = os.getcwd(), signal.getsignal(signal.SIGINT)
    run("import os\nos.chdir('/')\n")
    assert os.getcwd() == cwd and signal.getsignal(signal.SIGINT) == handler


def test_bad_file_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="escapes"):
        run_python("print(1)", FAST, files={"../outside.py": "x"})


def test_peer_program_runs_beside_the_program() -> None:
    """`run_python(peer=...)`: a second program in `peer/`, connected by fd 3, with an output of its own;
    the verdict is the program's. As root both run under private uids of their own."""
    res = run("""
        import os
        os.write(3, b"ping\\n")
        print("program got", os.read(3, 100), os.getuid())
        """, peer="""
import os, sys
print("peer got", os.read(3, 100), os.getuid(), os.getcwd().endswith("/peer"))
print("to stderr", file=sys.stderr)
os.write(3, b"pong")
""", peer_files={"data.txt": "x"})
    assert res.status == "passed" and "program got b'pong'" in res.stdout, res
    assert "peer got b'ping\\n'" in res.peer_output and "True" in res.peer_output
    assert "to stderr" in res.peer_output and "peer got" not in res.stdout + res.stderr
    assert res.peer_exit_code in (0, None)  # it may be killed once the program has ended
    if CAPS["root"] and res.uid is not None and res.uid != 65534:
        assert res.enforced["peer_separated"] and res.peer_uid not in (None, res.uid)
        assert str(res.peer_uid) in res.peer_output and str(res.uid) in res.stdout
    with pytest.raises(ValueError, match="peer"):
        run_python("print(1)", FAST, files={"peer/x.py": "x"}, peer="print(2)")
