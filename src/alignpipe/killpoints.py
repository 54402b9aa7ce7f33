"""Named points where a run can be killed on purpose, to prove that a killed run resumes without losing or
duplicating a row (tests/test_kill_anywhere.py).

Every place where a kill would be dangerous calls `killpoint("what:where")`: between writing a temporary
file and renaming it, after each sampling shard and judging chunk, after each training step, between the
steps of a checkpoint save, after each held-out generation batch. With neither environment variable set a
killpoint is a dictionary lookup and nothing else.

- `ALIGNPIPE_KILL_TRACE=FILE`: append every point reached, one per line (the uninterrupted run's trace is
  where a test picks its kill points from).
- `ALIGNPIPE_KILL_PLAN=FILE`: a JSON object `{"kill": [POINT, ...], "fired": FIRED_FILE}`. The first time a
  point of the plan is reached it is appended to FIRED_FILE (fsynced) and the process kills itself with
  SIGKILL, as `kill -9` or the OOM killer would: no handler, no cleanup, no flushed buffers. Each planned
  point fires once, so a test reruns the same command until it exits 0.

Point names hold only what is the same in every run of a recipe (round, shard, step, file name relative to
its round directory), never a process id or an absolute path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from functools import cache
from pathlib import Path

_scopes: list[str] = []


@cache
def _settings() -> tuple[Path | None, frozenset[str], Path | None]:
    trace = os.environ.get("ALIGNPIPE_KILL_TRACE")
    plan_file = os.environ.get("ALIGNPIPE_KILL_PLAN")
    if not plan_file:
        return (Path(trace) if trace else None), frozenset(), None
    plan = json.loads(Path(plan_file).read_text())
    return (Path(trace) if trace else None), frozenset(plan["kill"]), Path(plan["fired"])


def killpoint(point: str) -> None:
    """Record `point` in the trace and die here if the kill plan says so (see the module docstring)."""
    trace, plan, fired = _settings()
    if trace is None and not plan:
        return
    point = "/".join([*_scopes, point])
    if trace is not None:
        with trace.open("a") as fh:
            fh.write(point + "\n")
    if point in plan and _claim(fired, point):
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(fired: Path, point: str) -> bool:
    """Record `point` as fired unless it already is; true for the one caller that recorded it. The check and
    the write hold an exclusive lock: in a multi-process run every process reaches the same training step at
    once, and the point must fire in one of them, once."""
    with fired.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        if point in fh.read().splitlines():
            return False
        fh.write(point + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        return True


def where(path: Path) -> str:
    """A file's name with its parent folder (`round-01/candidates.parquet`): the same in every run directory."""
    return f"{path.parent.name}/{path.name}"


@contextlib.contextmanager
def scope(label: str) -> Iterator[None]:
    """Prefix the points reached inside with `label/` (`round-01/train:step3`): a trainer's step 3 happens in
    every round, and a plan names the one to kill at."""
    _scopes.append(label)
    try:
        yield
    finally:
        _scopes.pop()
