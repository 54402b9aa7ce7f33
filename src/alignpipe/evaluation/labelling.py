"""The labelling queue and label store behind `alignpipe label` (no web code: label_server.py serves it).

**Items.** A pairs file (hh-rlhf dialogues or TRL prompt/chosen/rejected, read by `data.pairs.load_pairs`,
which stops at the first bad row with an error naming file, row and field: no row is skipped, so none can
vanish) or a run round `RUN/round-NN`: its pair examples (first = the judge's chosen), else per prompt the
first two distinct candidates. An item is one prompt and two responses in their ORIGINAL order (first =
the input's chosen); its id is `item_key(prompt_id, [first_id, second_id])`, stable across restarts.

**Display order.** Per item, a RNG seeded with (seed, item id) puts the first or the second response on the
left. The click is mapped back on save, so a label always refers to the original order; the shown order
and the button are kept in the judgment's `raw` field (`{"left": "second", "button": "A"}`).

**Labels.** `Judgment(judge="human:<labeller>", candidate_ids=[first, second], preference=first|second|tie)`
one per line in a JSONL file, rewritten atomically on every change (temp file, fsync, rename), so a killed
server leaves the old file or the new one. A skip is stored as `status="invalid", reason="skipped"`: as
everywhere in alignpipe, a judge that gives no verdict is recorded as not ok rather than left out, and a
judgment that is not ok is never training signal nor counted in agreement. Keeping skips in the same
ordered file makes resume (the first item without a line) and undo (drop the last line) one rule each.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.data.files import jsonl_objects
from alignpipe.records import Candidate, Judgment, PairExample, Prompt, read_records, write_text_atomic

PREFERENCES = ("first", "second", "tie")
CHOICES = ("A", "B", "tie", "skip")


def item_key(prompt_id: str, candidate_ids: list[str]) -> str:
    """The id of an item (and of every label of it): prompt id and both candidate ids, original order."""
    return "|".join([prompt_id, *candidate_ids])


@dataclass
class LabelItem:
    prompt: Prompt
    first: Candidate
    second: Candidate
    dataset_preference: str | None = None  # "first" where the input prefers `first` (chosen, judge's pick)

    @property
    def id(self) -> str:
        return item_key(self.prompt.id, [self.first.id, self.second.id])

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt's chat turns (one user turn when the prompt has no messages)."""
        return self.prompt.meta.get("messages") or [{"role": "user", "content": self.prompt.prompt}]


@dataclass
class LabelSource:
    path: Path
    items: list[LabelItem]
    description: str  # what the input is and what "first" means in it
    default_out: Path
    notes: list[str] = field(default_factory=list)  # what of the input is not an item, and why


# ---------------------------------------------------------------- inputs


def _read(path: Path, cls: type) -> list:
    if not path.is_file():
        raise AlignpipeError(f"{path.parent}: not a run round directory (no {path.name})")
    try:
        return read_records(path, cls)
    except Exception as exc:  # noqa: BLE001 - any pyarrow/decoding failure means an unusable file
        raise AlignpipeError(f"{path}: not a readable {cls.__name__} parquet file ({exc})") from None


