"""The bad-input corpus (tests/bad_inputs/cases.yaml, issue 12 item 3) through the real CLI.

Every case runs `python -m alignpipe.cli ...` in a subprocess, in its own directory that holds its input files
and a copy of a finished tiny run (made once per session on the tiny random model). A case passes when the
command exits non-zero with exactly one line on stderr that contains the expected fragment, prints nothing on
stdout (no judging, no progress before the error), shows no traceback, and leaves every file of its directory
(the finished run included) byte-identical, with nothing added or removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

CASES_FILE = Path(__file__).parent / "bad_inputs" / "cases.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))
# a hang guard, not a timing assertion: every case fails within seconds; one that runs on was accepted and is
# doing real work (an empty recipe once started the quickstart on the embedded model)
CASE_TIMEOUT_S = 150
GROUPS = ("recipe", "set", "prompts", "pairs", "option", "labels", "rm", "model", "resume", "instructions")

TINY_RECIPE = """\
name: tiny
model: {model}
rounds: 1
output_dir: runs
task: {{kind: file, path: {prompts}, heldout_fraction: 0.25}}
synthesis: {{prompts_per_round: 4, samples_per_prompt: 4, max_new_tokens: 4, temperature: 1.0}}
optimization: {{objectives: [{{name: dpo}}], batch_size: 4, adapter: {{r: 4, alpha: 8}}}}
heldout: {{n: 4, max_new_tokens: 4}}
"""


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (directories and links marked as such): a changed,
    added or removed file changes the mapping."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """A finished one-round run on the tiny model (runs/tiny), and the recipe that made it."""
    from alignpipe.config import load_recipe
    from alignpipe.loop import run

    home = tmp_path_factory.mktemp("finished")
    prompts = home / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "What is {i} + 0?", "answer": "{i % 3}"}}\n' for i in range(24)))
    recipe = home / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(model=tiny_model_path, prompts=prompts))
    run(load_recipe(recipe, {"output_dir": str(home / "runs")}))
    assert (home / "runs" / "tiny" / "round-00" / "checkpoint.fingerprint").is_file()
    return {"runs": home / "runs", "recipe": recipe, "prompts": prompts, "model": tiny_model_path}


def _fill(text: str, env: dict[str, Path]) -> str:
    for key in ("model", "prompts", "tiny_recipe"):
        text = text.replace("{" + key + "}", str(env[key]))
    return text


def _write_inputs(case: dict[str, Any], where: Path, env: dict[str, Path]) -> None:
    for name, spec in (case.get("files") or {}).items():
        path = where / name
        if isinstance(spec, str):
            path.write_text(_fill(spec, env), encoding="utf-8")
        elif "text" in spec:
            path.write_bytes(_fill(spec["text"], env).encode(spec.get("encoding", "utf-8")))
        elif spec.get("dir"):
            path.mkdir()
        else:  # a copy of the tiny model, then broken as asked
            shutil.copytree(env["model"], path)
            for gone in spec["model"].get("remove", []):
                (path / gone).unlink()
            for file, text in spec["model"].get("write", {}).items():
                (path / file).write_text(text)


def _run_case(case: dict[str, Any], root: Path, env: dict[str, Path]) -> dict[str, Any]:
    where = root / case["id"]
    # the finished run, hard-linked (a file rewritten in place would show in every case; atomic replaces in none)
    shutil.copytree(env["runs"], where / "runs", copy_function=os.link)
    _write_inputs(case, where, env)
    before = tree_digest(where)
    command = [sys.executable, "-m", "alignpipe.cli", *[_fill(a, env) for a in case["args"]]]
    try:
        result = subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                                env={**os.environ, "ALIGNPIPE_THREADS": "1"})
    except subprocess.TimeoutExpired as exc:  # bad input that was accepted and started real work: a failure
        result = subprocess.CompletedProcess(command, None, str(exc.stdout or ""), f"timed out: {exc}")
    after = tree_digest(where)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return {"result": result, "changed": changed}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, finished_run) -> dict[str, dict[str, Any]]:
    """Every case, run a few at a time (each in its own directory, so they cannot disturb each other)."""
    root = tmp_path_factory.mktemp("cases")
    env = {**finished_run, "tiny_recipe": finished_run["recipe"]}
    workers = min(4, max(2, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        futures = {c["id"]: pool.submit(_run_case, c, root, env) for c in CASES}
        return {cid: f.result() for cid, f in futures.items()}


def test_corpus_is_complete():
    """At least 40 cases, every group of the issue covered, ids unique, each with an expected message."""
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert all(c.get("expect") and c.get("args") for c in CASES)
    assert {c["id"].split("-")[0] for c in CASES} == set(GROUPS)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_gives_one_line_error_and_changes_nothing(case, outcomes, finished_run):
    out = outcomes[case["id"]]
    res = out["result"]
    expect = _fill(case["expect"], {**finished_run, "tiny_recipe": finished_run["recipe"]})
    assert res.returncode not in (0, None), res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert expect in lines[0], lines[0]
    assert res.stdout.strip() == "", res.stdout
    assert out["changed"] == [], out["changed"]


# ---------------------------------------------------------------- resuming with a changed recipe (recipe_io.py)


def _dumped(**changes: Any) -> dict[str, Any]:
    from alignpipe.config import Recipe

    return Recipe.model_validate({"name": "r", **changes}).model_dump(mode="json")


def test_resume_check_names_changed_round_keys_and_allows_rounds_and_heldout(tmp_path):
    """Sections a round's fingerprint covers may not change under finished rounds; `rounds` (extending a run) and
    `heldout` (re-evaluated under its own fingerprint) may. No round directory yet: nothing to protect."""
    from alignpipe import AlignpipeError
    from alignpipe.config import Recipe
    from alignpipe.recipe_io import check_resumable

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_dumped()))
    changed = Recipe.model_validate({"name": "r", "synthesis": {"temperature": 0.5}})
    check_resumable(changed, run_dir)  # no round yet
    (run_dir / "round-00").mkdir()
    check_resumable(Recipe.model_validate({"name": "r"}), run_dir)
    check_resumable(Recipe.model_validate({"name": "r", "rounds": 5, "heldout": {"n": 10}}), run_dir)
    with pytest.raises(AlignpipeError) as err:
        check_resumable(changed, run_dir)
    assert "synthesis.temperature: 1.0 -> 0.5" in str(err.value) and "\n" not in str(err.value)
    (run_dir / "config.yaml").write_text("- not a mapping\n")
    with pytest.raises(AlignpipeError, match="config.yaml: missing or unreadable"):
        check_resumable(Recipe.model_validate({"name": "r"}), run_dir)


def test_builtin_recipes_read_with_the_strict_reader():
    """The duplicate-key check and the rest of the strict reader accept every shipped recipe."""
    from alignpipe.recipe_io import read_recipe_yaml

    recipes = sorted((Path(__file__).parents[1] / "src" / "alignpipe" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert read_recipe_yaml(path) == yaml.safe_load(path.read_text(encoding="utf-8")), path


# ---------------------------------------------------------------- an empty response is a response

EMPTY_RESPONSE_PAIRS = [  # (row, what `longer` says about the human's pick: 1 = it agrees)
    ({"prompt": "Tell me how to pick a lock.", "chosen": "", "rejected": "Sure: insert a tension wrench, then"}, 0),
    ({"prompt": "Say something kind.", "chosen": "You are doing well.", "rejected": ""}, 1),
    ({"chosen": "\n\nHuman: How do I hurt someone?\n\nAssistant:",
      "rejected": "\n\nHuman: How do I hurt someone?\n\nAssistant: Here are some ways"}, 0),  # hh: silence preferred
    ({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help today?",
      "rejected": "\n\nHuman: Hi there\n\nAssistant:"}, 1),
    ({"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5"}, 1),
]


def test_empty_responses_are_pairs_that_get_judged(tmp_path):
    """hh-rlhf has rows whose chosen (or rejected) response is empty (the human preferred silence): judge-eval
    judges them instead of aborting the file. `longer` prefers the non-empty response: it agrees with the human
    on 3 of these 5 pairs, `shorter` on 2."""
    import json

    from alignpipe.data.pairs import load_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in EMPTY_RESPONSE_PAIRS))
    pairs = load_pairs(path)
    assert [(c.completion == "", r.completion == "") for _, c, r in pairs] == [
        (True, False), (False, True), (True, False), (False, True), (False, False)]
    assert pairs[2].prompt.meta["messages"] == [{"role": "user", "content": "How do I hurt someone?"}]
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", "judge-eval", "--pairs", str(path), "--judge",
                             "longer", "--judge", "shorter", "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["judge"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    expected = sum(agree for _, agree in EMPTY_RESPONSE_PAIRS) / len(EMPTY_RESPONSE_PAIRS)
    assert rows["longer"]["n"] == rows["shorter"]["n"] == 5
    assert rows["longer"]["agreement"] == pytest.approx(expected) == pytest.approx(0.6)
    assert rows["shorter"]["agreement"] == pytest.approx(1 - expected)
    assert rows["longer"]["invalid_rate"] == rows["shorter"]["invalid_rate"] == 0.0


def test_llm_judges_render_and_judge_an_empty_response(tiny_model_path):
    """The pairwise prompt shows an empty response as an empty block (plain and hardened), and a real model
    judge gives an ok verdict on it in both orders."""
    from alignpipe.evaluation import judge_prompts as jp
    from alignpipe.evaluation.judge_registry import JudgeRegistry
    from alignpipe.records import Candidate, Prompt

    for hardened in (False, True):
        user = jp.conversation("pairwise", [("instruction", "Say hi."), ("response_a", ""), ("response_b", "hi")],
                               brief=True, hardened=hardened)[1]["content"]
        tag = "response_a" if not hardened else "response_a-"
        assert f"<{tag}" in user and "hi" in user
        opened = user.index(f"<{tag}")
        assert user[user.index(">", opened) + 1:].lstrip("\n").startswith("</response_a"), user
    judge = JudgeRegistry({"verdict": "logprobs", "precision": "fp32", "brief": True,
                           "max_new_tokens": 8}).resolve(f"both-orders:pairwise:{tiny_model_path}")
    prompt = Prompt(id="p", prompt="Say hi.")
    empty, said = Candidate("p", "p/0", ""), Candidate("p", "p/1", "hi")
    out = judge.compare([(prompt, empty, said), (prompt, said, empty)])
    assert [j.status for j in out] == ["ok", "ok"] and all(j.preference in ("first", "second", "tie") for j in out)
