"""Hostile code against the sandbox and the code verifier (issue 12): candidates that try to pass without being
right, and programs that try to outlive, leak from or reach out of their sandbox.

Each case names the layer it relies on and reads `SandboxResult.enforced` (measured in the sandbox) where a
machine may lack it, skipping with the reason when it does. "No namespaces" runs use the system interpreter
(`/usr/bin/python3`, reachable by an unprivileged uid), so that as root they still run under a private uid:
the layer under test is then the one that exists without namespaces. Network cases only ever contact
listeners this file opens on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from alignpipe.evaluation.code_verifier import code_verifier
from alignpipe.evaluation.sandbox import SandboxConfig, SandboxResult, run_python
from alignpipe.evaluation.sandbox.runner import _rmtree
from alignpipe.records import Candidate, Judgment, Prompt

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None
FAST = SandboxConfig(wall_time_s=4.0, cpu_time_s=3.0, memory_bytes=256 << 20, max_processes=16)
NO_NAMESPACES = SandboxConfig(wall_time_s=4.0, cpu_time_s=3.0, memory_bytes=256 << 20, max_processes=16,
                              network_namespace=False, pid_namespace=False, mount_namespace=False,
                              python=SYSTEM_PYTHON)
CONFIGS = pytest.mark.parametrize("config", [FAST, NO_NAMESPACES], ids=["isolated", "no-namespaces"])
SLACK_S = 8.0  # start-up and teardown on a loaded 2-core machine; a hang guard, not a measurement

ADD = Prompt(id="add", prompt='def add(a, b):\n    """Return a + b."""\n', task="code",
             reference="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
                       "    assert candidate(2, 2) == 4\n",
             meta={"entry_point": "add"})
TOKEN_RE = r"alignpipe-tests-passed-[0-9a-f]{32}"


def judge(completion: str, config: SandboxConfig | None = None) -> Judgment:
    return code_verifier(ADD, Candidate(prompt_id=ADD.id, id="c", completion=completion), config)


def run(code: str, config: SandboxConfig = FAST, **kw) -> SandboxResult:
    started = time.monotonic()
    res = run_python(textwrap.dedent(code), config, **kw)
    assert time.monotonic() - started < config.wall_time_s + SLACK_S, res
    assert res.workdir_removed and not os.path.exists(res.workdir), res
    return res


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (never this test process)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _pids_of_uid(uid: int | None) -> list[int]:
    if uid is None or uid == 65534:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


# ------------------------------------------------------------------------------- the code verifier's verdict

# Wrong answers dressed up to compare equal to anything. The candidate's process is not the harness's: only
# exact builtin values cross, so each fails (before the fix, every one of them passed).
EQUAL_TO_ANYTHING = {
    "eq_always_true": """
        class Anything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = object.__hash__
        return Anything()
    """,
    "int_subclass": """
        class Int(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        return Int(0)
    """,
    "str_subclass": """
        class Str(str):
            def __eq__(self, other):
                return True
            __hash__ = str.__hash__
        return Str("wrong")
    """,
    "float_subclass": """
        class Float(float):
            __eq__ = lambda self, other: True
            __hash__ = float.__hash__
        return Float(0.5)
    """,
    "list_subclass": """
        class List(list):
            __eq__ = lambda self, other: True
        return List()
    """,
}


@pytest.mark.parametrize("body", list(EQUAL_TO_ANYTHING.values()), ids=list(EQUAL_TO_ANYTHING))
@pytest.mark.parametrize("config", [None, NO_NAMESPACES], ids=["isolated", "no-namespaces"])
def test_answers_that_compare_equal_to_anything_do_not_pass(body: str, config: SandboxConfig | None) -> None:
    completion = "\n".join("    " + line for line in textwrap.dedent(body).strip().splitlines()) + "\n"
    j = judge(completion, config)
    assert j.status == "ok" and j.scores == {"passed": 0.0}, j
    assert "not a plain builtin value" in j.reason


# Candidates that forge the old success token (a random string printed after check()) from wherever it
# could be found, print it and exit with status 0. Before the fix each of these passed.
FORGERIES = {
    "reads_own_file": """
        import os, re
        for t in set(re.findall(r"{re}", open(__file__).read())):
            print(t, flush=True)
        os._exit(0)
    """,
    "reads_main_py_from_cwd_and_parent": """
        import os, re
        for path in ("main.py", "../main.py", "/proc/self/cwd/main.py"):
            try:
                for t in set(re.findall(r"{re}", open(path).read())):
                    print(t, flush=True)
            except OSError:
                pass
        os._exit(0)
    """,
    "caller_code_constants": """
        import os, re, sys
        f = sys._getframe()
        while f is not None:
            for c in f.f_code.co_consts:
                if isinstance(c, str) and re.fullmatch(r"{re}", c):
                    print(c, flush=True)
            f = f.f_back
        os._exit(0)
    """,
    "inspect_stack": """
        import inspect, os, re
        for info in inspect.stack():
            try:
                lines = inspect.findsource(info.frame)[0]
            except OSError:
                continue
            for t in set(re.findall(r"{re}", "".join(lines))):
                print(t, flush=True)
        os._exit(0)
    """,
    "gc_objects": """
        import gc, os, re
        for o in gc.get_objects():
            for c in getattr(getattr(o, "__code__", None), "co_consts", ()) or ():
                if isinstance(c, str) and re.fullmatch(r"{re}", c):
                    print(c, flush=True)
        for f in gc.get_objects():
            if type(f).__name__ == "code":
                for c in f.co_consts:
                    if isinstance(c, str) and re.fullmatch(r"{re}", c):
                        print(c, flush=True)
        os._exit(0)
    """,
    "prints_a_made_up_marker": """
        import os
        print("alignpipe-tests-passed-" + "0" * 32, "passed", "OK", flush=True)
        os._exit(0)
    """,
}


@pytest.mark.parametrize("body", list(FORGERIES.values()), ids=list(FORGERIES))
def test_forged_success_markers_do_not_pass(body: str) -> None:
    code = textwrap.dedent(body).strip().replace("{re}", TOKEN_RE)
    completion = "    return a - b  # wrong\n" + code + "\n"  # module level: runs before any test
    j = judge(completion)
    assert j.status == "ok" and j.scores == {"passed": 0.0}, j
    inside = "\n".join("    " + line for line in code.splitlines()) + "\n"  # inside the function under test
    j = judge(inside)
    assert j.status == "ok" and j.scores == {"passed": 0.0}, j


EXITS = {
    "sys_exit_at_import": "    return a - b\nimport sys\nsys.exit(0)\n",
    "os_exit_at_import": "    return a - b\nimport os\nos._exit(0)\n",
    "sys_exit_in_function": "    import sys\n    sys.exit(0)\n",
    "os_exit_in_function": "    import os\n    os._exit(0)\n",
    "atexit_rewrites_status": ("    return a - b\nimport atexit, os\natexit.register(lambda: os._exit(0))\n"),
    "excepthook_swallows_failure": ("    return a - b\nimport os, sys\n"
                                    "sys.excepthook = lambda *a: os._exit(0)\n"),
    "kills_itself_after_first_call": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
}


@pytest.mark.parametrize("completion", list(EXITS.values()), ids=list(EXITS))
def test_exiting_with_status_zero_does_not_pass(completion: str) -> None:
    j = judge(completion)
    assert j.status == "ok" and j.scores == {"passed": 0.0}, j
    assert j.reason.startswith("failed")


def test_stop_iteration_cannot_end_a_test_loop_early() -> None:
    """A test iterating over `map(candidate, ...)` ends early when a call raises StopIteration in-process."""
    prompt = Prompt(id="sq", prompt='def sq(x):\n    """x squared."""\n', task="code",
                    reference="def check(candidate):\n    for got, want in zip(map(candidate, [1, 2, 3]), [1, 4, 9]):\n"
                              "        assert got == want\n", meta={"entry_point": "sq"})
    j = code_verifier(prompt, Candidate(prompt_id="sq", id="c", completion="    raise StopIteration\n"))
    assert j.scores == {"passed": 0.0} and "RuntimeError" in j.reason, j
    j = code_verifier(prompt, Candidate(prompt_id="sq", id="c", completion="    return x * x\n"))
    assert j.scores == {"passed": 1.0}, j


@pytest.mark.parametrize("config", [None, NO_NAMESPACES], ids=["isolated", "no-namespaces"])
def test_a_correct_candidate_cannot_reach_the_harness(config: SandboxConfig | None) -> None:
    """The candidate is right, and tries everything against the harness on the side: read the tests, list the
    harness's directory, read other processes' memory and environment, stop or kill them. With separate uids
    every attempt is refused and the verdict stands."""
    j = judge(textwrap.dedent("""
        return a + b
    import os, signal
    def attempt(what, action):
        try:
            action()
            print(what, "DONE", flush=True)
        except OSError as exc:
            print(what, "REFUSED", type(exc).__name__, flush=True)
    attempt("read-tests", lambda: open("../main.py").read())
    attempt("read-rpc", lambda: open("../_alignpipe_rpc.py").read())
    attempt("list-harness-dir", lambda: os.listdir(".."))
    me, reached, tried = os.getpid(), [], 0
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]:
        for what, action in ((f"environ-{pid}", lambda: open(f"/proc/{pid}/environ", "rb").read()),
                             (f"mem-{pid}", lambda: open(f"/proc/{pid}/mem", "rb").read(1)),
                             (f"stop-{pid}", lambda: os.kill(pid, signal.SIGSTOP))):
            tried += 1
            try:
                action()
                reached.append(what)
            except OSError:
                pass
    print("other processes: tried", tried, "reached", reached, flush=True)  # one line: the tail is capped
    attempt("kill-all", lambda: os.kill(-1, signal.SIGKILL))  # every process this uid may signal
    """), config)
    raw = json.loads(j.raw)
    if not raw["peer_separated"]:
        pytest.skip("candidate and harness share a uid here (not root, or no private uid): "
                    f"{raw['candidate_output_tail'][-300:]}")
    output = raw["candidate_output_tail"]
    assert "read-tests REFUSED" in output and "list-harness-dir REFUSED" in output, output
    assert " DONE" not in output.replace("kill-all DONE", ""), output  # kill(-1) reaches its own uid only
    assert "reached []" in output and "tried 0 " not in output, output
    assert j.scores == {"passed": 1.0}, j


# --------------------------------------------------------------------------------------- the sandbox itself


@CONFIGS
def test_setsid_double_fork_daemon_is_gone_before_it_writes(config: SandboxConfig) -> None:
    """A daemon (fork, setsid, fork, exec) that waits past the verdict, then writes outside its directory:
    it must not survive the verdict, and nothing it would write may appear (checked after its sleep)."""
    if config.python and not os.access(config.python, os.X_OK):
        pytest.skip("no system interpreter for the no-namespace run")
    marker = f"hostile-daemon-{uuid.uuid4().hex}"
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", f"/run/lock/{marker}"]
    daemon = (f"import time\ntime.sleep(1.5)\nfor p in {targets!r} + ['../{marker}', '{marker}-inside']:\n"
              f"    try:\n        open(p, 'w').write('late')\n    except OSError:\n        pass\n")
    res = run(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", {daemon!r}])
            os._exit(0)
        print("verdict now")
        """, config)
    assert res.status == "passed" and "verdict now" in res.stdout
    assert not _pids_with(marker) and not _pids_of_uid(res.uid)  # nothing of the run is alive
    time.sleep(2.5)  # past the daemon's sleep: had it survived, its files would be there now
    leftovers = [p for p in [*targets, str(Path(res.workdir).parent / marker)] if os.path.exists(p)]
    for p in leftovers:
        os.unlink(p)
    assert not leftovers


