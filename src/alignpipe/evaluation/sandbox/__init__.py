"""Run untrusted Python code in a separate, locked-down process.

`run_python(code)` writes the program into a fresh temporary directory and runs it with `python -I -B`
under a small launcher (`launcher.py`, run as a script). Every layer of isolation below is applied when
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
  of each kept;
- a peer program (`run_python(code, peer=...)`, optional): untrusted code beside a trusted program, in
  `peer/` under a second private uid (it can neither signal, trace nor read the program, whose files are
  closed to it), connected to it by a socket pair on fd 3, with an output stream of its own. The verdict
  is the program's; `code_verifier` runs its tests as the program and the candidate as the peer (`rpc`).

Without the namespaces (no `unshare`, or the kernel forbids them) the program still runs with the
limits, the private uid (where the interpreter is reachable by it) and the cleanup sweeps (the launcher is
a child subreaper, so orphans come back to it; process group, cgroup members and the private uid are
killed; files the private uid left in /tmp, /var/tmp, /dev/shm and /run/lock are removed), and `enforced`
says what is missing.

Modules: `config` (`SandboxConfig`), `result` (`SandboxResult`, the verdict), `runner` (`run_python`:
the host side), `launcher` (the sandbox side, standalone), `mounts` (the filesystem set-up, loaded by the
launcher), `limits` (rlimits, the program's uid), `cgroups`, `namespaces` (`unshare`, `capabilities()`),
`rpc` (calls from a harness to a function in the peer, plain values only).
"""

from __future__ import annotations

from alignpipe.evaluation.sandbox.config import DEFAULT_HIDDEN_PATHS, SandboxConfig
from alignpipe.evaluation.sandbox.namespaces import capabilities
from alignpipe.evaluation.sandbox.result import SandboxResult
from alignpipe.evaluation.sandbox.runner import run_python

__all__ = ["DEFAULT_HIDDEN_PATHS", "SandboxConfig", "SandboxResult", "capabilities", "run_python"]
