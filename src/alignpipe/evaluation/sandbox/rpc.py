"""Calls across the sandbox's peer socket: a trusted harness calls a function of untrusted code that runs in
the peer process (`run_python(harness, peer=...)`), and gets back plain values only.

Values cross as JSON in a tagged form (`encode`/`decode`) that holds only the exact builtin types None,
bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset; an instance of any other type
(a subclass of int included) is refused by the peer's encoder and could not be decoded by the harness
anyway. So what the harness compares is always a value it built itself, with builtin `__eq__`: an object
whose `__eq__` always returns True never reaches it. The peer's side (its encoder, its `serve` loop) runs
in the untrusted process and may be replaced by the candidate; it can then answer anything, which is no
more than a function returning a plain value could do.

Standard library only, no package imports, and only cheap ones (both processes pay them on every run; the
socket is used through its fd, without the `socket` module): this file is copied into the sandbox as
`_alignpipe_rpc.py` (the harness executes it into a namespace of its own; the peer's `main.py` is this file
plus a `serve(...)` call).
"""

from __future__ import annotations

import builtins
import json
import os
import sys

FD = 3  # both programs' end of the socket pair (see `run_python`)
BAD_ARGUMENT_EXIT = 86  # the harness could not send an argument: a test-data problem, not the candidate's
MAX_MESSAGE = 256 << 20
# Exceptions of the candidate re-raised as themselves in the harness; any other becomes a RuntimeError, so
# that e.g. a StopIteration cannot end a test's `for` loop over `map(candidate, ...)` early.
RAISED_AS_IS = ("ArithmeticError", "AssertionError", "AttributeError", "EOFError", "FloatingPointError",
                "ImportError", "IndexError", "KeyError", "LookupError", "MemoryError", "NameError",
                "NotImplementedError", "OverflowError", "RecursionError", "RuntimeError", "TypeError",
                "UnboundLocalError", "UnicodeError", "ValueError", "ZeroDivisionError")

_SEQUENCES = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
_BUILD = {"l": list, "t": tuple, "s": set, "fs": frozenset}


class CandidateEnded(RuntimeError):
    """The candidate's process closed the connection (it exited, crashed or was killed)."""


def encode(x: object) -> object:
    """`x` as JSON-ready data; TypeError for anything but the exact builtin types listed above."""
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return ["i", format(x, "x")]  # hex: exact, and no limit on the digits of big ints
    if t is float:
        return ["f", x.hex()]  # exact, with inf and nan
    if t is complex:
        return ["c", x.real.hex(), x.imag.hex()]
    if t is bytes:
        return ["b", x.hex()]
    if t in _SEQUENCES:
        return [_SEQUENCES[t], [encode(v) for v in x]]
    if t is dict:
        return ["d", [[encode(k), encode(v)] for k, v in x.items()]]
    raise TypeError(f"a {t.__module__}.{t.__qualname__} is not a plain builtin value")


def decode(v: object) -> object:
    """The value `encode` made; ValueError for anything malformed (the peer is not trusted)."""
    if v is None or v is True or v is False or type(v) is str:
        return v
    if type(v) is not list or not v or type(v[0]) is not str:
        raise ValueError(f"malformed value from the candidate's process: {str(v)[:80]}")
    tag, rest = v[0], v[1:]
    if tag in ("i", "f", "b") and len(rest) == 1 and type(rest[0]) is str:
        return {"i": lambda s: int(s, 16), "f": float.fromhex, "b": bytes.fromhex}[tag](rest[0])
    if tag == "c" and len(rest) == 2 and all(type(p) is str for p in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag in _BUILD and len(rest) == 1 and type(rest[0]) is list:
        return _BUILD[tag](decode(item) for item in rest[0])
    if tag == "d" and len(rest) == 1 and type(rest[0]) is list:
        pairs = rest[0]
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict from the candidate's process")
        return {decode(k): decode(val) for k, val in pairs}
    raise ValueError(f"malformed value from the candidate's process: tag {tag[:20]!r}")


def _send(fd: int, message: object) -> None:
    data = memoryview(json.dumps(message).encode() + b"\n")  # json.dumps never writes a raw newline
    while data:
        data = data[os.write(fd, data):]


def remote(entry_point: str, fd: int = FD) -> object:
    """(Harness side) a stand-in for the candidate's `entry_point`: each call is sent to the peer, and its
    answer comes back as a plain value or as an exception."""
    replies = open(fd, "rb", closefd=False)  # noqa: SIM115 - lives as long as the stand-in

    def candidate(*args: object, **kwargs: object) -> object:
        try:
            request = {"args": [encode(a) for a in args], "kwargs": {k: encode(v) for k, v in kwargs.items()}}
        except TypeError as exc:  # the tests pass something that cannot cross: nothing is known
            sys.stderr.write(f"harness error: cannot send an argument of {entry_point} to the candidate: {exc}\n")
            sys.stderr.flush()
            os._exit(BAD_ARGUMENT_EXIT)
        try:
            _send(fd, request)
            line = replies.readline(MAX_MESSAGE)
        except OSError:
            line = b""
        if not line.endswith(b"\n"):
            raise CandidateEnded("the candidate's process ended before the tests finished" if not line
                                 else "the candidate's answer is too long")
        reply = json.loads(line)
        if type(reply) is dict and "ok" in reply:
            return decode(reply["ok"])
        if type(reply) is dict and type(reply.get("raise")) is list and len(reply["raise"]) == 2:
            name, message = (str(p)[:2000] for p in reply["raise"])
            if name in RAISED_AS_IS:
                raise getattr(builtins, name)(message)
            raise RuntimeError(f"{name[:100]}: {message}")
        raise ValueError("malformed answer from the candidate's process")

    candidate.__name__ = candidate.__qualname__ = entry_point
    return candidate


def serve(path: str, entry_point: str, fd: int = FD) -> None:
    """(Peer side) run the candidate's file as `__main__`, then answer calls of its `entry_point` until the
    harness closes the connection."""
    requests = open(fd, "rb", closefd=False)  # noqa: SIM115 - read until the harness closes it
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
    exec(compile(source, path, "exec"), namespace)  # noqa: S102 - the peer's whole purpose
    function = namespace.get(entry_point)
    for line in requests:
        request = json.loads(line)
        try:
            if not callable(function):
                raise NameError(f"the candidate defines no function {entry_point!r}")
            args = [decode(a) for a in request["args"]]
            kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
            reply = {"ok": encode(function(*args, **kwargs))}
        except Exception as exc:  # noqa: BLE001 - the candidate's exception is its answer
            reply = {"raise": [type(exc).__name__, str(exc)]}
        _send(fd, reply)
