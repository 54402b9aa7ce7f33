"""The labelling queue and store (no server): display order recorded and undone, atomic writes, resume,
undo, stale pages, skips, export to TRL rows, agreement and kappa with known values, run-round inputs and
bad input (one-line errors naming file, row/line and field)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from alignpipe import AlignpipeError, records
from alignpipe.data.pairs import load_pairs
from alignpipe.evaluation import labelling
from alignpipe.evaluation.labelling import (
    LabelStore,
    agreement_rows,
    dataset_agreement,
    export_preferences,
    human_agreement,
    item_key,
    load_source,
    read_labels,
)
from alignpipe.records import Candidate, Judgment, PairExample, PointExample, Prompt, write_records

N = 8


def write_pairs(path: Path, n: int = N) -> Path:
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


def store_of(path: Path, labeller: str = "ann", **kw) -> LabelStore:
    return LabelStore(load_source(path), labeller, **kw)


def pick(store: LabelStore, want: str) -> str:
    """The button that shows the original response `want` ("first" = chosen) on the current page."""
    return "A" if store.left(store.current()) == want else "B"


def test_display_order_is_recorded_and_undone(pairs_file: Path) -> None:
    store = store_of(pairs_file, seed=3)
    lefts = [store.left(item) for item in store.items]
    assert set(lefts) == {"first", "second"}  # both orders occur among 8 items
    assert lefts == [store_of(pairs_file, seed=3).left(item) for item in store.items]  # seeded: same again
    wanted = ["first", "second", "first", "first", "second", "second", "first", "second"]
    for k, want in enumerate(wanted):
        item = store.current()
        left, right = store.shown(item)
        assert {left.completion, right.completion} == {f"good answer {k}", f"bad answer {k}"}
        button = pick(store, want)
        shown = left if button == "A" else right
        assert shown.completion == (f"good answer {k}" if want == "first" else f"bad answer {k}")
        store.label(item.id, button)
    saved = read_labels(store.path)
    assert [j.preference for j in saved] == wanted
    for k, j in enumerate(saved):
        assert j.judge == "human:ann" and j.status == "ok"
        assert j.candidate_ids == [f"pairs:{k + 1}/chosen", f"pairs:{k + 1}/rejected"]  # original order
        assert json.loads(j.raw)["left"] == lefts[k]
    assert store.path == pairs_file.with_name("pairs.jsonl.labels.ann.jsonl")
    assert store.current() is None and store.progress() == {"done": 8, "total": 8, "skipped": 0, "labelled": 8}


def test_resume_continues_at_first_unlabelled_item(pairs_file: Path) -> None:
    store = store_of(pairs_file)
    for _ in range(3):
        store.label(store.current().id, "tie")
    again = store_of(pairs_file)
    assert again.current().prompt.prompt == "question 3?"
    assert again.progress()["done"] == 3
    assert store_of(pairs_file, labeller="bob").current().prompt.prompt == "question 0?"  # own file


def test_undo_removes_the_last_label_and_stale_forms_change_nothing(pairs_file: Path) -> None:
    store = store_of(pairs_file)
    first_id = store.current().id
    assert store.label(first_id, "A") is not None
    assert store.label(first_id, "B") is None  # double submit of the same page
    second_id = store.current().id
    store.label(second_id, "skip")
    assert store.undo(first_id) is None  # a stale page asking for undo
    third_id = store.current().id
    undone = store.undo(third_id)
    assert undone.status == "invalid" and undone.reason == "skipped"
    assert store.undo(third_id) is None  # the same undo submitted twice: only one label goes
    assert store.current().id == second_id and len(read_labels(store.path)) == 1
    with pytest.raises(AlignpipeError, match="unknown choice"):
        store.label(second_id, "C")


def test_skip_is_an_invalid_judgment_kept_in_order(pairs_file: Path) -> None:
    store = store_of(pairs_file)
    store.label(store.current().id, "skip")
    store.label(store.current().id, pick(store, "first"))
    j_skip, j_ok = read_labels(store.path)
    assert (j_skip.status, j_skip.reason, j_skip.preference) == ("invalid", "skipped", None)
    assert j_ok.preference == "first"
    assert store.progress() == {"done": 2, "total": 8, "skipped": 1, "labelled": 1}


def test_every_write_is_atomic(pairs_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_of(pairs_file)
    store.label(store.current().id, "A")
    store.label(store.current().id, "B")
    before = store.path.read_text()
    synced = []
    monkeypatch.setattr(records.os, "fsync", lambda fd: synced.append(fd))

    def killed(src, dst):  # noqa: ANN001 - the process dies between writing the temp file and the rename
        raise OSError("killed")

    monkeypatch.setattr(records.os, "replace", killed)
    with pytest.raises(OSError):
        store.label(store.current().id, "tie")
    assert synced  # the temp file was synced before the rename was attempted
    assert store.path.read_text() == before and len(read_labels(store.path)) == 2
    assert len(store.entries) == 2 and store.current().prompt.prompt == "question 2?"


def test_limit_and_bad_labeller(pairs_file: Path) -> None:
    assert store_of(pairs_file, limit=3).progress()["total"] == 3
    with pytest.raises(AlignpipeError, match="--labeller"):
        store_of(pairs_file, labeller="a/b")


def test_labels_file_errors_name_file_line_and_field(pairs_file: Path, tmp_path: Path) -> None:
    store = store_of(pairs_file)
    store.label(store.current().id, "A")
    with pytest.raises(AlignpipeError, match=r"pairs.jsonl.labels.ann.jsonl: line 1: field 'judge'"):
        LabelStore(load_source(pairs_file), "bob", out=store.path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(store.path.read_text() + json.dumps({"prompt_id": "x", "judge": "human:ann",
                                                        "candidate_ids": ["a", "b"], "preference": "left"}) + "\n")
    with pytest.raises(AlignpipeError, match=r"bad.jsonl: line 2: field 'preference'"):
        read_labels(bad)
    other = write_pairs(tmp_path / "other.jsonl", 3)
    with pytest.raises(AlignpipeError, match=r"line 1: field 'candidate_ids': no such item in .*other.jsonl"):
        LabelStore(load_source(other), "ann", out=store.path)


def test_pairs_file_with_a_bad_row_one_line_error(tmp_path: Path) -> None:
    bad = write_pairs(tmp_path / "bad.jsonl", 3)
    bad.write_text(bad.read_text() + json.dumps({"prompt": "q?", "chosen": "ok"}) + "\n")  # (empty is a response)
    with pytest.raises(AlignpipeError, match=r"bad.jsonl: row 4: field 'rejected': missing field"):
        load_source(bad)
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", "label", str(bad), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.jsonl: row 4: field 'rejected'" in lines[0], result.stderr
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "same", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                           for _ in range(2)))
    with pytest.raises(AlignpipeError, match=r"dup.jsonl: row 2: field 'id'"):
        load_source(dup)


def _labels(prefs: list[str | None], judge: str = "human:x") -> list[Judgment]:
    return [Judgment(prompt_id=f"p{i}", candidate_ids=[f"p{i}/chosen", f"p{i}/rejected"], judge=judge,
                     preference=p, status="ok" if p else "invalid", reason="" if p else "skipped")
            for i, p in enumerate(prefs)]


def test_human_agreement_known_kappa() -> None:
    # 10 items, 8 equal verdicts, each labeller says first 5 times: p_o = .8, p_e = .5, kappa = .6
    a = _labels(["first"] * 5 + ["second"] * 5)
    b = _labels(["first"] * 4 + ["second"] * 5 + ["first"])
    res = human_agreement(a, b)
    assert res["n"] == 10 and res["agreement"] == pytest.approx(0.8) and res["kappa"] == pytest.approx(0.6)
    # with ties: p_o = 3/4, p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16, kappa = (3/4 - 5/16) / (11/16) = 7/11
    res = human_agreement(_labels(["first", "first", "second", "tie"]), _labels(["first", "second", "second", "tie"]))
    assert res["agreement"] == pytest.approx(0.75) and res["kappa"] == pytest.approx(7 / 11)
    # skips and items one labeller did not label are left out; identical constant raters: kappa undefined
    res = human_agreement(_labels(["first", None, "first"]), _labels(["first", "first"]))
    assert (res["n"], res["only_a"], res["only_b"], res["agreement"]) == (1, 1, 1, 1.0) and math.isnan(res["kappa"])


def test_dataset_agreement_scores_ties_as_half(pairs_file: Path) -> None:
    items = load_source(pairs_file).items
    labels = _labels(["first", "second", "tie", None, "first"])
    for j, item in zip(labels, items, strict=False):  # the pairs file's prompt and candidate ids
        j.prompt_id, j.candidate_ids = item.prompt.id, [item.first.id, item.second.id]
    res = dataset_agreement(labels, items)
    assert res["n"] == 4 and res["agreement"] == 0.5 and res["agreement_tie_half"] == pytest.approx(2.5 / 4)
    assert res["ties"] == 0.25


def test_agreement_rows_from_files(pairs_file: Path, tmp_path: Path) -> None:
    for name, wanted in (("ann", ["first", "second", "first", "first"]), ("bob", ["first", "first", "first", "first"])):
        store = store_of(pairs_file, labeller=name, seed=1)
        for want in wanted:
            store.label(store.current().id, pick(store, want))
    files = [str(pairs_file) + ".labels.ann.jsonl", str(pairs_file) + ".labels.bob.jsonl"]
    rows = agreement_rows(files, str(pairs_file))
    assert [(r["b"].split(" ")[0], r["n"]) for r in rows] == [(files[1], 4), ("dataset", 4), ("dataset", 4)]
    # bob always says first: p_o = 3/4 = p_e = (3 * 4) / 16, so kappa = 0 (no agreement beyond chance)
    assert rows[0]["agreement"] == 0.75 and rows[0]["kappa"] == pytest.approx(0.0)
    assert rows[1]["agreement"] == 0.75 and rows[2]["agreement"] == 1.0
    with pytest.raises(AlignpipeError, match="needs two labels files"):
        agreement_rows(files[:1])
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", "label-agreement", *files, "--input",
                             str(pairs_file), "--json", str(tmp_path / "agree.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "agree.json").read_text())
    assert [(r["n"], r["agreement"], r.get("kappa")) for r in saved] == [(4, 0.75, 0.0), (4, 0.75, None),
                                                                         (4, 1.0, None)]


def test_export_writes_trl_rows_with_the_humans_pick(pairs_file: Path, tmp_path: Path) -> None:
    store = store_of(pairs_file, seed=5)
    for want in ("first", "second", "tie", "skip", "second"):
        store.label(store.current().id, "skip" if want == "skip" else "tie" if want == "tie" else pick(store, want))
    out = tmp_path / "human.jsonl"
    counts = export_preferences(store.source.items, store.entries, out)
    assert counts == {"pairs": 3, "ties": 1, "skipped": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("question 0?", "good answer 0", "bad answer 0"), ("question 1?", "bad answer 1", "good answer 1"),
        ("question 4?", "bad answer 4", "good answer 4")]
    assert [p.chosen.completion for p in load_pairs(out)] == ["good answer 0", "bad answer 1", "bad answer 4"]
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", "label", str(pairs_file), "--labeller", "ann",
                             "--export", str(tmp_path / "cli.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 preference pairs" in result.stdout and (tmp_path / "cli.jsonl").read_text() == out.read_text()


def test_export_keeps_multi_turn_prompts_as_messages(tmp_path: Path) -> None:
    hh = tmp_path / "hh.jsonl"
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: "
    hh.write_text(json.dumps({"chosen": dialogue + "Why did...", "rejected": dialogue + "No."}) + "\n")
    store = store_of(hh)
    assert [m["role"] for m in store.current().messages] == ["user", "assistant", "user"]
    store.label(store.current().id, pick(store, "second"))
    export_preferences(store.source.items, store.entries, tmp_path / "out.jsonl")
    (p, c, r), = load_pairs(tmp_path / "out.jsonl")
    assert p.meta["messages"][-1] == {"role": "user", "content": "a joke?"}
    assert (c.completion, r.completion) == ("No.", "Why did...")


def _round(tmp_path: Path, examples: list | None) -> Path:
    rd = tmp_path / "run" / "round-00"
    prompts = [Prompt(id=f"q{i}", prompt=f"prompt {i}") for i in range(3)]
    cands = [Candidate("q0", "q0/0", "x"), Candidate("q0", "q0/1", "x"), Candidate("q0", "q0/2", "y"),
             Candidate("q1", "q1/0", "same"), Candidate("q1", "q1/1", "same"),
             Candidate("q2", "q2/0", "u"), Candidate("q2", "q2/1", "v"), Candidate("q2", "q2/2", "w")]
    write_records(rd / "prompts.parquet", prompts, Prompt)
    write_records(rd / "candidates.parquet", cands, Candidate)
    if examples is not None:
        write_records(rd / "examples.parquet", examples, type(examples[0]) if examples else PairExample)
    return rd


def test_round_directory_pairs_from_examples_else_candidates(tmp_path: Path) -> None:
    rd = _round(tmp_path, [PairExample(prompt="<chat> prompt 2", chosen="w", rejected="u", margin=1.0, prompt_id="q2"),
                           PairExample(prompt="<chat> prompt 0", chosen="y", rejected="z", margin=1.0, prompt_id="q0")])
    src = load_source(rd)
    assert [(i.prompt.prompt, i.first.id, i.second.id, i.dataset_preference) for i in src.items] == [
        ("prompt 2", "q2/2", "q2/0", "first"), ("prompt 0", "q0/2", labelling._text_id("q0", "z"), "first")]
    assert str(LabelStore(src, "ann").path) == str(rd / "labels.ann.jsonl")
    rd = _round(tmp_path / "points", [PointExample(prompt="p", completion="x", score=1.0, label=True, prompt_id="q0")])
    src = load_source(rd)
    assert [(i.first.id, i.second.id, i.dataset_preference) for i in src.items] == [("q0/0", "q0/2", None),
                                                                                      ("q2/0", "q2/1", None)]
    assert src.notes == ["1 of 3 prompts have fewer than two distinct candidates and are not shown"]
    assert item_key("q0", ["q0/0", "q0/2"]) == src.items[0].id
    with pytest.raises(AlignpipeError, match="has no labels of its own"):
        agreement_rows([], str(rd))
    (rd / "prompts.parquet").unlink()
    with pytest.raises(AlignpipeError, match=r"round-00: not a run round directory \(no prompts.parquet\)"):
        load_source(rd)
