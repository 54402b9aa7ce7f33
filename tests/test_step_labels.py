"""Math-Shepherd step labels: step splitting, hard/soft labels from scripted rollouts (known answers), the
batching order, failures, and real continuation of the assistant turn on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest

from alignpipe.evaluation.base import PointwiseJudge
from alignpipe.evaluation.step_labels import (
    PolicyCompleter,
    StepLabeler,
    TextCompleter,
    as_completer,
    label_steps,
    split_steps,
    step_prefixes,
    step_spans,
)
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.backends import BackendError

QUESTION = "What is 2 + 3 * 4?"
WRONG = "3 * 4 = 12\n2 + 12 = 15\nThe answer is 15"
RIGHT = "3 * 4 = 12\n\n2 + 12 = 14\n#### 14"


class ScriptedBackend:
    """A generator test double: continues the final assistant message (the prefix) with scripted texts.
    `script[prefix]` is cycled through, one continuation per request; every call is recorded."""

    name = "scripted"

    def __init__(self, script):
        self.script = script
        self.seen: dict[str, int] = {}
        self.calls: list[list] = []

    def complete(self, conversations, max_new_tokens=256, temperature=0.0):
        self.calls.append(conversations)
        out = []
        for conv in conversations:
            assert conv[-1]["role"] == "assistant" and conv[-2] == {"role": "user", "content": QUESTION}
            prefix = conv[-1]["content"]
            n = self.seen.get(prefix, 0)
            self.seen[prefix] = n + 1
            options = self.script[prefix]
            out.append(options[n % len(options)])
        return out


def items(*completions, reference="14", truncated=False):
    prompt = Prompt(id="q1", prompt=QUESTION, task="math", reference=reference)
    return [(prompt, Candidate("q1", f"q1/{n}", text, truncated=truncated)) for n, text in enumerate(completions)]


SCRIPT = {
    "3 * 4 = 12\n": ["2 + 12 = 14\nThe answer is 14", "The answer is 14", "2 + 12 = 15. The answer is 15",
                     "no idea"],  # 2 of 4 reach 14 ("no idea": the last number of the prefix, 12)
    "3 * 4 = 12\n2 + 12 = 15\n": ["The answer is 15"],  # 0 of 4
    "3 * 4 = 12\n\n": ["2 + 12 = 14\n#### 14", "#### 14", "#### 14", "\\boxed{14}"],  # 4 of 4
    "3 * 4 = 12\n\n2 + 12 = 14\n": ["#### 14", "#### 15"],  # 2 of 4
}


# ---------------------------------------------------------------- steps


def test_split_steps_lines_and_sentences():
    assert split_steps(WRONG) == ["3 * 4 = 12", "2 + 12 = 15", "The answer is 15"]
    assert split_steps("  a = 1.5\n\n\n  b = 2  \n") == ["a = 1.5", "b = 2"]
    # a one-line solution is split into sentences (decimals kept whole)
    assert split_steps("First 1.5 * 2 = 3. Then 3 + 1 = 4. The answer is 4.") == [
        "First 1.5 * 2 = 3.", "Then 3 + 1 = 4.", "The answer is 4."]
    assert split_steps("") == [] and split_steps(" \n ") == []


def test_prefixes_keep_line_breaks_not_trailing_spaces():
    text = "a = 1  \n\n  b = 2\nc = 3"
    assert step_prefixes(text, step_spans(text)) == ["a = 1  \n\n", "a = 1  \n\n  b = 2\n", text]
    one_line = "A is 1. B is 2."
    assert step_prefixes(one_line, step_spans(one_line)) == ["A is 1.", "A is 1. B is 2."]


# ---------------------------------------------------------------- labels (known answers)


@pytest.mark.parametrize("estimate,wrong_steps,right_steps", [
    ("hard", [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    ("soft", [0.5, 0.0, 0.0], [1.0, 0.5, 1.0]),
])
def test_hard_and_soft_labels(estimate, wrong_steps, right_steps):
    backend = ScriptedBackend(SCRIPT)
    labeler = StepLabeler(backend, rollouts=4, estimate=estimate, show_progress=False)
    assert isinstance(labeler, PointwiseJudge) and labeler.name == "step_labels:scripted"
    wrong, right = labeler.score(items(WRONG, RIGHT))
    assert (wrong.status, wrong.steps, wrong.scores) == ("ok", wrong_steps, {"correct": 0.0, "min_step": 0.0})
    assert (right.status, right.steps) == ("ok", right_steps)
    assert right.scores == {"correct": 1.0, "min_step": min(right_steps)}
    raw = json.loads(wrong.raw)
    assert raw["estimate"] == estimate and raw["rollouts"] == 4 and raw["answer"] == "15"
    assert [(s["n"], s["correct"], s["errors"], s["by"]) for s in raw["steps"]] == [
        (4, 2, 0, "rollouts"), (4, 0, 0, "rollouts"), (0, 0, 0, "outcome")]
    assert [s["text"] for s in raw["steps"]] == split_steps(WRONG)
    assert [(s["hard"], s["soft"]) for s in json.loads(right.raw)["steps"]] == [(1.0, 1.0), (1.0, 0.5), (1.0, 1.0)]


def test_rollouts_batched_across_candidates_in_order():
    backend = ScriptedBackend(SCRIPT)
    StepLabeler(backend, rollouts=4, batch_size=3, show_progress=False).score(items(WRONG, RIGHT))
    assert [len(c) for c in backend.calls] == [3, 3, 3, 3, 3, 1]  # 2 candidates x 2 steps x 4 rollouts
    sent = [conv[-1]["content"] for call in backend.calls for conv in call]
    assert sent == (["3 * 4 = 12\n"] * 4 + ["3 * 4 = 12\n2 + 12 = 15\n"] * 4 + ["3 * 4 = 12\n\n"] * 4
                    + ["3 * 4 = 12\n\n2 + 12 = 14\n"] * 4)


def test_truncated_candidate_rolls_out_its_last_step_and_label_steps_api():
    script = dict(SCRIPT, **{WRONG: ["0", " more text"]})  # continuing a cut solution: answers 150 and 15
    backend = ScriptedBackend(script)
    prompts = [items(WRONG)[0][0]]
    cand = Candidate("q1", "q1/0", WRONG, truncated=True)
    [j] = label_steps(backend, prompts, [cand], rollouts=2, estimate="soft", show_progress=False)
    assert [s["by"] for s in json.loads(j.raw)["steps"]] == ["rollouts", "rollouts", "rollouts"]
    assert j.steps == [1.0, 0.0, 0.0] and j.scores["correct"] == 0.0  # first two scripted rollouts: 14, 14


def test_failures_are_recorded_not_raised():
    # no reference: error without any rollout; empty solution: invalid
    backend = ScriptedBackend(SCRIPT)
    [j] = StepLabeler(backend, rollouts=2, show_progress=False).score(items(WRONG, reference=None))
    assert j.status == "error" and "no reference" in j.reason and backend.calls == []
    [j] = StepLabeler(backend, rollouts=2, show_progress=False).score(items("   "))
    assert j.status == "invalid" and j.steps is None
    # backend errors are excluded from n; a step with no valid rollout makes the judgment an error
    script = {"3 * 4 = 12\n": [BackendError("timeout"), "The answer is 14"],
              "3 * 4 = 12\n2 + 12 = 15\n": [BackendError("timeout")]}
    [j] = StepLabeler(ScriptedBackend(script), rollouts=2, show_progress=False).score(items(WRONG))
    steps = json.loads(j.raw)["steps"]
    assert [(s["n"], s["correct"], s["errors"]) for s in steps[:2]] == [(1, 1, 1), (0, 0, 2)]
    assert j.status == "error" and j.scores == {} and j.steps[0] == 1.0 and math.isnan(j.steps[1])

    class Broken:
        name = "broken"

        def complete(self, conversations, max_new_tokens=256, temperature=0.0):
            raise RuntimeError("server down")

    [j] = StepLabeler(Broken(), rollouts=2, show_progress=False).score(items(WRONG))
    assert j.status == "error" and json.loads(j.raw)["steps"][0]["errors"] == 2


def test_options_are_checked():
    backend = ScriptedBackend(SCRIPT)
    with pytest.raises(ValueError, match="temperature 0"):
        StepLabeler(backend, rollouts=4, temperature=0.0)
    with pytest.raises(ValueError, match="estimate"):
        StepLabeler(backend, estimate="medium")
    assert isinstance(as_completer(backend), TextCompleter)
    with pytest.raises(TypeError):
        as_completer(object())


# ---------------------------------------------------------------- real continuation on a tiny model


def test_tiny_model_continues_after_the_prefix(tiny_model_path):
    import torch

    from alignpipe.data.chat import format_messages
    from alignpipe.synthesis.backends import TransformersBackend

    torch.set_num_threads(1)
    backend = TransformersBackend(tiny_model_path, batch_size=4)
    completer = as_completer(backend)
    assert isinstance(completer, PolicyCompleter) and completer.model is backend.model
    messages = [{"role": "user", "content": QUESTION}]
    prefix = "3 * 4 = 12\n"
    rendered = completer.render(messages, prefix)
    head = format_messages(backend.tokenizer, messages)
    assert head.endswith("<|im_start|>assistant\n") and rendered == head + prefix

    # greedy: the first new token is the model's argmax right after the prefix (not a new assistant turn)
    [ids] = completer.continue_ids([rendered], max_new_tokens=3, temperature=0.0)
    enc = backend.tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        first = int(backend.model(**enc).logits[0, -1].argmax())
    assert (ids[:1] == [first]) if ids else first == backend.tokenizer.eos_token_id

    labeler = StepLabeler(backend, rollouts=2, temperature=1.0, max_new_tokens=3, batch_size=8, show_progress=False)
    [j] = labeler.score(items(WRONG))
    raw = json.loads(j.raw)
    assert j.status == "ok" and len(j.steps) == 3 and all(v in (0.0, 1.0) for v in j.steps)
    assert [(s["n"], s["errors"], s["by"]) for s in raw["steps"]] == [
        (2, 0, "rollouts"), (2, 0, "rollouts"), (0, 0, "outcome")]
    assert j.scores["correct"] == 0.0 and j.steps[-1] == 0.0