@CONFIGS
def test_parent_environments_do_not_reveal_a_secret(config: SandboxConfig, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """/proc/1/environ and the environ of every ancestor (walking PPid up to the top)."""
    secret = f"hostile-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ALIGNPIPE_HOSTILE_SECRET", secret)
    res = run("""
        import os
        def ppid(pid):
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("PPid:"):
                    return int(line.split()[1])
            return 0
        pids, pid = ["1"], os.getppid()
        while pid > 0 and len(pids) < 20:
            pids.append(str(pid))
            try:
                pid = ppid(pid)
            except OSError:
                break
        for pid in pids:
            try:
                print(pid, "READ", open(f"/proc/{pid}/environ", "rb").read())
            except OSError as exc:
                print(pid, "REFUSED", type(exc).__name__)
        """, config)
    assert res.status == "passed", res
    if not res.enforced["clean_env"]:
        pytest.skip(f"the program can read the host's /proc/PID/environ here (same uid, no private /proc): "
                    f"{res.notes}")
    assert secret not in res.stdout and "ALIGNPIPE_HOSTILE_SECRET" not in res.stdout, res.stdout
    assert "1 " in res.stdout  # it did look


@CONFIGS
def test_filling_dev_shm_is_bounded_and_leaves_nothing(config: SandboxConfig) -> None:
    """Files in /dev/shm (tmpfs: memory) written until something stops it. Bounded by the read-only empty
    tmpfs over /dev/shm with a mount namespace, else by the memory cgroup (tmpfs pages are charged to the
    writer); whatever was written is removed after the verdict."""
    tag = f"hostile-shm-{uuid.uuid4().hex}"
    limit = 128 << 20
    cfg = SandboxConfig(**{**config.__dict__, "memory_bytes": limit, "wall_time_s": 6.0})
    res = run(f"""
        import os
        total = 0
        for i in range(96):  # 96 x 8 MiB = 768 MiB, six times the memory limit
            try:
                with open("/dev/shm/{tag}-%d" % i, "wb") as f:
                    f.write(b"x" * (8 << 20))
            except OSError as exc:
                print("STOPPED", type(exc).__name__, exc, flush=True)
                break
            total += 8 << 20
            print("TOTAL", total, flush=True)
        """, cfg)
    totals = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("TOTAL")]
    left = sorted(p.name for p in Path("/dev/shm").glob(f"{tag}-*"))
    for name in left:
        (Path("/dev/shm") / name).unlink()
    if res.enforced["hidden_paths"] or (res.uid is not None and res.uid != 65534):
        assert not left, f"{len(left)} files left in /dev/shm"  # none written, or swept by the private uid
    else:
        pytest.skip("no mount namespace and no private uid here: files left in /dev/shm cannot be told from "
                    "the user's own")
    if not (res.enforced["hidden_paths"] or res.enforced["memory_total"]):
        pytest.skip("neither a mount namespace nor a memory cgroup here: /dev/shm is bounded by its own size")
    assert max(totals, default=0) <= limit, (totals[-3:], res.reason)
    if res.enforced["hidden_paths"]:
        assert not totals and "STOPPED" in res.stdout


