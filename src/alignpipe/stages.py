"""Cached stages of a round: a stage's records are read back when they were written with the same
fingerprint, so a killed run resumes where it stopped; and DAPO's dynamic sampling, which repeats the
sampling and judging stages on fresh prompts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alignpipe import distributed
from alignpipe.allocator import release_free_memory
from alignpipe.instantiation import score_of
from alignpipe.instantiation.selection import dynamic_fill
from alignpipe.killpoints import killpoint, where
from alignpipe.records import Candidate, Judgment, Prompt, read_records, write_json, write_records


def cached_stage(path: Path, fingerprint: str, cls: type, compute: Callable[[], list],
                 redo: Callable[[list], bool] | None = None) -> list:
    """Read `path` if it was written with this fingerprint (and `redo` of its records is not true); otherwise
    compute, write atomically, record.

    The fingerprint stamp is removed before the records are written and written after them: a kill in
    between leaves records without a stamp, which are redone, never records under another config's stamp. A
    file that cannot be read (damaged on disk) is redone too. With several processes (`distributed.py`) all of
    them read or compute (`compute` may share its work among them), and only the main process writes."""
    distributed.barrier()  # every process sees the file as the main process left it
    records = _read_stamped(path, fingerprint, cls)
    if records is not None and (redo is None or not redo(records)):
        return records
    records = compute()
    release_free_memory()  # what the stage freed goes back before the next one (allocator.py)
    if distributed.is_main():
        _write_stamped(path, fingerprint, cls, records)
    distributed.barrier()
    return records


def _read_stamped(path: Path, fingerprint: str, cls: type) -> list | None:
    stamp = path.with_name(path.name + ".fingerprint")
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == fingerprint):
        return None
    try:
        return read_records(path, cls)
    except (OSError, ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        print(f"warning: {path} cannot be read ({type(exc).__name__}); computing it again")
        return None


def _write_stamped(path: Path, fingerprint: str, cls: type, records: list) -> None:
    stamp = path.with_name(path.name + ".fingerprint")
    stamp.unlink(missing_ok=True)
    write_records(path, records, cls)
    killpoint(f"stamp:{where(path)}")
    stamp.write_text(fingerprint)


def sharded_stage(directory: Path, fingerprint: str, cls: type, items: list, shard_size: int,
                  compute: Callable[[list, int], list], stats: Callable[[], dict] | None = None) -> list:
    """`compute` over `items` shard by shard (`shard_size` items each), every shard cached as
    `directory/NNNNN.parquet` under its own fingerprint: a run killed mid-stage recomputes only the shard it
    was in. `compute(shard_items, shard_index)` must depend only on its arguments (seed by the index), so that
    a resumed stage equals an uninterrupted one row for row. `stats()`, read right after each shard is
    computed, is kept beside it as `NNNNN.stats.json`.

    With N processes the shards go in waves of N, shard i to process i mod N; after each wave the main process
    writes the wave's new shards, so a killed multi-process run also resumes at the wave it was in."""
    shards = [items[start : start + shard_size] for start in range(0, len(items), shard_size)]
    n, me = distributed.world_size(), distributed.rank()
    out: list = []
    for wave in range(0, len(shards), n):
        distributed.barrier()
        index, done = wave + me, None
        if index < len(shards):  # (index, records, stats of a shard computed now, else None)
            path, shard_fp = directory / f"{index:05d}.parquet", f"{fingerprint}:shard{index}/{shard_size}"
            records = _read_stamped(path, shard_fp, cls)
            done = (index, records, None) if records is not None else \
                (index, compute(shards[index], index), stats() if stats else {})
        for part in distributed.all_gather(done):  # in shard order: rank order within a wave
            if part is None:
                continue
            i, records, shard_stats = part
            if shard_stats is not None and distributed.is_main():
                if stats:
                    write_json(directory / f"{i:05d}.stats.json", shard_stats)
                _write_stamped(directory / f"{i:05d}.parquet", f"{fingerprint}:shard{i}/{shard_size}", cls, records)
            out.extend(records)
            killpoint(f"shard:{where(directory)}/{i}")
        release_free_memory()
        distributed.barrier()
    return out


def _pointwise_scores(candidates: list[Candidate], judgments: list[Judgment], dim: str | None,
                      ) -> dict[str, list[float]]:
    """Per prompt, the scores of its candidates that have an ok pointwise judgment."""
    by_cand = {j.candidate_ids[0]: j for j in judgments if len(j.candidate_ids) == 1 and j.status == "ok"}
    out: dict[str, list[float]] = {}
    for c in candidates:
        out.setdefault(c.prompt_id, [])
        if c.id in by_cand:
            out[c.prompt_id].append(score_of(by_cand[c.id], dim))
    return out


def dynamic_sampling(rd: Path, fingerprint: str, prompts: list[Prompt], candidates: list[Candidate],
                     judgments: list[Judgment], *, fresh_prompts: Callable[[int, int], list[Prompt]],
                     sample: Callable[[list[Prompt], int], list[Candidate]],
                     judge: Callable[[list[Prompt], list[Candidate]], list[Judgment]], max_passes: int,
                     dim: str | None = None) -> tuple[list, list, list, dict]:
    """DAPO's dynamic sampling (arXiv 2503.14476): a prompt whose candidates all tie carries no signal, so it
    is replaced by fresh prompts, sampled and judged like the others, until the round has prompts_per_round
    informative prompts or `synthesis.dynamic_sampling` extra passes were made. Each pass is cached under
    round-NN/dynamic-NNNNN-* (NNNNN: fresh prompts drawn so far). Ties are read from pointwise judgments (a
    pairwise judge has no per-candidate score: then nothing is replaced).

    `fresh_prompts(used, n)`: n prompts after the `used` already drawn; `sample(prompts, seed_offset)` and
    `judge(prompts, candidates)`: the round's own sampling and judging. Returns the informative prompts with
    their candidates and judgments, and dynamic_fill's counts."""
    if not any(len(j.candidate_ids) == 1 for j in judgments):
        return prompts, candidates, judgments, {"stop": "no_pointwise_scores"}
    extra_prompts: list[Prompt] = []
    extra_candidates: list[Candidate] = []
    extra_judgments: list[Judgment] = []
    used = [0]
    seen = {p.id for p in prompts}

    def draw(n: int) -> dict[str, list[float]]:
        fresh = [p for p in fresh_prompts(used[0], n) if p.id not in seen]
        used[0] += n
        seen.update(p.id for p in fresh)
        if not fresh:
            return {}
        fp = f"{fingerprint}:dynamic{used[0]}"
        if distributed.is_main():
            write_records(rd / f"dynamic-{used[0]:05d}-prompts.parquet", fresh, Prompt)
        cands = cached_stage(rd / f"dynamic-{used[0]:05d}-candidates.parquet", fp, Candidate,
                             lambda: sample(fresh, used[0] * 7907))
        js = cached_stage(rd / f"dynamic-{used[0]:05d}-judgments.parquet", fp, Judgment,
                          lambda: judge(fresh, cands))
        extra_prompts.extend(fresh)
        extra_candidates.extend(cands)
        extra_judgments.extend(js)
        return _pointwise_scores(cands, js, dim)

    kept, stats = dynamic_fill(_pointwise_scores(candidates, judgments, dim), len(prompts), draw,
                               max_attempts=max_passes)
    keep = set(kept)
    return ([p for p in prompts + extra_prompts if p.id in keep],
            [c for c in candidates + extra_candidates if c.prompt_id in keep],
            [j for j in judgments + extra_judgments if j.prompt_id in keep], stats)
