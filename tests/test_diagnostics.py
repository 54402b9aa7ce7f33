"""Per-round diagnostics on a hand-made round directory with known answers; missing files; not-a-run errors."""

import json
import math

import pytest
import yaml

from alignpipe import AlignpipeError
from alignpipe.diagnostics.plots import PANELS, clean_svg, lookup, panel_data, panel_svg
from alignpipe.diagnostics.report import build_report, config_diff, flatten, render_html
from alignpipe.diagnostics.rounds import pearson, round_diagnostics, spearman, write_round_diagnostics
from alignpipe.records import Candidate, Judgment, PairExample, Prompt, write_records

TEXTS = {  # candidate id: (prompt id, completion, tokens, truncated)
    "c1": ("p1", "the answer is 4", 4, False),
    "c2": ("p1", "the answer is 4", 4, False),  # duplicate of c1 within p1
    "c3": ("p1", "five", 1, True),
    "c4": ("p2", "seven", 1, False),
    "c5": ("p2", "eight", 1, False),
    "c6": ("p3", "x y", 2, False),
}
SCORES = {"c1": 1.0, "c2": 1.0, "c3": 0.0, "c4": 0.0, "c5": 0.0}  # p2 ties; c6 is invalid
ENSEMBLE_RAW = json.dumps({"members": [{"status": "ok", "scores": {"s": 1.0}},
                                       {"status": "ok", "scores": {"s": 0.0}}], "spread": {"s": 0.5}})


def make_round(rd, with_metrics=True):
    write_records(rd / "prompts.parquet", [Prompt(id=p, prompt=f"question {p}") for p in ("p1", "p2", "p3")])
    write_records(rd / "candidates.parquet", [
        Candidate(prompt_id=p, id=cid, completion=t, num_tokens=n, truncated=tr,
                  source={"source": "teacher"} if cid == "c6" else {"model": "m", "round": 0})
        for cid, (p, t, n, tr) in TEXTS.items()])
    judgments = [Judgment(TEXTS[c][0], [c], "verifier", scores={"correct": s},
                          raw=ENSEMBLE_RAW if c == "c1" else "") for c, s in SCORES.items()]
    judgments.append(Judgment("p3", ["c6"], "verifier", status="invalid", reason="unparseable"))
    # raw pairwise verdicts in both orders: (c4, c5) agree once swapped back, (c1, c3) do not
    judgments += [Judgment("p2", ["c4", "c5"], "pw", preference="first"),
                  Judgment("p2", ["c5", "c4"], "pw", preference="second"),
                  Judgment("p1", ["c1", "c3"], "pw", preference="first"),
                  Judgment("p1", ["c3", "c1"], "pw", preference="first"),
                  Judgment("p1", ["c2", "c3"], "pw", status="error", reason="timeout")]
    write_records(rd / "judgments.parquet", judgments)
    write_records(rd / "examples.parquet", [
        PairExample(prompt="q1", chosen="the answer is 4", rejected="five", margin=1.0, prompt_id="p1"),
        PairExample(prompt="q3", chosen="a", rejected="b", margin=0.5, prompt_id="p3")])
    if with_metrics:
        (rd / "metrics.json").write_text(json.dumps({
            "round": 0, "prompts": 3, "skipped_uniform": 1, "skipped_margin": 0, "skipped_incomplete": 0,
            "judgments_not_ok": {"invalid": 1}, "train": {"loss": 0.69, "steps": 2, "kl_ref_after": 0.01, "dpo/loss": 0.7},
            "stage_seconds": {"sampling": 1.5, "judging": 0.5}, "peak_rss_mb": 100.0}))


@pytest.fixture()
def round_dir(tmp_path):
    rd = tmp_path / "run" / "round-00"
    make_round(rd)
    return rd


def test_candidate_section_known_answers(round_dir):
    c = round_diagnostics(round_dir)["candidates"]
    assert c["count"] == 6 and c["prompts"] == 3
    # words: the answer is 4 (x2), five, seven, eight, x, y -> 13 unigrams, 9 distinct
    assert c["distinct_1"] == pytest.approx(9 / 13)
    # bigrams: 3 per "the answer is 4" (x2) + "x y" -> 7, 4 distinct
    assert c["distinct_2"] == pytest.approx(4 / 7)
    assert c["duplicate_rate"] == pytest.approx(1 / 6)
    assert c["truncation_rate"] == pytest.approx(1 / 6)
    assert c["by_source"] == {"policy": 5, "teacher": 1}
    assert c["tokens"]["max"] == 4 and c["tokens"]["mean"] == pytest.approx(13 / 6)
    assert c["tokens"]["p50"] == pytest.approx(1.5)
    assert c["chars"]["max"] == len("the answer is 4")