def _text_id(prompt_id: str, text: str) -> str:
    return f"{prompt_id}/sha1-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _round_items(rd: Path) -> tuple[list[LabelItem], str, list[str]]:
    prompts = {p.id: p for p in _read(rd / "prompts.parquet", Prompt)}
    candidates = _read(rd / "candidates.parquet", Candidate)
    for i, c in enumerate(candidates, start=1):
        if c.prompt_id not in prompts:
            raise AlignpipeError(f"{rd / 'candidates.parquet'}: row {i}: field 'prompt_id': no prompt "
                                 f"{c.prompt_id!r} in prompts.parquet")
    ex_path = rd / "examples.parquet"
    if ex_path.is_file():
        import pyarrow.parquet as pq

        if {"chosen", "rejected"} <= set(pq.read_schema(ex_path).names):
            examples = _read(ex_path, PairExample)
            if examples:
                by_text = {(c.prompt_id, c.completion): c for c in candidates}
                items = []
                for ex in examples:
                    prompt = prompts.get(ex.prompt_id) or Prompt(id=ex.prompt_id, prompt=ex.prompt)
                    a, b = (by_text.get((ex.prompt_id, t)) or Candidate(ex.prompt_id, _text_id(ex.prompt_id, t), t)
                            for t in (ex.chosen, ex.rejected))
                    items.append(LabelItem(prompt, a, b, "first"))
                return items, f"{rd}: the round's pair examples (first = the judge's chosen)", []
    by_prompt: dict[str, list[Candidate]] = {}
    for c in candidates:
        group = by_prompt.setdefault(c.prompt_id, [])
        if len(group) < 2 and all(g.completion != c.completion for g in group):
            group.append(c)
    items = [LabelItem(prompts[pid], *group) for pid, group in by_prompt.items() if len(group) == 2]
    notes = []
    if len(items) < len(prompts):
        notes.append(f"{len(prompts) - len(items)} of {len(prompts)} prompts have fewer than two distinct "
                     "candidates and are not shown")
    return items, f"{rd}: the round's candidates, the first two distinct per prompt (no preferred one)", notes


def load_source(path: str | Path) -> LabelSource:
    """The items of a pairs file or of a run round directory (see the module docstring)."""
    from alignpipe.data.pairs import load_pairs

    path = Path(path)
    if path.is_dir():
        items, description, notes = _round_items(path)
        default_out = path / "labels.{labeller}.jsonl"  # inside the round: `round-*` globs stay directories
    else:
        pairs = load_pairs(path)
        items = [LabelItem(p, c, r, "first") for p, c, r in pairs]
        description, notes = f"{path}: preference pairs (first = the file's chosen)", []
        default_out = path.with_name(path.name + ".labels.{labeller}.jsonl")
    seen: dict[str, int] = {}
    unique = []
    for i, item in enumerate(items, start=1):
        if item.id not in seen:
            seen[item.id] = i
            unique.append(item)
        elif not path.is_dir():  # in a pairs file only a repeated `id` field makes two rows one item
            raise AlignpipeError(f"{path}: row {i}: field 'id': item {item.id!r} repeats row {seen[item.id]}")
    if len(unique) < len(items):  # a round can pair the same two responses twice (e.g. RS-DPO, equal texts)
        notes.append(f"{len(items) - len(unique)} repeated pairs are shown once")
    return LabelSource(path, unique, description, default_out, notes)


# ---------------------------------------------------------------- the label file


