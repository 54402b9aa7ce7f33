"""The DPO benchmark (benchmarks/dpo.py) counts the tokens it divides by: non-padding tokens of chosen + rejected,
prompt included in each, and the same ones on the alignpipe and TRL sides. Runs both sides for 2 steps on the tiny
model; asserts token counts, never time."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import script_module

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo.py"

# (user text, chosen, rejected): the tiny tokenizer gives one token per character, one per special token
PAIRS = [("hi", "hello", "no"), ("add two and two", "four", "five"), ("name a color", "blue", "i will not"),
         ("count to three", "one two three", "one")]
# By hand: the templated prompt "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n" is
# 1 + 4 + 1 + len(text) + 1 + 1 + 1 + 9 + 1 = 19 + len(text) tokens; a row is prompt + response + EOS;
# a pair is both rows: 2 * (19 + len(text)) + len(chosen) + len(rejected) + 2.
HAND_COUNT = [2 * 21 + 5 + 2 + 2, 2 * 34 + 4 + 4 + 2, 2 * 31 + 4 + 10 + 2, 2 * 33 + 13 + 3 + 2]  # 51, 78, 78, 84


@pytest.fixture(scope="module")
def bench():
    yield from script_module(BENCH, "bench_dpo")


def make_spec(bench, tiny_model_path: Path, tok, framework: str, mode: str = "full"):
    from alignpipe.data.chat import format_prompt

    pairs = [bench.BenchPair(format_prompt(tok, text), chosen, rejected) for text, chosen, rejected in PAIRS]
    # 2 pairs a step, so a step's rows have different lengths and are padded: the count must leave padding out
    return bench.RunSpec(framework, str(tiny_model_path), mode, max_length=64, batch_size=2, warmup=1, steps=1,
                         pairs=pairs, batches=bench.plan_batches([bench.pair_tokens(tok, p, 64) for p in pairs], 2,
                                                                 seed=0), learning_rate=1e-3)


def test_hand_count_matches_the_trainers_rows(bench, tok):
    from alignpipe.data.chat import format_prompt

    for (text, chosen, rejected), hand in zip(PAIRS, HAND_COUNT, strict=True):
        assert bench.pair_tokens(tok, bench.BenchPair(format_prompt(tok, text), chosen, rejected), 64) == hand


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_alignpipe_side_counts_non_padding_tokens(bench, tiny_model_path, tok, mode):
    spec = make_spec(bench, tiny_model_path, tok, "alignpipe", mode)
    result = bench.run_alignpipe(spec)
    assert result["same_batches_as_plan"]
    assert result["tokens_per_step"] == [sum(HAND_COUNT[i] for i in batch) for batch in spec.batches]
    assert result["tokens_all_steps"] == sum(HAND_COUNT) == 291
    assert result["tokens"] == sum(HAND_COUNT[i] for i in spec.batches[1])  # the step after the warm-up one
    assert result["measured_steps"] == 1 and result["seconds"] > 0
    assert result["peak_rss_mb"] >= result["rss_before_train_mb"] >= result["rss_load_mb"] > 0


def test_trl_side_trains_on_the_same_tokens(bench, tiny_model_path, tok):
    pytest.importorskip("trl", reason="TRL is in the bench extra only: pip install -e '.[bench]'")
    spec = make_spec(bench, tiny_model_path, tok, "trl")
    result = bench.run_trl(spec)
    assert result["token_mismatches"] == 0  # TRL's tokenised rows equal alignpipe's, token for token
    # TRL's own batches (attention-mask sums of its training forwards) hold the hand-counted tokens, step by step
    assert result["tokens_per_step"] == [sum(HAND_COUNT[i] for i in batch) for batch in spec.batches]
    assert result["tokens_as_alignpipe_counts"] == result["tokens_per_step"]
    assert result["tokens"] == sum(HAND_COUNT[i] for i in spec.batches[1])
