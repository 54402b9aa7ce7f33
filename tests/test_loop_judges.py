"""Every judge inside the loop: LLM judges on a real llama.cpp server, reward models, the policy judging itself,
failed judgments kept out of training, reruns that ask again only what failed, and one code path with
judge-eval."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny import digit_prompts

from alignpipe import AlignpipeError
from alignpipe.config import Recipe, load_recipe
from alignpipe.loop import run
from alignpipe.records import Candidate, Judgment, Prompt, read_records

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_PROMPTS = ["Say hello.", "Name a colour.", "Give me a fruit.", "Tell me a number.", "Name an animal.",
                "Say goodbye.", "Name a city.", "Give me a word."]


def _chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "task": "chat"}) + "\n" for p in CHAT_PROMPTS))
    return path


def _recipe(tmp_path, model, evaluation, **extra):
    data = {
        "name": "judged", "model": str(model), "rounds": 1, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(_chat_file(tmp_path)), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 3, "samples_per_prompt": 3, "max_new_tokens": 5, "temperature": 1.0},
        "evaluation": evaluation,
        "optimization": {"objectives": [{"name": "dpo"}], "batch_size": 2, "adapter": {"r": 4, "alpha": 8},
                         "max_length": 64},
        "heldout": {"n": 2, "max_new_tokens": 5, "judge": "longer"},
    }
    data.update(extra)
    return Recipe.model_validate(data)


def _judgments(tmp_path, name="judged"):
    rows = read_records(tmp_path / "runs" / name / "round-00" / "judgments.parquet", Judgment)
    return pd.DataFrame([vars(j) for j in rows])


def test_loop_with_pairwise_llm_judge_on_llama_cpp_server(tmp_path, tiny_model_path, llama_server):
    """OAIF's shape on a real server: k = 3 samples, all 3 pairs asked in both orders, win rates per candidate."""
    recipe = _recipe(tmp_path, tiny_model_path, {
        "judge": f"pairwise:{llama_server}#smollm2-135m-instruct", "verdict": "generate", "max_new_tokens": 8})
    summary = run(recipe)
    js = _judgments(tmp_path)
    raw = js[js.candidate_ids.map(len) == 2]
    single = js[js.candidate_ids.map(len) == 1]
    assert len(single) == 9 and len(raw) == 3 * 3 * 2  # 3 prompts x 3 pairs x both orders
    assert set(raw.judge) == {"llm_pairwise:smollm2-135m-instruct"}
    ok = single[single.status == "ok"]
    assert all(0.0 <= s["win_rate"] <= 1.0 for s in ok.scores)
    for r in single.itertuples():  # a candidate without an ok verdict has no score: never a training signal
        assert (r.status == "ok") == bool(r.scores)
    metrics = summary["rounds"][0]
    assert metrics["judge"]["pairwise"]["comparisons"] == 18
    assert set(metrics["judgments_not_ok"]) <= {"invalid", "error"}
    assert summary["heldout_winrate"]["judge"] == "longer" and summary["heldout_winrate"]["n"] == 2
    assert summary["heldout_metric"] == "win_rate" and summary["before"]["accuracy"] is None


