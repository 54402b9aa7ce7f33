from alignpipe.instantiation import best_vs_worst_pairs, groups_with_scores, labelled_points
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


def test_failed_judgment_is_never_training_signal_and_is_counted():
    # a-1 failed: scored 0 it would have been the rejected response; it is left out instead
    prompts, cands, judgments = _data({"a": [1.0, 1.0, 0.5], "b": [1.0, 0.0]})
    judgments[1].status, judgments[1].scores = "error", {}
    judgments[3].status = "invalid"  # b-0: even with a score left on it, an invalid judgment is not used
    pairs, stats = best_vs_worst_pairs(prompts, cands, judgments, chat)
    assert stats.judgments_not_ok == {"error": 1, "invalid": 1}
    assert [(p.chosen, p.rejected) for p in pairs] == [("a-0", "a-2")]  # b has one judged candidate: no pair
    groups, gstats = groups_with_scores(prompts, cands, judgments, chat, drop_uniform=False)
    assert groups == [] and gstats.skipped_incomplete == 2 and gstats.judgments_not_ok["error"] == 1
    whole, _ = groups_with_scores(prompts, cands[:3], [judgments[0], judgments[2]], chat)
    assert whole == []  # a-1's judgment is missing: the group is incomplete
    points, _ = labelled_points(prompts, cands, judgments[:4], chat)  # b-1 has no judgment at all
    assert [p.completion for p in points] == ["a-0", "a-2"]
    assert labelled_points(prompts, cands, judgments[:4], chat)[1].judgments_not_ok == {"error": 1, "invalid": 1,
                                                                                       "missing": 1}


def test_groups_keep_all_candidates_and_drop_uniform():
    prompts, cands, judgments = _data({"a": [0.0, 1.0, 1.0], "c": [1.0, 1.0, 1.0]})
    groups, stats = groups_with_scores(prompts, cands, judgments, chat)
    assert len(groups) == 1 and groups[0].scores == [0.0, 1.0, 1.0] and groups[0].completions == ["a-0", "a-1", "a-2"]
    assert stats.skipped_uniform == 1
    kept, _ = groups_with_scores(prompts, cands, judgments, chat, drop_uniform=False)
    assert len(kept) == 2


def test_reward_gap_pairs_follow_rs_dpo_threshold():
    import math

    from alignpipe.instantiation import reward_gap_pairs

    # tau = 1, eta = 0.85: a pair needs r_w - r_l > logit(0.85) = 1.7346
    prompts, cands, judgments = _data({"a": [0.0, 1.0, 2.0, 3.5], "b": [0.0, 1.7], "c": [1.0, 1.0]})
    pairs, stats = reward_gap_pairs(prompts, cands, judgments, chat)
    got = sorted((p.chosen, p.rejected, round(p.margin, 6)) for p in pairs)
    assert got == [("a-2", "a-0", 2.0), ("a-3", "a-0", 3.5), ("a-3", "a-1", 2.5)]
    assert stats.skipped_margin == 1 and stats.skipped_uniform == 1 and stats.examples == 3
    # a larger tau shrinks the scaled gap: with tau = 2 only gaps above 3.469 pass
    pairs, _ = reward_gap_pairs(prompts, cands, judgments, chat, eta=0.85, tau=2.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a-3", "a-0")]
    assert 2.0 * math.log(0.85 / 0.15) < 3.5
