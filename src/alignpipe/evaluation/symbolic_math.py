"""Symbolic answer comparison (math-verify) with a real time limit, the same on every thread.

math-verify's own timeout is `signal.alarm`, which refuses any thread but the main one (its error was
swallowed, so every LaTeX answer judged from a thread pool was False) and cannot interrupt sympy in the
middle of one long C call (`9^{9^{9}}` computes a 370-million-digit integer while holding the GIL, so a
thread-based deadline would not fire either). So math-verify runs here with its timeouts off, in worker
processes (`python -m alignpipe.evaluation.symbolic_math`, JSON lines on stdin/stdout), and the caller
waits at most `DEADLINE_S` for an answer; a worker past the deadline is killed and the comparison raises
`VerificationError("verification timed out")`. Power towers and huge exponents are refused before any
worker sees them (`refusal`), since they can only time out.

A worker starts in a second or two (sympy's import); that start is not counted against the deadline.
At most `MAX_WORKERS` run at once; idle ones are reused, and exit when this process closes their stdin.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

DEADLINE_S = 3.0  # one comparison; ordinary ones take well under a second
STARTUP_S = 120.0  # a worker importing sympy on a busy machine
MAX_WORKERS = 2
MAX_EXPONENT = 10_000  # larger integer exponents and factorials are refused, not computed


class VerificationError(RuntimeError):
    """The comparison could not be decided (timed out, refused, worker failure, unreadable reference)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _exponents(text: str) -> list[str]:
    """What follows each `^` (a braced group, a `\\command` or one character) and each `**`."""
    out = []
    for m in re.finditer(r"\^|\*\*", text):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if text[i:i + 1] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    out.append(text[i + 1:j])
                    break
            else:
                out.append(text[i + 1:])
        else:
            token = re.match(r"\\[A-Za-z]+|[+-]?\d+|.", text[i:])
            out.append(token.group(0) if token else "")
    return out


def refusal(text: str) -> str | None:
    """Why `text` is refused before sympy sees it (a power tower, an exponent or factorial over
    MAX_EXPONENT), or None."""
    if re.search(r"\^\s*(?:\{[^{}]*\}|[^{\s])\s*\^|\\uparrow", text):
        return "verification refused: power tower"
    for exponent in _exponents(text):
        if "^" in exponent or "**" in exponent:
            return "verification refused: power tower"
        value = re.fullmatch(r"\s*[+-]?(\d+)\s*", exponent)
        if value and int(value.group(1)) > MAX_EXPONENT:
            return f"verification refused: exponent over {MAX_EXPONENT}"
    if re.search(r"[eE][+-]?\d{6,}", text):
        return f"verification refused: exponent over {MAX_EXPONENT}"
    for factorial in re.findall(r"(\d+)\s*!", text):
        if int(factorial) > MAX_EXPONENT:
            return f"verification refused: factorial over {MAX_EXPONENT}"
    return None


class _Worker:
    """One math-verify process and its line protocol."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "alignpipe.evaluation.symbolic_math"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""
        if self._read_line(STARTUP_S) != {"ready": True}:
            self.kill()
            raise VerificationError("verification worker failed to start")

    def _read_line(self, timeout_s: float) -> dict | None:
        """The next JSON line from the worker, or None at the deadline or when it died."""
        assert self.proc.stdout is not None
        fd, end = self.proc.stdout.fileno(), time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def ask(self, predicted: str, gold: str, deadline_s: float) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"pred": predicted, "gold": gold}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise VerificationError(f"verification worker failed: {exc}") from exc
        reply = self._read_line(deadline_s)
        if reply is None:
            if self.proc.poll() is None:
                raise VerificationError("verification timed out")
            raise VerificationError(f"verification worker exited with code {self.proc.returncode}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


_idle: list[_Worker] = []
_idle_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_WORKERS)


@atexit.register
def shutdown_workers() -> None:
    """Stop the idle workers (a busy one is killed by its caller's deadline)."""
    with _idle_lock:
        workers, _idle[:] = list(_idle), []
    for worker in workers:
        worker.kill()


def _wrap(answer: str) -> str:
    """math-verify reads LaTeX between math delimiters (without them `\\sqrt{8}` is not read at all); an
    answer without any gets `$...$`."""
    return answer if any(d in answer for d in ("$", "\\(", "\\[")) else f"${answer}$"


@functools.lru_cache(maxsize=4096)  # a raise is not cached: a timeout is retried next time
def symbolic_match(predicted: str, gold: str, deadline_s: float = DEADLINE_S) -> bool:
    """math-verify's verdict on `predicted` against `gold`, decided within `deadline_s` seconds on any
    thread. Raises VerificationError when refused, timed out, or when `gold` itself cannot be read."""
    for text in (gold, predicted):
        if reason := refusal(text):
            raise VerificationError(reason)
    with _slots:
        with _idle_lock:
            worker = _idle.pop() if _idle else None
        if worker is None or worker.proc.poll() is not None:
            worker = _Worker()
        try:
            reply = worker.ask(_wrap(predicted), _wrap(gold), deadline_s)
        except BaseException:
            worker.kill()  # stuck or dead: never reused
            raise
        with _idle_lock:
            _idle.append(worker)
    if "error" in reply:
        raise VerificationError(f"math-verify failed: {reply['error']}")
    if not reply["gold_parsed"]:
        raise VerificationError("reference answer could not be parsed")
    return bool(reply["match"])


def _serve() -> None:
    """The worker: one JSON request per line in, one JSON reply per line out."""
    import logging

    # math-verify warns that its timeout is off (we time it from outside) and logs every malformed answer
    logging.disable(logging.CRITICAL)
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print from a library must not corrupt the protocol
    from math_verify import parse, verify

    def reply(obj: dict) -> None:
        protocol.write(json.dumps(obj).encode() + b"\n")
        protocol.flush()

    reply({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            gold = parse(request["gold"], parsing_timeout=None)
            pred = parse(request["pred"], parsing_timeout=None)
            match = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
            reply({"gold_parsed": bool(gold), "match": match})
        except Exception as exc:  # noqa: BLE001 - reported to the caller as this comparison's error
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    _serve()