def _sequence_classifier(tmp_path, tiny_model_path):
    """A reward model directory: the tiny Llama with a one-logit classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_loop_with_reward_model_judge_trains_groups(tmp_path, tiny_model_path):
    rm = _sequence_classifier(tmp_path, tiny_model_path)
    recipe = _recipe(tmp_path, tiny_model_path, {"judge": f"reward-model:{rm}"},
                     instantiation={"kind": "group"},
                     optimization={"objectives": [{"name": "grpo"}], "batch_size": 2,
                                   "adapter": {"r": 4, "alpha": 8}, "max_length": 64})
    summary = run(recipe)
    js = _judgments(tmp_path)
    assert len(js) == 9 and (js.status == "ok").all()
    scores = [next(iter(s.values())) for s in js.scores]
    assert len(set(scores)) > 1  # a real classifier on different texts
    assert summary["rounds"][0]["examples"] == 3 and summary["rounds"][0]["train"]["steps"] > 0


def test_policy_judges_its_own_samples_and_reruns_ask_only_failed(tmp_path, tiny_model_path, monkeypatch):
    """Self-rewarding: `additive` on the live policy. Half the judge's first answers fail; those candidates are
    left out and counted; a rerun of the killed round re-asks exactly those."""
    from alignpipe.synthesis import backends

    asked: list[int] = []
    calls = []
    original = backends.LiveModelBackend.choice_logprobs

    def flaky(self, conversations, *args, **kw):
        asked.append(len(conversations))
        calls.append(1)
        out = original(self, conversations, *args, **kw)
        if len(calls) == 1:  # the first call: every other row "fails" as a crashed batch would
            out = [backends.BackendError("injected failure") if i % 2 else o for i, o in enumerate(out)]
        return out

    monkeypatch.setattr(backends.LiveModelBackend, "choice_logprobs", flaky)
    recipe = _recipe(tmp_path, tiny_model_path, {"judge": "additive", "model": "policy", "verdict": "logprobs"})
    summary = run(recipe)
    metrics = summary["rounds"][0]
    assert metrics["judgments_not_ok"] == {"error": 4} and metrics["judge"]["error_rate"] == pytest.approx(4 / 9)
    examples = pd.read_parquet(tmp_path / "runs" / "judged" / "round-00" / "examples.parquet")
    failed = set(_judgments(tmp_path).query("status != 'ok'").candidate_ids.map(lambda c: c[0]))
    assert len(failed) == 4
    cands = pd.read_parquet(tmp_path / "runs" / "judged" / "round-00" / "candidates.parquet").set_index("id")
    failed_texts = {cands.loc[c, "completion"] for c in failed}
    ok_texts = set(cands.completion) - failed_texts
    for e in examples.itertuples():  # no failed candidate became chosen or rejected (unless its text is shared)
        assert e.chosen in ok_texts and e.rejected in ok_texts

    # kill after judging: the rerun reads the judged rows back and asks only the 4 failed ones again
    round_dir = tmp_path / "runs" / "judged" / "round-00"
    for name in ("metrics.json", "checkpoint.fingerprint"):
        (round_dir / name).unlink()
    asked.clear()
    again = run(recipe)
    assert asked == [4]
    assert again["rounds"][0]["judgments_not_ok"] == {}


def test_down_server_gives_error_rows_and_the_round_goes_on(tmp_path, tiny_model_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _recipe(tmp_path, tiny_model_path, {"judge": f"pointwise:http://127.0.0.1:{port}/v1#m"})
    summary = run(recipe)
    metrics = summary["rounds"][0]
    assert metrics["judgments_not_ok"] == {"error": 9} and metrics["examples"] == 0
    assert metrics["train"]["steps"] == 0
    js = _judgments(tmp_path)
    assert js.reason.str.contains("backend").all()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("evaluation.judge", "pairwse", "evaluation.judge: unknown judge 'pairwse'"),
    ("evaluation.judge", "reward-model:/no/such/dir", "evaluation.judge: judge 'reward-model:/no/such/dir': "
     "reward-model directory not found"),
    ("evaluation.both_orders", "sometimes", "evaluation.both_orders: Input should be a valid boolean"),
    ("evaluation.max_comparisons", 0, "evaluation.max_comparisons: Input should be greater than or equal to 1"),
    ("heldout.judge", "ensemble:vote:longer", "heldout.judge: judge 'ensemble:vote:longer': an ensemble needs"),
])
def test_bad_judge_options_fail_at_load_time_naming_the_key(key, value, message):
    with pytest.raises(AlignpipeError) as err:
        load_recipe("quickstart", {key: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cross_family_judge_is_refused(tmp_path, tiny_model_path):
    from alignpipe.evaluation.bias import SelfPreferenceError

    recipe = _recipe(tmp_path, tiny_model_path, {"judge": "pairwise", "model": "policy", "cross_family": True})
    with pytest.raises(SelfPreferenceError):
        run(recipe)


def test_judge_eval_and_loop_share_one_code_path(tmp_path, tiny_model_path):
    """The same spec through judge-eval's registry and through the loop's gives the same verdicts."""
    from alignpipe.data.pairs import LabelledPair
    from alignpipe.evaluation import judge_candidates
    from alignpipe.evaluation.judge_eval import evaluate_judge
    from alignpipe.evaluation.judge_registry import JudgeRegistry
    from alignpipe.judging import LoopJudges

    spec = f"pairwise:{tiny_model_path}"
    prompt = Prompt(id="p", prompt="Say hello.")
    a, b = Candidate("p", "p/0", "hello there"), Candidate("p", "p/1", "no")
    options = {"verdict": "logprobs", "precision": "fp32", "brief": True, "max_new_tokens": 48}
    cli_judge = JudgeRegistry(options).resolve(spec)
    recipe = _recipe(tmp_path, tiny_model_path, {"judge": spec, "verdict": "logprobs", "precision": "fp32"})
    loop_judge = LoopJudges(recipe, lambda: None, None, tiny_model_path).for_round(tmp_path / "r", "fp")
    assert type(loop_judge.judge) is type(cli_judge.judge) and loop_judge.name == cli_judge.name
    direct = cli_judge.compare([(prompt, a, b), (prompt, b, a)])
    looped = judge_candidates(loop_judge, [prompt], [a, b])[2:]  # the raw verdicts, both orders
    assert sorted((j.candidate_ids[0], j.preference) for j in looped) == \
        sorted((j.candidate_ids[0], j.preference) for j in direct)
    row = evaluate_judge([LabelledPair(prompt=prompt, chosen=a, rejected=b)], cli_judge)
    assert row["judge"] == cli_judge.name


def test_loop_with_step_labels_from_the_policy(tmp_path, tiny_model_path):
    """Math-Shepherd step labels as the loop's judge: the policy continues every step prefix."""
    prompts = digit_prompts(tmp_path / "sums.jsonl", 12)
    recipe = _recipe(tmp_path, tiny_model_path, {"judge": "step-labels:policy", "rollouts": 2},
                     task={"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
                     instantiation={"kind": "pair", "score": "correct"},
                     heldout={"n": 2, "max_new_tokens": 5})
    summary = run(recipe)
    js = _judgments(tmp_path)
    ok = js[js.status == "ok"]
    assert len(js) == 9 and len(ok) > 0
    for r in ok.itertuples():
        assert set(r.scores) == {"correct", "min_step"} and r.steps is not None and len(r.steps) >= 1
        assert all(0.0 <= s <= 1.0 for s in r.steps)
    assert summary["heldout_metric"] == "greedy_accuracy"
