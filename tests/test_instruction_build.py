"""Instruction data builds (issue 13 item 3): Self-Instruct's filters and parser, Evol-Instruct's elimination rules,
both builds end to end with a scripted generator (exact counts) and with the transformers backend on the tiny model
(through `alignpipe run`), and the build recipes' loading and rerun rules."""

from __future__ import annotations

import json

import pytest

from alignpipe import AlignpipeError
from alignpipe.data.instructions import read_prompts
from alignpipe.records import Candidate
from alignpipe.synthesis.instruction_build.common import BUILTIN_SEEDS, SeedTask, load_seed_tasks
from alignpipe.synthesis.instruction_build.config import (
    EvolInstructRecipe,
    SelfInstructRecipe,
    build_recipe_path,
    load_build_recipe,
)
from alignpipe.synthesis.instruction_build.evol_instruct import (
    instruction_failure,
    response_failure,
)
from alignpipe.synthesis.instruction_build.rouge_filter import RougePool, filter_instructions, static_reason
from alignpipe.synthesis.instruction_build.run import run_build
from alignpipe.synthesis.instruction_build.self_instruct import instruction_prompt, parse_instructions

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the ROUGE-L filter


def test_rouge_near_duplicates_rejected_exactly():
    pool = RougePool(["Give three tips for staying healthy.", "What is the capital of France?",
                      "a b c d e f g h i j"])
    result = filter_instructions([
        "Give three tips for staying happy.",  # LCS 5 of 6 and 6 tokens: F = 0.833
        "What is the capital of Canada?",  # 5 of 6: 0.833
        "Explain how tides work in the sea.",  # nothing close: kept
        "a b c d e f g x y z",  # LCS 7, 10 + 10 tokens: F = 0.7 exactly, which is not below 0.7
        "a b c d e f x y z w",  # LCS 6: F = 0.6, kept
        "Explain how tides work in the ocean.",  # 6 of 7 with the one kept just above: 0.857
    ], pool)
    fates = [d[1] for d in result.decisions]
    assert fates == ["similar", "similar", "kept", "similar", "kept", "similar"]
    assert result.kept == ["Explain how tides work in the sea.", "a b c d e f x y z w"]
    assert dict(result.rejected) == {"similar": 4}
    assert result.decisions[0][2] == pytest.approx(10 / 12) and result.decisions[3][2] == pytest.approx(0.7)
    assert result.decisions[5][3] == "Explain how tides work in the sea."  # compared with the batch's own kept one
    assert len(pool) == 5


def test_rouge_threshold_is_a_parameter():
    pool = RougePool(["Give three tips for staying healthy."])
    assert filter_instructions(["Give three tips for staying happy."], pool, threshold=0.9).kept == [
        "Give three tips for staying happy."]


