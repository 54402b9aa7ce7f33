"""Judgments remembered per judge and item, so that a judge is never asked the same question twice.

A judge evaluated alone and again as an ensemble member, or a judge-eval run repeated with one more judge,
would otherwise redo its most expensive work. `CachedJudge` wraps a judge's `score` / `compare`: items
already judged are answered from the `JudgmentStore`, the rest go to the judge in one call.

The key is the judge's name, the method, the prompt text and the judged completions (not ids, which
differ between files and runs); a hit is returned with the current item's ids. Only `ok` judgments are
kept: an invalid or failed verdict is asked again. With a directory the store is also a set of jsonl
files, one per judge, appended as judgments arrive, so a later run (e.g. `judge-eval --cache DIR` on a
subset) reuses them. Change the judge's prompt or options and its name should change with them (the
LLM judges put the verdict mode in their name); otherwise clear the directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from alignpipe.killpoints import killpoint
from alignpipe.records import Judgment


class JudgmentStore:
    """`ok` judgments by (judge name, item key), in memory and optionally in `directory/<judge>.jsonl`."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._tables: dict[str, dict[str, dict]] = {}

    def _file(self, judge: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", judge) + ".jsonl")

    def _table(self, judge: str) -> dict[str, dict]:
        if judge not in self._tables:
            table: dict[str, dict] = {}
            path = self._file(judge)
            if path is not None and path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                        table[row["key"]] = row["judgment"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a killed run
            self._tables[judge] = table
        return self._tables[judge]

    def get(self, judge: str, key: str) -> dict | None:
        return self._table(judge).get(key)

    def put(self, judge: str, entries: dict[str, dict]) -> None:
        self._table(judge).update(entries)
        path = self._file(judge)
        if path is not None and entries:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.writelines(json.dumps({"key": k, "judgment": v}) + "\n" for k, v in entries.items())


def item_key(method: str, item: tuple) -> str:
    prompt, *candidates = item
    text = json.dumps([method, prompt.prompt, [c.completion for c in candidates]])
    return hashlib.sha256(text.encode()).hexdigest()


class CachedJudge:
    """`judge` with its `score` and/or `compare` answered from `store` where possible. Every other attribute
    (`name`, `stats`, ...) is the wrapped judge's."""

    def __init__(self, judge: Any, store: JudgmentStore, chunk_size: int = 128) -> None:
        self.judge, self.store, self.hits, self.chunk_size = judge, store, 0, chunk_size
        for method in ("score", "compare"):
            if callable(getattr(judge, method, None)):
                setattr(self, method, partial(self._call, method))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.judge, attr)

    def _call(self, method: str, items: list) -> list[Judgment]:
        name = self.judge.name
        keys = [item_key(method, it) for it in items]
        out: list[Judgment | None] = []
        for item, key in zip(items, keys, strict=True):
            hit = self.store.get(name, key)
            out.append(None if hit is None else replace(Judgment(**hit), prompt_id=item[0].id,
                                                        candidate_ids=[c.id for c in item[1:]]))
        todo = [i for i, j in enumerate(out) if j is None]
        self.hits += len(items) - len(todo)
        # in chunks, each remembered as soon as it is judged: a run killed mid-judging asks again only the
        # chunk it was in, not everything from the first item
        for start in range(0, len(todo), self.chunk_size):
            chunk = todo[start : start + self.chunk_size]
            fresh = getattr(self.judge, method)([items[i] for i in chunk])
            if len(fresh) != len(chunk):
                raise RuntimeError(f"{name} returned {len(fresh)} judgments for {len(chunk)} items")
            for i, j in zip(chunk, fresh, strict=True):
                out[i] = j
            self.store.put(name, {keys[i]: asdict(j) for i, j in zip(chunk, fresh, strict=True) if j.status == "ok"})
            killpoint(f"judge:{name}:{method}:{start // self.chunk_size}")
        return out  # type: ignore[return-value]