def read_labels(path: str | Path) -> list[Judgment]:
    """The judgments of a labels file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise AlignpipeError(f"labels file not found: {path}")
    names = {f.name for f in fields(Judgment)}
    out = []
    for i, row in jsonl_objects(path, "a JSON object (a judgment)"):
        for name in ("prompt_id", "judge"):
            if not isinstance(row.get(name), str):
                raise AlignpipeError(f"{path}: line {i}: field '{name}': missing or not text")
        ids = row.get("candidate_ids")
        if not isinstance(ids, list) or len(ids) != 2 or not all(isinstance(x, str) for x in ids):
            raise AlignpipeError(f"{path}: line {i}: field 'candidate_ids': expected two candidate ids")
        if row.get("status", "ok") == "ok" and row.get("preference") not in PREFERENCES:
            raise AlignpipeError(f"{path}: line {i}: field 'preference': expected first, second or tie, "
                                 f"got {row.get('preference')!r}")
        out.append(Judgment(**{k: v for k, v in row.items() if k in names}))
    return out


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL so that a crash at any point leaves the old file or the new one, never a torn one."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), durable=True)


class LabelStore:
    """The queue (items in input order, the first `limit`) and the labels of one labeller, kept on disk.

    `label` and `undo` take the item id the page showed: a stale page or a double submit names an item
    that is no longer the current one and changes nothing."""

    def __init__(self, source: LabelSource, labeller: str, out: str | Path | None = None, seed: int = 0,
                 limit: int | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", labeller):
            raise AlignpipeError(f"--labeller must be letters, digits, '_', '.' or '-', got {labeller!r}")
        if limit is not None and limit < 1:
            raise AlignpipeError(f"--limit must be at least 1, got {limit}")
        self.source, self.seed, self.judge = source, seed, f"human:{labeller}"
        self.items = source.items[:limit] if limit else list(source.items)
        self.path = Path(out) if out else Path(str(source.default_out).format(labeller=labeller))
        self.entries: list[Judgment] = read_labels(self.path) if self.path.exists() else []
        known = {item.id for item in source.items}
        for i, j in enumerate(self.entries, start=1):
            if j.judge != self.judge:
                raise AlignpipeError(f"{self.path}: line {i}: field 'judge': labels of {j.judge}, not {self.judge}")
            if item_key(j.prompt_id, j.candidate_ids) not in known:
                raise AlignpipeError(f"{self.path}: line {i}: field 'candidate_ids': no such item in "
                                     f"{source.path} (labels of another input?)")

    def left(self, item: LabelItem) -> str:
        """Which original response ("first"/"second") the page shows on the left, seeded per item."""
        return "second" if random.Random(f"{self.seed}|{item.id}").random() < 0.5 else "first"

    def shown(self, item: LabelItem) -> tuple[Candidate, Candidate]:
        """(left = A, right = B)."""
        return (item.second, item.first) if self.left(item) == "second" else (item.first, item.second)

    def _done(self) -> set[str]:
        return {item_key(j.prompt_id, j.candidate_ids) for j in self.entries}

    def current(self) -> LabelItem | None:
        """The first item of the queue without a label (None: all done)."""
        done = self._done()
        return next((item for item in self.items if item.id not in done), None)

    def progress(self) -> dict[str, int]:
        ids = {item.id for item in self.items}
        mine = [j for j in self.entries if item_key(j.prompt_id, j.candidate_ids) in ids]
        skipped = sum(j.status != "ok" for j in mine)
        return {"done": len(mine), "total": len(self.items), "skipped": skipped, "labelled": len(mine) - skipped}

    def label(self, item_id: str, choice: str) -> Judgment | None:
        """Record `choice` (A = left, B = right, tie, skip) for the current item; None if `item_id` is stale."""
        if choice not in CHOICES:
            raise AlignpipeError(f"unknown choice {choice!r} (expected one of {', '.join(CHOICES)})")
        item = self.current()
        if item is None or item.id != item_id:
            return None
        left = self.left(item)
        right = "first" if left == "second" else "second"
        j = Judgment(prompt_id=item.prompt.id, candidate_ids=[item.first.id, item.second.id], judge=self.judge,
                     raw=json.dumps({"left": left, "button": choice}))
        if choice == "skip":
            j.status, j.reason = "invalid", "skipped"
        else:
            j.preference = {"A": left, "B": right, "tie": "tie"}[choice]
        self._save(self.entries + [j])
        return j

    def undo(self, item_id: str) -> Judgment | None:
        """Remove the last label, if the page that asks shows the current item ("" for the done page)."""
        item = self.current()
        if not self.entries or (item.id if item else "") != item_id:
            return None
        last = self.entries[-1]
        self._save(self.entries[:-1])
        return last

    def _save(self, entries: list[Judgment]) -> None:
        write_jsonl_atomic(self.path, [asdict(j) for j in entries])
        self.entries = entries  # only once the file holds them


# ---------------------------------------------------------------- agreement


def _verdicts(labels: list[Judgment]) -> dict[str, str]:
    return {item_key(j.prompt_id, j.candidate_ids): j.preference for j in labels
            if j.status == "ok" and j.preference in PREFERENCES}


def human_agreement(labels_a: list[Judgment], labels_b: list[Judgment]) -> dict[str, Any]:
    """Agreement of two labellers on the items both labelled (skips left out): the share of identical
    verdicts and Cohen's kappa over first/second/tie, (p_o - p_e) / (1 - p_e) with p_e from each labeller's
    own verdict frequencies (NaN where p_e = 1: both always gave the same single verdict)."""
    a, b = _verdicts(labels_a), _verdicts(labels_b)
    common = [k for k in a if k in b]
    n = len(common)
    out: dict[str, Any] = {"n": n, "only_a": len(a.keys() - b.keys()), "only_b": len(b.keys() - a.keys()),
                           "agreement": math.nan, "kappa": math.nan}
    if n:
        p_o = sum(a[k] == b[k] for k in common) / n
        ca, cb = Counter(a[k] for k in common), Counter(b[k] for k in common)
        p_e = sum(ca[c] * cb[c] for c in PREFERENCES) / n**2
        out.update(agreement=p_o, kappa=(p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan)
    return out


def dataset_agreement(labels: list[Judgment], items: list[LabelItem]) -> dict[str, Any]:
    """Agreement of a labeller with the input's own labels (chosen/rejected, or the judge's pick of a round):
    `agreement` is the share of identical verdicts (a tie never matches), `agreement_tie_half` scores as
    judge-eval scores a judge (the dataset's pick = 1, tie = 0.5, the other = 0). Kappa is left out: the
    dataset always prefers `first`, and kappa against a rater who never varies is 0 or undefined."""
    verdicts = _verdicts(labels)
    pairs = [(verdicts[item.id], item.dataset_preference) for item in items
             if item.id in verdicts and item.dataset_preference]
    n = len(pairs)
    out: dict[str, Any] = {"n": n, "agreement": math.nan, "agreement_tie_half": math.nan, "ties": math.nan}
    if n:
        out.update(agreement=sum(h == d for h, d in pairs) / n, ties=sum(h == "tie" for h, _ in pairs) / n,
                   agreement_tie_half=sum(1.0 if h == d else 0.5 if h == "tie" else 0.0 for h, d in pairs) / n)
    return out


def agreement_rows(label_paths: list[str], input_path: str | None = None) -> list[dict[str, Any]]:
    """`alignpipe label-agreement`: one row per two labels files, and with `input_path` one row per file
    against the input's own labels."""
    if len(label_paths) < 2 and input_path is None:
        raise AlignpipeError("label-agreement needs two labels files, or one with --input (the labelled file)")
    labels = {p: read_labels(p) for p in label_paths}
    rows = [{"a": a, "b": b, **human_agreement(labels[a], labels[b])}
            for i, a in enumerate(label_paths) for b in label_paths[i + 1:]]
    if input_path is not None:
        source = load_source(input_path)
        if not any(item.dataset_preference for item in source.items):
            raise AlignpipeError(f"{input_path}: has no labels of its own to compare with ({source.description})")
        rows += [{"a": p, "b": f"dataset ({input_path})", **dataset_agreement(labels[p], source.items)}
                 for p in label_paths]
    return rows


# ---------------------------------------------------------------- export for offline recipes


def export_preferences(items: list[LabelItem], labels: list[Judgment], path: str | Path) -> dict[str, int]:
    """Write the human's decisive labels as TRL preference rows (chosen = the human's pick; ties and skips
    are dropped): `load_pairs`, `judge-eval --pairs` and offline recipes read the file. Prompts are plain
    text, or message lists (conversational rows) if any prompt has more than one turn."""
    verdicts = _verdicts(labels)
    chat = any(len(item.messages) > 1 or item.messages[0]["role"] != "user" for item in items)
    rows = []
    for item in items:
        pref = verdicts.get(item.id)
        if pref not in ("first", "second"):
            continue
        chosen, rejected = (item.first, item.second) if pref == "first" else (item.second, item.first)
        if chat:
            rows.append({"id": item.id, "prompt": item.messages,
                         "chosen": [{"role": "assistant", "content": chosen.completion}],
                         "rejected": [{"role": "assistant", "content": rejected.completion}]})
        else:
            rows.append({"id": item.id, "prompt": item.messages[0]["content"], "chosen": chosen.completion,
                         "rejected": rejected.completion})
    if not rows:
        raise AlignpipeError(f"no decisive labels to export (labels: {len(labels)}, ties and skips are dropped)")
    write_jsonl_atomic(Path(path), rows)
    return {"pairs": len(rows), "ties": sum(v == "tie" for v in verdicts.values()),
            "skipped": sum(j.status != "ok" for j in labels)}