def test_rouge_bound_skips_nothing_that_matters():
    """The shared-token bound only skips pairs that cannot reach the threshold: the same decisions as scoring
    every pair with rouge-score directly."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    texts = ["write a poem about the sea", "write a song about the sea", "sea the about poem a write",
             "explain the water cycle", "explain the water cycle to a child", "list three rivers in europe",
             "name three rivers of europe", "write a poem about the moon", "write about the sea a poem"]
    pool = RougePool()
    for text in texts:
        truth = max((scorer.score(p, text)["rougeL"].fmeasure for p in pool.texts), default=0.0)
        score, _ = pool.most_similar(text, 0.7)
        assert (score >= 0.7) == (truth >= 0.7), text
        assert pool.most_similar(text)[0] == pytest.approx(truth)  # without a threshold: the exact maximum
        pool.add(text)


@pytest.mark.parametrize("text, reason", [
    ("Hi there", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image below.", "unsupported"),
    ("Draw a cat.", "unsupported"),
    ("Plot the data points on a graph.", "unsupported"),
    ("Look at this picture of a dog.", "unsupported"),
    ("Open the file and count its lines.", "unsupported"),
    ("Use the map to find the shortest route.", "unsupported"),
    ("Go to the website and sign up.", "unsupported"),
    ("- Write a haiku about snow.", "punctuation_start"),
    ("\"Write a haiku about snow.", "punctuation_start"),
    ("\u00c9crivez un po\u00e8me sur la mer.", "non_ascii_start"),
    ("Write a haiku about snow.", None),
    ("Explain the mapping between keys and values.", None),  # whole words only: "mapping" is not "map"
    ("Describe a drawer full of socks.", None),
])
def test_static_filters(text, reason):
    assert static_reason(text) == reason


def test_each_filter_counted_and_exact_duplicates():
    pool = RougePool(["Write a short poem about a rainy afternoon."])
    result = filter_instructions([
        "write a short  poem about a RAINY afternoon.",  # the same text, case and spacing aside
        "Tell me",
        "Draw a map of your town.",
        "!Name a color.",
        "\u00bfQu\u00e9 hora es ahora mismo?",
        "Describe a sunset over the mountains.",
        "Describe a sunset over the mountains.",  # the same as the one just kept
        "",
    ], pool, min_words=3, max_words=10)
    assert dict(result.rejected) == {"duplicate": 2, "too_short": 2, "unsupported": 1, "punctuation_start": 1,
                                     "non_ascii_start": 1}
    assert result.kept == ["Describe a sunset over the mountains."]


# ---------------------------------------------------------------- parsing numbered instructions


def test_parse_clean_list():
    text = "1. Name three rivers in Africa.\n2. Explain how a vaccine works.\n3. Write a limerick about a cat."
    assert parse_instructions(text) == (["Name three rivers in Africa.", "Explain how a vaccine works.",
                                         "Write a limerick about a cat."], 0)


def test_parse_messy_output():
    text = """Sure! Here are 8 new tasks that are different from the examples:

7. **Describe the life cycle of a butterfly.**
8) Suggest a name for a pet turtle.
Answer: Shelly is a nice name.
(9) "Explain why leaves change colour in autumn."
Task 10: List three uses for baking soda.
11. 11. Compare cats and dogs as pets.
12. - Instruction: Write a thank-you note to a teacher.
- Convert 3.5 hours into minutes.
5 kilometres is 3.1 miles, which is not a task line.
13.

