from alignpipe.instantiation import best_vs_worst_pairs, groups_with_scores
from alignpipe.records import Candidate, Judgment, Prompt


def _data(scores_by_prompt):
    prompts, cands, judgments = [], [], []
    for p, scores in scores_by_prompt.items():
        prompts.append(Prompt(id=p, prompt=f"q {p}"))
        for k, s in enumerate(scores):
            cid = f"{p}/{k}"
            cands.append(Candidate(prompt_id=p, id=cid, completion=f"{p}-{k}"))
            judgments.append(Judgment(prompt_id=p, candidate_ids=[cid], judge="t", scores={"s": s}))
    return prompts, cands, judgments


def chat(prompt):
    return f"<chat>{prompt.prompt}"


def test_best_vs_worst_pairs_and_tie_counting():
    prompts, cands, judgments = _data({"a": [0.0, 1.0, 0.5], "b": [1.0, 1.0], "c": [0.0, 0.0, 0.0], "d": [0.2, 0.9]})
    pairs, stats = best_vs_worst_pairs(prompts, cands, judgments, chat)
    assert stats.prompts == 4 and stats.examples == 2 and stats.skipped_uniform == 2
    by_prompt = {p.prompt_id: p for p in pairs}
    assert (by_prompt["a"].chosen, by_prompt["a"].rejected, by_prompt["a"].margin) == ("a-1", "a-0", 1.0)
    assert by_prompt["d"].margin == 0.9 - 0.2 and by_prompt["d"].prompt == "<chat>q d"


def test_min_margin_filters_and_counts():
    prompts, cands, judgments = _data({"a": [0.0, 1.0], "d": [0.4, 0.5]})
    pairs, stats = best_vs_worst_pairs(prompts, cands, judgments, chat, min_margin=0.5)
    assert [p.prompt_id for p in pairs] == ["a"] and stats.skipped_margin == 1


def test_ties_broken_by_seed_deterministically():
    prompts, cands, judgments = _data({"a": [1.0, 1.0, 1.0, 0.0, 0.0]})
    picks = {best_vs_worst_pairs(prompts, cands, judgments, chat, seed=s)[0][0].chosen for s in range(20)}
    assert picks <= {"a-0", "a-1", "a-2"} and len(picks) > 1
    again = [best_vs_worst_pairs(prompts, cands, judgments, chat, seed=3)[0][0].chosen for _ in range(3)]
    assert len(set(again)) == 1


def test_invalid_judgment_scores_zero_and_is_counted():
    prompts, cands, judgments = _data({"a": [1.0, 1.0]})
    judgments[1].status, judgments[1].scores = "error", {}
    pairs, stats = best_vs_worst_pairs(prompts, cands, judgments, chat)
    assert stats.judgments_not_ok == 1 and pairs[0].rejected == "a-1"


def test_groups_keep_all_candidates_and_drop_uniform():
    prompts, cands, judgments = _data({"a": [0.0, 1.0, 1.0], "c": [1.0, 1.0, 1.0]})
    groups, stats = groups_with_scores(prompts, cands, judgments, chat)
    assert len(groups) == 1 and groups[0].scores == [0.0, 1.0, 1.0] and groups[0].completions == ["a-0", "a-1", "a-2"]
    assert stats.skipped_uniform == 1
    kept, _ = groups_with_scores(prompts, cands, judgments, chat, drop_uniform=False)
    assert len(kept) == 2
