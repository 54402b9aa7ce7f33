"""Logprob verdicts: the backend's choice log-probs against plain single-sequence forwards on a tiny random
model, the judges' arithmetic on a scripted backend (known answers), and `judge-eval --verdict logprobs`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignpipe.evaluation.llm_judge import (
    AdditiveLLMJudge,
    PairwiseLLMJudge,
    PointwiseLLMJudge,
    RubricLLMJudge,
)
from alignpipe.evaluation.logprob_verdicts import rubric_prefix
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.backends import BackendError

torch = pytest.importorskip("torch")


def item(text: str = "I ran.", pid: str = "p1", cid: str = "c1") -> tuple[Prompt, Candidate]:
    return Prompt(id=pid, prompt="Say what you did.", reference=None), Candidate(pid, cid, text)


class ScriptedBackend:
    """`choice_logprobs` returns fixed log-probs per step; records its calls."""

    name = "scripted"

    def __init__(self, steps: list[dict[str, float]]) -> None:
        self.steps = steps
        self.calls: list[tuple] = []

    def complete(self, conversations, max_new_tokens=256, temperature=0.0):  # pragma: no cover - unused
        raise AssertionError("logprob verdicts must not generate")

    def choice_logprobs(self, conversations, prefix, choices, *, then=None, precision="fp32", description=""):
        self.calls.append((conversations, prefix, list(choices), precision))
        out = []
        for row in range(len(conversations)):
            got = []
            for step, lp in enumerate(self.steps):
                assert set(lp) == set(choices)
                got.append(dict(lp))
                if then is None or then(row, step, lp) is None:
                    break
            out.append(got)
        return out


# ---------------------------------------------------------------- known answers (scripted backend)


def test_pairwise_known_answer() -> None:
    lp = {" A": math.log(0.2), " B": math.log(0.5), " tie": math.log(0.1)}
    backend = ScriptedBackend([lp])
    judge = PairwiseLLMJudge(backend, verdict="logprobs")
    p, a = item()
    _, b = item("I sat.", cid="c2")
    [j] = judge.compare([(p, a, b)])
    assert judge.name == "llm_pairwise[logprobs]:scripted"
    assert j.status == "ok" and j.preference == "second"
    assert j.scores == pytest.approx({"p_first": 0.25, "p_second": 0.625, "p_tie": 0.125})
    raw = json.loads(j.raw)
    assert raw["verdict"] == "logprobs" and raw["mass"] == pytest.approx(0.8)
    conv, prefix, choices, _ = backend.calls[0]
    assert prefix == "Verdict:" and choices == [" A", " B", " tie"]
    assert "Answer with one line only" in conv[0][-1]["content"]  # the brief prompt


def test_pointwise_expected_score_known_answer() -> None:
    probs = {k: 0.0 for k in range(1, 11)}
    probs.update({3: 0.1, 7: 0.3, 10: 0.2})  # mass 0.6 -> renormalised 1/6, 1/2, 1/3
    lp = {f" {k}": (math.log(p) if p else -1e9) for k, p in probs.items()}
    [j] = PointwiseLLMJudge(ScriptedBackend([lp]), verdict="logprobs").score([item()])
    assert j.status == "ok" and j.scores["score"] == pytest.approx(3 / 6 + 7 / 2 + 10 / 3)
    assert json.loads(j.raw)["argmax"] == 7 and json.loads(j.raw)["mass"] == pytest.approx(0.6)


def test_additive_scale_and_samples_ignored() -> None:
    lp = {f" {k}": math.log(1 / 6) for k in range(6)}
    backend = ScriptedBackend([lp])
    [j] = AdditiveLLMJudge(backend, verdict="logprobs", samples=3).score([item()])
    assert j.scores == {"additive": pytest.approx(2.5)} and backend.calls[0][2] == [f" {k}" for k in range(6)]
    assert len(backend.calls[0][0]) == 1


def test_rubric_known_answer_and_prefixes() -> None:
    steps = [{f" {k}": math.log(p) for k, p in zip(range(1, 6), ps, strict=True)}
             for ps in ([0.1, 0.1, 0.1, 0.6, 0.1], [0.5, 0.2, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2])]
    backend = ScriptedBackend(steps)
    judge = RubricLLMJudge(backend, verdict="logprobs")
    [j] = judge.score([item()])
    assert j.scores == pytest.approx({"correctness": 3.5, "helpfulness": 2.1, "clarity": 3.0})
    assert backend.calls[0][1] == "Score (correctness):"
    assert rubric_prefix(judge.keys, [4, 1]) == "Score (correctness): 4\nScore (helpfulness): 1\nScore (clarity):"
    crit = json.loads(j.raw)["criteria"]
    assert [crit[k]["argmax"] for k in judge.keys] == [4, 1, 1]


def test_backend_without_method_and_backend_errors_are_error_rows() -> None:
    class Generator:
        name = "server"

        def complete(self, conversations, max_new_tokens=256, temperature=0.0):
            return ["Verdict: A"] * len(conversations)

    p, a = item()
    [j] = PairwiseLLMJudge(Generator(), verdict="logprobs").compare([(p, a, a)])
    assert j.status == "error" and "no choice_logprobs" in j.reason

    class Failing(ScriptedBackend):
        def choice_logprobs(self, conversations, prefix, choices, **kw):
            return [BackendError("out of memory")] * len(conversations)

    [j] = PointwiseLLMJudge(Failing([]), verdict="logprobs").score([item()])
    assert j.status == "error" and "out of memory" in j.reason
    with pytest.raises(ValueError, match="verdict"):
        PointwiseLLMJudge(Failing([]), verdict="sample")


# ---------------------------------------------------------------- tiny model: exact against plain forwards


@pytest.fixture(scope="module")
def backend(tiny_model_path: Path):
    from alignpipe.synthesis.backends import TransformersBackend

    torch.set_num_threads(1)
    return TransformersBackend(tiny_model_path, batch_size=3)


def plain_logprobs(backend, conv, prefix: str) -> torch.Tensor:
    """log_softmax after chat(conv) + prefix, one un-padded sequence."""
    from alignpipe.data.chat import format_messages

    text = format_messages(backend.tokenizer, conv) + prefix
    ids = torch.tensor([backend.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return torch.log_softmax(backend.model(input_ids=ids).logits[0, -1].float(), dim=-1)


def token(backend, text: str) -> int:
    [t] = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    return t


CONVS = [[{"role": "user", "content": "q" * n + "?"}] for n in (1, 9, 4, 30, 2)]


def test_choice_logprobs_equal_plain_forwards(backend) -> None:
    # tiny tokenizer: one token per character, so " 3" is ' ' '3' and the context ends with the space
    res = backend.choice_logprobs(CONVS, "Score:", [f" {k}" for k in range(1, 6)])
    for conv, steps in zip(CONVS, res, strict=True):
        ref = plain_logprobs(backend, conv, "Score: ")
        for k in range(1, 6):
            assert steps[0][f" {k}"] == pytest.approx(float(ref[token(backend, str(k))]), abs=1e-5)


def test_ten_is_one_then_zero(backend) -> None:
    res = backend.choice_logprobs(CONVS, "Score:", [f" {k}" for k in range(1, 11)])
    for conv, steps in zip(CONVS, res, strict=True):
        first = plain_logprobs(backend, conv, "Score: ")
        after_one = plain_logprobs(backend, conv, "Score: 1")
        p1, p0 = math.exp(first[token(backend, "1")]), math.exp(after_one[token(backend, "0")])
        assert math.exp(steps[0][" 10"]) == pytest.approx(p1 * p0, abs=1e-6)
        assert math.exp(steps[0][" 1"]) == pytest.approx(p1 * (1 - p0), abs=1e-6)
        assert steps[0][" 7"] == pytest.approx(float(first[token(backend, "7")]), abs=1e-5)


def test_pairwise_and_pointwise_judges_on_tiny_model(backend) -> None:
    items = [item("I ran " * n, pid=f"p{n}", cid=f"c{n}") for n in (1, 5, 2)]
    pj = PairwiseLLMJudge(backend, verdict="logprobs")
    for j in pj.compare([(p, a, items[0][1]) for p, a in items]):
        probs = {"first": j.scores["p_first"], "second": j.scores["p_second"], "tie": j.scores["p_tie"]}
        assert j.status == "ok" and sum(probs.values()) == pytest.approx(1.0)
        assert j.preference == max(probs, key=lambda k: probs[k])
    judge = PointwiseLLMJudge(backend, verdict="logprobs")
    convs = [judge._conversation(p, c) for p, c in items]
    lps = backend.choice_logprobs(convs, "Score:", [f" {k}" for k in range(1, 11)])
    for j, steps in zip(judge.score(items), lps, strict=True):
        w = {k: math.exp(steps[0][f" {k}"]) for k in range(1, 11)}
        assert j.scores["score"] == pytest.approx(sum(k * v for k, v in w.items()) / sum(w.values()), abs=1e-9)


def test_rubric_equals_teacher_forced_forwards(backend) -> None:
    items = [item("I ran " * n, pid=f"p{n}", cid=f"c{n}") for n in (3, 1, 6, 2)]
    judge = RubricLLMJudge(backend, verdict="logprobs")
    for (p, c), j in zip(items, judge.score(items), strict=True):
        conv, chosen = judge._conversation(p, c), []
        for key in judge.keys:
            ref = plain_logprobs(backend, conv, rubric_prefix(judge.keys, chosen) + " ")
            lp = {k: float(ref[token(backend, str(k))]) for k in range(1, 6)}
            total = sum(math.exp(v) for v in lp.values())
            assert j.scores[key] == pytest.approx(sum(k * math.exp(v) for k, v in lp.items()) / total, abs=1e-4)
            chosen.append(max(lp, key=lambda k: lp[k]))
        assert [json.loads(j.raw)["criteria"][k]["argmax"] for k in judge.keys] == chosen


def test_bf16_runs(backend) -> None:
    res = backend.choice_logprobs(CONVS[:2], "Verdict:", [" A", " B", " tie"], precision="bf16")
    fp = backend.choice_logprobs(CONVS[:2], "Verdict:", [" A", " B", " tie"])
    for a, b in zip(res, fp, strict=True):
        assert a[0] == pytest.approx(b[0], abs=0.2)


def test_judge_eval_cli_logprobs(tmp_path: Path, tiny_model_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from alignpipe.evaluation.judge_eval_cli import judge_eval

    app = typer.Typer()
    app.command("judge-eval")(judge_eval)
    app.command("other")(lambda: None)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a long answer", "rejected": "no"})
                               for i in range(3)) + "\n")
    out = tmp_path / "o.json"
    specs = [f"{k}:{tiny_model_path}" for k in ("pairwise", "pointwise", "rubric")]
    args = ["judge-eval", "--pairs", str(pairs), "--json", str(out), "--limit", "2", "--verdict", "logprobs"]
    result = CliRunner().invoke(app, [*args, *sum((["--judge", s] for s in specs), [])])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    name = Path(tiny_model_path).resolve().name
    assert [r["judge"] for r in rows] == ["human", f"llm_pairwise[logprobs]:{name}",
                                          f"llm_pointwise[logprobs]:{name}", f"llm_rubric[logprobs]:{name}"]
    assert all(r["invalid_rate"] == 0.0 and r["errors"] == 0 for r in rows[1:])