def _listeners() -> dict[str, socket.socket]:
    out = {}
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    out["tcp4"] = tcp
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    out["udp4"] = udp
    try:
        tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp6.bind(("::1", 0))
        tcp6.listen(8)
        out["tcp6"] = tcp6
    except OSError:
        pass  # no IPv6 loopback on this host
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(f"\0alignpipe-hostile-{uuid.uuid4().hex}")  # abstract: belongs to the network namespace
    unix.listen(8)
    out["unix-abstract"] = unix
    for s in out.values():
        s.setblocking(False)
    return out


def test_loopback_listeners_see_no_connection() -> None:
    listeners = _listeners()
    try:
        addrs = {name: s.getsockname() for name, s in listeners.items()}
        res = run(f"""
            import socket
            addrs = {addrs!r}
            families = {{"tcp4": (socket.AF_INET, socket.SOCK_STREAM), "udp4": (socket.AF_INET, socket.SOCK_DGRAM),
                         "tcp6": (socket.AF_INET6, socket.SOCK_STREAM),
                         "unix-abstract": (socket.AF_UNIX, socket.SOCK_STREAM)}}
            for name, addr in addrs.items():
                family, kind = families[name]
                s = socket.socket(family, kind)
                s.settimeout(1)
                try:
                    addr = addr[:2] if family != socket.AF_UNIX else addr
                    if kind == socket.SOCK_DGRAM:
                        s.sendto(b"hello", addr)
                    else:
                        s.connect(addr)
                        s.sendall(b"hello")
                    print(name, "SENT")
                except OSError as exc:
                    print(name, "BLOCKED", type(exc).__name__)
            """)
        if not res.enforced["network"]:
            pytest.skip(f"no network namespace on this machine: {res.notes}")
        assert res.status == "passed" and " SENT" not in res.stdout, res.stdout
        assert res.stdout.count("BLOCKED") == len(addrs)
        for name, s in listeners.items():  # nothing ever reached the host's listeners
            with pytest.raises(BlockingIOError):
                s.recv(16) if name == "udp4" else s.accept()
    finally:
        for s in listeners.values():
            s.close()