def test_judgment_section_known_answers(round_dir):
    j = round_diagnostics(round_dir)["judgments"]
    assert j["count"] == 6 and j["ok"] == 5
    assert j["scores"]["mean"] == pytest.approx(0.4) and j["scores"]["max"] == 1.0
    assert sum(j["histogram"]["counts"]) == 5
    # p1 has scores (1, 1, 0), p2 (0, 0): one of the two prompts with >= 2 scored candidates ties
    assert j["prompts_scored"] == 2 and j["tie_share"] == pytest.approx(0.5)
    assert j["invalid_rate"] == pytest.approx(1 / 6) and j["error_rate"] == 0
    assert j["reasons"] == {"invalid": {"unparseable": 1}}
    pw = j["pairwise"]
    assert pw["comparisons"] == 5 and pw["both_order_consistency"] == pytest.approx(0.5)
    assert pw["error_rate"] == pytest.approx(1 / 5) and pw["raw_reasons"] == {"error": {"timeout": 1}}
    assert j["ensemble"]["scored"] == 1 and j["ensemble"]["member_sd_mean"] == pytest.approx(0.5)
    # scores (1, 1, 0, 0, 0) against tokens (4, 4, 1, 1, 1): a perfect linear and rank relation
    lc = j["length_correlation"]
    assert lc["unit"] == "tokens" and lc["n"] == 5
    assert lc["pearson"] == pytest.approx(1.0) and lc["spearman"] == pytest.approx(1.0)


def test_examples_training_timing(round_dir):
    d = round_diagnostics(round_dir)
    ex = d["examples"]
    assert ex["kind"] == "pair" and ex["count"] == 2
    assert ex["margin"]["mean"] == pytest.approx(0.75) and ex["margin"]["min"] == 0.5
    assert ex["dropped"]["dropped"] == 1 and ex["dropped"]["share"] == pytest.approx(1 / 3)
    assert ex["dropped"]["reasons"] == {"skipped_uniform": 1, "skipped_margin": 0, "skipped_incomplete": 0}
    assert ex["dropped"]["candidates_not_ok"] == {"invalid": 1}
    t = d["training"]
    assert t["loss"] == 0.69 and t["steps"] == 2 and t["kl_ref_after"] == 0.01 and t["other"] == {"dpo/loss": 0.7}
    assert t["missing"] == ["grad_norm", "tokens_per_s", "step_time_s", "kl_ref_before", "reward_acc_before",
                            "reward_acc_after", "reward_margin_before", "reward_margin_after"]
    assert "grad_norm" not in t  # never invented
    assert d["timing"]["stage_seconds"] == {"sampling": 1.5, "judging": 0.5}
    assert d["timing"]["missing"] == ["stage_peak_rss_mb"]


def test_write_round_diagnostics_is_the_computed_dict(round_dir):
    d = write_round_diagnostics(round_dir)
    assert json.loads((round_dir / "diagnostics.json").read_text()) == d
    assert d["round"] == 0 and not list(round_dir.glob(".*tmp*"))


def test_missing_and_unreadable_files_give_missing_sections(tmp_path):
    rd = tmp_path / "round-03"
    make_round(rd, with_metrics=False)
    (rd / "judgments.parquet").unlink()
    (rd / "candidates.parquet").write_text("not parquet")
    d = round_diagnostics(rd)
    assert d["round"] == 3
    assert d["judgments"] == {"missing": "judgments.parquet"}
    assert d["candidates"]["missing"] == "candidates.parquet" and "unreadable" in d["candidates"]["reason"]
    assert d["training"] == {"missing": "metrics.json"} and d["timing"] == {"missing": "metrics.json"}
    assert d["examples"]["count"] == 2 and d["examples"]["dropped"] == {"missing": "metrics.json"}
    empty = round_diagnostics(tmp_path / "round-04")
    assert all(empty[k] == {"missing": f} for k, f in (
        ("candidates", "candidates.parquet"), ("judgments", "judgments.parquet"),
        ("examples", "examples.parquet"), ("training", "metrics.json")))


