"""`SandboxResult`, and the verdict (`status`, `reason`) drawn from the launcher's report."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from alignpipe.evaluation.sandbox.config import SandboxConfig, _cpu_limit_s


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
    # With a peer program (`run_python(peer=...)`): its output (stdout and stderr), status and uid.
    peer_output: str = ""
    peer_exit_code: int | None = None
    peer_signal: str | None = None
    peer_cpu_s: float | None = None
    peer_uid: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def cpu_limit_hit(signal_name: str | None, cpu_s: float | None, cfg: SandboxConfig) -> bool:
    """Whether a process that ended by `signal_name` after `cpu_s` of CPU was stopped by the CPU-time limit
    (SIGXCPU at the soft limit, SIGKILL at the hard one)."""
    return signal_name == "SIGXCPU" or (signal_name == "SIGKILL" and (cpu_s or 0) >= _cpu_limit_s(cfg))


def _verdict(report: dict, res: SandboxResult, cfg: SandboxConfig, backstop: bool, launcher_rc: int | None,
             oom_kills: int) -> tuple[str, str]:
    """`status` and `reason` of a run, from the launcher's report (empty when there was none), the result
    filled in so far, whether the host backstop fired, the launcher's exit code and the cgroup's OOM kills."""
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
    if cpu_limit_hit(signal.Signals(sig).name if sig else None, res.cpu_s, cfg):
        return "timeout", f"CPU-time limit of {_cpu_limit_s(cfg):g}s exceeded"
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