def test_removing_or_moving_its_own_directory_leaves_the_host_as_it_was() -> None:
    """Without a mount namespace the working directory is a host directory in /tmp, owned by the program's
    uid, which may rename or delete it (sticky /tmp allows the owner). Whatever it moved out is removed,
    and /tmp keeps its mode (a failed removal of the vanished directory once made /tmp mode 700)."""
    marker = f"hostile-moved-{uuid.uuid4().hex}"
    before = os.stat("/tmp").st_mode
    res = run(f"""
        import os
        os.rename(os.getcwd(), "/tmp/{marker}")
        open("/tmp/{marker}-file", "w").write("left behind")
        print("moved")
        """, NO_NAMESPACES)
    left = [p for p in (f"/tmp/{marker}", f"/tmp/{marker}-file") if os.path.lexists(p)]
    assert os.stat("/tmp").st_mode == before
    if res.uid is None or res.uid == 65534:
        for p in left:
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        pytest.skip("no private uid here: files the program leaves in /tmp cannot be told from others'")
    assert res.status == "passed" and "moved" in res.stdout, res
    assert not left


def test_failed_removal_never_opens_up_the_parent(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert _rmtree(str(shared / "already-gone"))  # the working directory vanished: nothing to do
    locked = shared / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("x")
    (locked / "inner").chmod(0o500)  # the program made a subdirectory unwritable: opened up, then removed
    assert _rmtree(str(locked))
    assert shared.stat().st_mode & 0o7777 == 0o1777


@CONFIGS
def test_a_candidate_daemon_does_not_survive_its_harness(config: SandboxConfig) -> None:
    """The peer (the candidate's process) double-forks a daemon that would write after the verdict; the
    harness ends at once. Every process of the peer's uid goes with the run."""
    marker = f"hostile-peer-daemon-{uuid.uuid4().hex}"
    daemon = f"import time\ntime.sleep(1.5)\nopen('/tmp/{marker}', 'w').write('late')\n"
    res = run("import socket\nsocket.socket(fileno=3).recv(1)\n", config, peer=textwrap.dedent(f"""
        import os, socket, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", {daemon!r}])
            os._exit(0)
        socket.socket(fileno=3).sendall(b"x")
        """))
    assert res.status == "passed", res
    assert not _pids_with(marker) and not _pids_of_uid(res.peer_uid)
    time.sleep(2.0)  # past the daemon's sleep
    left = os.path.exists(f"/tmp/{marker}")
    if left:
        os.unlink(f"/tmp/{marker}")
    assert not left


def test_required_peer_separation_refuses_to_run_without_it() -> None:
    """`require=("peer_separated",)` where the peer would share the program's uid: neither runs."""
    cfg = SandboxConfig(wall_time_s=4.0, drop_privileges=False, require=("peer_separated",))
    res = run("print('program ran')", cfg, peer="print('peer ran')")
    assert res.status == "error" and "peer_separated" in res.reason
    assert "ran" not in res.stdout + res.peer_output