def test_score_dimension_from_config(tmp_path):
    run = tmp_path / "run"
    make_round(run / "round-00")
    (run / "config.yaml").write_text(yaml.safe_dump({"instantiation": {"score": "nope"}}))
    assert round_diagnostics(run / "round-00")["judgments"]["scores"]["mean"] == 0.0  # no such dimension: 0
    assert round_diagnostics(run / "round-00", {"instantiation": {"score": "correct"}})["judgments"]["scores"][
        "mean"] == pytest.approx(0.4)


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) is None and pearson([1, 2], [1, 2]) is None
    # monotone but not linear: Spearman 1, Pearson below 1
    x, y = [1, 2, 3, 4], [1, 10, 100, 1000]
    assert spearman(x, y) == pytest.approx(1.0) and pearson(x, y) < 0.9
    assert spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)  # ties get mean ranks


def test_not_a_run_directory(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(AlignpipeError, match=r"not a run directory: .*stuff \(no config.yaml"):
        build_report([tmp_path / "stuff"])
    with pytest.raises(AlignpipeError, match="no such directory"):
        build_report([tmp_path / "nope"])


def test_unfinished_run_reports_what_is_missing(tmp_path):
    run = tmp_path / "died"
    make_round(run / "round-00")
    make_round(run / "round-01", with_metrics=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "died", "rounds": 4}))
    rep = build_report([run])
    notes = rep["runs"][0]["notes"]
    assert "no summary.json: the run did not finish" in notes
    assert "round 1: no metrics.json (the run stopped in this round)" in notes
    assert "round(s) 2, 3 of 4 never started" in notes
    assert rep["runs"][0]["outcome"] == {"missing": "summary.json"}
    ex = rep["runs"][0]["examples"]
    assert ex["round"] == 1 and ex["prompts"][0]["prompt_id"] == "p1"  # p1's scores differ: shown first
    shown = [c["id"] for c in ex["prompts"][0]["candidates"]]
    assert len(shown) == 3 and shown[0] == "c1" and shown[-1] == "c3"  # best first, worst last
    sample = next(p for p in rep["panels"] if p["id"] == "sample_reward")
    assert sample["series"][0]["x"] == [0, 1] and sample["series"][0]["y"] == pytest.approx([0.4, 0.4])
    loss = next(p for p in rep["panels"] if p["id"] == "loss")
    assert loss["series"][0]["y"] == [0.69, None]
    kl = next(p for p in rep["panels"] if p["id"] == "reward_accuracy")
    assert kl["note"] == "not recorded: training.reward_acc_before, training.reward_acc_after"
    page = render_html(rep)
    assert page.count("<svg") == len(PANELS) and "round 1: no metrics.json" in page
    json.dumps(rep, allow_nan=False)  # JSON-safe


def test_config_diff_and_flatten():
    a = {"name": "a", "optimization": {"objectives": [{"name": "dpo", "beta": 0.1}], "lr": 1}, "seed": 0}
    b = {"name": "b", "optimization": {"objectives": [{"name": "dpo", "beta": 0.5}], "lr": 1}}
    assert flatten(a)["optimization.objectives.0.beta"] == 0.1
    rows = {r["key"]: r for r in config_diff([a, b])}
    assert set(rows) == {"name", "optimization.objectives.0.beta", "seed"}
    assert rows["optimization.objectives.0.beta"]["values"] == [0.1, 0.5]
    assert rows["seed"]["absent"] == [False, True]


def test_panel_svg_is_inline_and_loads_nothing():
    panel = panel_data([("a", [{"round": 0, "judgments": {"scores": {"mean": 0.2}}},
                               {"round": 1, "judgments": {"scores": {"mean": 0.5}}}]),
                        ("b", [{"round": 0, "judgments": {"scores": {"mean": 0.3}}}])])[0]
    svg = panel_svg(panel)
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "http" not in svg
    assert ">a<" in svg and ">b<" in svg  # the legend names both runs, as text
    assert lookup({"a": {"b": True}}, "a.b") is None and lookup({"a": {"b": 2}}, "a.b") == 2.0
    assert clean_svg('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><metadata>x</metadata></svg>') \
        == "<svg></svg>"
    assert not math.isnan(panel["series"][0]["y"][1])