I hope these help!"""
    items, cut = parse_instructions(text)
    assert items == ["Describe the life cycle of a butterfly.", "Suggest a name for a pet turtle.",
                     "Explain why leaves change colour in autumn.", "List three uses for baking soda.",
                     "Compare cats and dogs as pets.", "Write a thank-you note to a teacher.",
                     "Convert 3.5 hours into minutes."]
    assert cut == 0


def test_parse_nothing_and_cut_off():
    assert parse_instructions("I'm sorry, I can only help with writing.") == ([], 0)
    assert parse_instructions("") == ([], 0)
    text = "1. Name a planet.\n2. Explain gravity to a child.\n3. Write a story about a"
    assert parse_instructions(text, truncated=True) == (["Name a planet.", "Explain gravity to a child."], 1)
    assert parse_instructions(text, truncated=False)[0][-1] == "Write a story about a"
    # cut while rambling after the list: the last item is whole
    assert parse_instructions("1. Name a planet.\nThat was fun, and now", truncated=True) == (["Name a planet."], 0)


def test_instruction_prompt_numbers_the_examples():
    prompt = instruction_prompt(["Do A.", "Do B."], 3)
    assert "1. Do A.\n2. Do B." in prompt and "numbered 3 to 5" in prompt


# ---------------------------------------------------------------- Evol-Instruct's elimination rules


@pytest.mark.parametrize("original, evolved, reason", [
    ("Write a poem about the sea.", "Write a poem about the sea.", "no_gain"),
    ("Write a poem about the sea.", "  write a POEM about the sea. ", "no_gain"),
    ("Write a poem about the sea.", "Write the poem about a sea", "no_gain"),  # only stop words changed
    ("Write a poem about the sea.", "", "no_gain"),
    ("Write a poem about the sea.", "#Rewritten Prompt#: Write a poem about the stormy sea.", "copied_prompt"),
    ("Write a poem about the sea.", "Here is the rewritten prompt: write a sonnet.", "copied_prompt"),
    ("Write a poem about the sea.", "As the given prompt says, write a sonnet.", "copied_prompt"),
    ("Write a poem about the sea.", "You are turning an instruction into a harder version of itself.",
     "copied_prompt"),  # an echo of the evolving prompt's own words
    ("Write a poem about the sea.", "Write a sea poem, and add one more constraint or requirement that an answer "
     "has to meet.", "copied_prompt"),
    ("Write a poem about the sea.", "Write a poem about the sea at night, in exactly four rhyming lines.", None),
])
def test_instruction_elimination(original, evolved, reason):
    assert instruction_failure(original, evolved) == reason


@pytest.mark.parametrize("response, reason", [
    ("", "empty_response"),
    ("   \n", "empty_response"),
    ("I'm sorry, but I cannot answer that.", "sorry_response"),
    ("Sorry! " + "word " * 90, None),  # long enough: an apology in passing
    ("It is, and so on.", "only_stopwords"),
    ("...!?", "only_stopwords"),
    ("Ottawa.", "short_response"),
    ("The capital of Canada is Ottawa.", None),
])
def test_response_elimination(response, reason):
    assert response_failure(response, min_words=3, sorry_max_words=80) == reason


# ---------------------------------------------------------------- end to end with a scripted generator


class ScriptedGenerator:
    """A deterministic in-process generator: `reply(prompt_text) -> (completion, truncated)`; records calls."""

    name = "scripted"

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def sample(self, prompts, k, *, temperature, top_p, max_new_tokens, seed, source, description="sampling"):
        self.calls.append((source.get("stage"), len(prompts)))
        out = []
        for p in prompts:
            for j in range(k):
                text, truncated = self.reply(p.prompt)
                src = {**source, "backend": self.name}
                if text is None:  # a backend failure
                    out.append(Candidate(p.id, f"{p.id}/{j}", "", {**src, "error": "HTTP 500"}, num_tokens=0))
                else:
                    out.append(Candidate(p.id, f"{p.id}/{j}", text, src, num_tokens=len(text.split()),
                                         truncated=truncated))
        return out


SEEDS = [SeedTask("s1", "Write a short poem about a rainy afternoon.", "Rain taps."),
         SeedTask("s2", "What is the capital of Canada?", "Ottawa is the capital of Canada."),
         SeedTask("s3", "Give three tips for staying healthy.", "Sleep, eat well, move.")]

BATCHES = [
    # call 1: one kept, a seed copy, a near copy of a seed, too short, unsupported, a repeat of its own first
    "Here you go:\n1. Describe how a rainbow forms in the sky.\n2. What is the capital of Canada?\n"
    "3. Give three tips for staying happy.\n4. Hi\n5. Draw a picture of a cat.\n"
    "6. Describe how a rainbow forms in the sky.\n7. Plan a three day trip to Rome on a small budget.",
    # call 2: nothing parseable
    "I am a helpful assistant and I like tasks.",
    # call 3 (cut by max_new_tokens): two kept, the last line dropped as cut off
    "1. Explain what a black hole is to a ten year old.\n2. Suggest a name for a new bakery in Paris.\n3. Write a",
    # call 4: past the target
    "1. Compare the climates of Norway and Egypt.\n2. Name five instruments in an orchestra.",
]


def test_self_instruct_end_to_end_exact_counts(tmp_path):
    outputs = iter([(BATCHES[0], False), (BATCHES[1], False), (BATCHES[2], True), (BATCHES[3], False)])

    def reply(prompt):
        if prompt.startswith("Here are some tasks"):
            return next(outputs)
        if "Rome" in prompt:
            return "   ", False  # an empty response: the instruction is dropped
        return f"An answer to: {prompt}", False

    gen = ScriptedGenerator(reply)
    recipe = SelfInstructRecipe(name="si", output_dir=str(tmp_path), num_instructions=4, max_calls=10,
                                calls_per_batch=2, seed_examples=2, generated_examples=1)
    summary = run_build(recipe, generator=gen, seeds=SEEDS)
    # batch 1: 2 calls keep 2 (rainbow, Rome): 1 per call, 2 missing -> batch 2 of 2 calls keeps 4 more (2 surplus)
    assert gen.calls == [("instructions", 2), ("instructions", 2), ("responses", 4)]
    assert summary["generated"] == 7 + 0 + 3 + 2
    assert summary["rejected"] == {"too_short": 1, "too_long": 0, "unsupported": 1, "punctuation_start": 0,
                                   "non_ascii_start": 0, "duplicate": 2, "similar": 1, "cut_off": 1}
    assert summary["accepted"] == 6 and summary["surplus"] == 2
    assert summary["responses_dropped"] == {"empty": 1}
    assert summary["calls"] == {"instructions": 4, "responses": 4, "failed": 0, "without_instructions": 1}
    assert summary["kept"] == 3
    assert summary["generated"] == summary["accepted"] + sum(summary["rejected"].values())
    assert summary["accepted"] == summary["kept"] + summary["surplus"] + sum(summary["responses_dropped"].values())

    out = tmp_path / "si"
    prompts = read_prompts(out / "instructions.jsonl")  # the instruction loader reads the dataset
    assert [p.prompt for p in prompts] == ["Describe how a rainbow forms in the sky.",
                                           "Explain what a black hole is to a ten year old.",
                                           "Suggest a name for a new bakery in Paris."]
    assert all(p.meta["response"] == f"An answer to: {p.prompt}" and p.meta["format"] == "messages" for p in prompts)
    assert json.loads((out / "summary.json").read_text())["kept"] == 3
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == 12 - 1  # every parsed instruction but the cut-off one, which never reached the filter
    assert [d["fate"] for d in decisions[:3]] == ["kept", "duplicate", "similar"]


FRESH = ["Describe the history of the printing press.", "Name five bridges in New York.",
         "Explain how a refrigerator keeps food cold.", "Suggest a weekend hobby for a retired teacher.",
         "Compare tennis and badminton for beginners.", "List the planets in order from the sun.",
         "Write a limerick about a clumsy giraffe.", "Summarize the story of Romeo and Juliet."]


def test_self_instruct_examples_include_generated_ones(tmp_path):
    prompts_seen = []

    def reply(prompt):
        if prompt.startswith("Here are some tasks"):
            prompts_seen.append(prompt)
            n = 2 * (len(prompts_seen) - 1)
            return f"1. {FRESH[n]}\n2. {FRESH[n + 1]}", False
        return "An answer.", False

    recipe = SelfInstructRecipe(name="si", output_dir=str(tmp_path), num_instructions=8, max_calls=4,
                                calls_per_batch=1, seed_examples=1, generated_examples=2)
    summary = run_build(recipe, generator=ScriptedGenerator(reply), seeds=SEEDS)
    assert summary["kept"] == 8 and summary["calls"]["instructions"] == 4
    first = [line[3:] for line in prompts_seen[0].splitlines() if line[:2] in ("1.", "2.", "3.")]
    last = [line[3:] for line in prompts_seen[-1].splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert sorted(first) == sorted(s.instruction for s in SEEDS)  # nothing generated yet: seeds fill in
    assert len(last) == 3 and sum(text in FRESH[:6] for text in last) == 2


EVOLVED = {  # given instruction -> (evolved instruction or None for a backend failure)
    "Write a short poem about a rainy afternoon.": "Write a short poem about a rainy afternoon in four rhyming lines.",
    "What is the capital of Canada?": "#Rewritten Prompt#: What is the capital of Canada and its population?",
    "Give three tips for staying healthy.": "Give three tips for staying healthy.",
    "Write a short poem about a rainy afternoon in four rhyming lines.":
        "Write a short poem about a rainy afternoon in four rhyming lines that mention an umbrella.",
}
ANSWERS = {
    "Write a short poem about a rainy afternoon in four rhyming lines.": "Grey skies weep, puddles grow deep.",
    "Write a short poem about a rainy afternoon in four rhyming lines that mention an umbrella.":
        "I'm sorry, I cannot write poems.",
    "Give three tips for staying healthy while working night shifts.": "Sleep well.",
}


def test_evol_instruct_end_to_end_rules_and_pool(tmp_path):
    rounds_seen = []

    def reply(prompt):
        if prompt.startswith("You are "):  # an evolution prompt
            given = prompt.split("#Given Prompt#:\n", 1)[1].split("\n\n#", 1)[0]
            rounds_seen.append(given)
            if given == "What is the capital of Canada?" and len(rounds_seen) > 3:
                return None, False  # round 2: the backend fails
            if given == "Give three tips for staying healthy." and len(rounds_seen) > 3:
                return "Give three tips for staying healthy while working night shifts.", False
            return EVOLVED[given], False
        return ANSWERS[prompt], False

    recipe = EvolInstructRecipe(name="evol", output_dir=str(tmp_path), rounds=2)
    summary = run_build(recipe, generator=ScriptedGenerator(reply), seeds=SEEDS)
    # round 2 evolves the evolved poem, and the two originals whose evolutions failed
    assert rounds_seen == [s.instruction for s in SEEDS] + [
        "Write a short poem about a rainy afternoon in four rhyming lines.", SEEDS[1].instruction,
        SEEDS[2].instruction]
    assert [(r["kept"], r["failed"]) for r in summary["rounds"]] == [
        (1, {"copied_prompt": 1, "no_gain": 1}), (0, {"sorry_response": 1, "failed": 1, "short_response": 1})]
    assert summary["generated"] == 6 and summary["accepted"] == 1 and summary["seeds_in_dataset"] == 3
    assert summary["generated"] == summary["accepted"] + sum(summary["rejected"].values())
    assert summary["kept"] == 4 and summary["calls"] == {"evolutions": 6, "responses": 3}
    prompts = read_prompts(tmp_path / "evol" / "instructions.jsonl")
    assert [p.prompt for p in prompts] == [s.instruction for s in SEEDS] + [
        "Write a short poem about a rainy afternoon in four rhyming lines."]
    rows = [json.loads(line) for line in (tmp_path / "evol" / "instructions.jsonl").read_text().splitlines()]
    assert rows[-1]["meta"]["parent"] == "s1" and rows[-1]["meta"]["round"] == 1


def test_evol_max_calls_cuts_rounds(tmp_path):
    words = iter(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"])

    def reply(prompt):
        if prompt.startswith("You are "):
            given = prompt.split("#Given Prompt#:\n", 1)[1].split("\n\n#", 1)[0]
            return f"{given} Mention {next(words)}.", False
        return "A fine and complete answer.", False

    recipe = EvolInstructRecipe(name="evol", output_dir=str(tmp_path), rounds=3, max_calls=5, include_seeds=False)
    summary = run_build(recipe, generator=ScriptedGenerator(reply), seeds=SEEDS)
    assert [r["evolved"] for r in summary["rounds"]] == [3, 2] and summary["kept"] == 5


# ---------------------------------------------------------------- recipes, reruns, the command line


def test_builtin_seed_tasks():
    seeds = load_seed_tasks()
    assert len(seeds) >= 25 and all(s.instruction and s.response for s in seeds)
    assert len({s.instruction for s in seeds}) == len(seeds)
    assert read_prompts(BUILTIN_SEEDS)  # Alpaca rows the instruction loader reads


def test_build_recipes_load_and_name_bad_keys(tmp_path):
    si = load_build_recipe("self-instruct")
    assert isinstance(si, SelfInstructRecipe) and si.name == "self-instruct" and si.filter.rouge_threshold == 0.7
    ev = load_build_recipe("evol-instruct", {"rounds": 2, "elimination.sorry_max_words": 50})
    assert isinstance(ev, EvolInstructRecipe) and ev.rounds == 2 and ev.elimination.sorry_max_words == 50
    assert build_recipe_path("self-instruct") is not None and build_recipe_path("quickstart") is None
    assert build_recipe_path(None) is None and build_recipe_path("no-such-recipe") is None
    with pytest.raises(AlignpipeError, match=r"filter\.rouge_treshold: Extra inputs are not permitted"):
        load_build_recipe("self-instruct", {"filter.rouge_treshold": 0.5})
    with pytest.raises(AlignpipeError, match=r"operations\.0: Input should be"):
        load_build_recipe("evol-instruct", {"operations": ["shout"]})
    with pytest.raises(AlignpipeError, match=r"generator: .*needs generator\.base_url"):
        load_build_recipe("self-instruct", {"generator.backend": "openai", "model": "m"})
    bad = tmp_path / "b.yaml"
    bad.write_text("build: magic\n")
    with pytest.raises(AlignpipeError, match=r"b\.yaml: invalid recipe: build: expected one of"):
        load_build_recipe(bad)


def test_rerun_refused_unless_overwrite(tmp_path):
    def reply(prompt):
        if prompt.startswith("Here are some tasks"):
            return "1. Describe the water cycle in three sentences.", False
        return "Water evaporates, condenses and falls.", False

    recipe = SelfInstructRecipe(name="si", output_dir=str(tmp_path), num_instructions=1)
    run_build(recipe, generator=ScriptedGenerator(reply), seeds=SEEDS)
    before = (tmp_path / "si" / "instructions.jsonl").read_text()
    with pytest.raises(AlignpipeError, match=r"already holds a build .*--set overwrite=true"):
        run_build(recipe, generator=ScriptedGenerator(reply), seeds=SEEDS)
    assert (tmp_path / "si" / "instructions.jsonl").read_text() == before
    again = recipe.model_copy(update={"overwrite": True})
    assert run_build(again, generator=ScriptedGenerator(reply), seeds=SEEDS)["kept"] == 1


def _cli(*args):
    from typer.testing import CliRunner

    from alignpipe.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_runs_both_builds_on_the_tiny_model(tmp_path, tiny_model_path):
    """The transformers backend on the tiny random model through `alignpipe run`: the pipeline runs, the counts
    add up, and the written dataset reads back through the instruction loader."""
    common = ["--set", f"model={tiny_model_path}", "--set", f"output_dir={tmp_path}", "--set", "responses.max_new_tokens=8"]
    result = _cli("run", "evol-instruct", *common, "--set", "rounds=1", "--set", "num_instructions=3",
                  "--set", "evolution.max_new_tokens=12")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "evol-instruct" / "summary.json").read_text())
    assert summary["generated"] == 3 and summary["generated"] == summary["accepted"] + sum(summary["rejected"].values())
    assert summary["kept"] == summary["seeds_in_dataset"] + summary["accepted"] == len(
        read_prompts(tmp_path / "evol-instruct" / "instructions.jsonl"))
    assert "evol-instruct build" in result.output

    result = _cli("run", "self-instruct", *common, "--set", "num_instructions=2", "--set", "max_calls=4",
                  "--set", "calls_per_batch=2", "--set", "instructions.max_new_tokens=16")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "self-instruct" / "summary.json").read_text())
    assert summary["calls"]["instructions"] <= 4
    assert summary["generated"] == summary["accepted"] + sum(summary["rejected"].values())
    assert summary["accepted"] == summary["kept"] + summary["surplus"] + sum(summary["responses_dropped"].values())
    lines = (tmp_path / "self-instruct" / "instructions.jsonl").read_text().splitlines()
    assert len(lines) == summary["kept"]
    if lines:
        assert len(read_prompts(tmp_path / "self-instruct" / "instructions.jsonl")) == summary["kept"]

    result = _cli("run", "self-instruct", *common)  # a rerun into the same directory
    assert result.exit_code != 0 and "already holds a build" in str(result.exception)
