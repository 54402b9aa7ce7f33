"""Servers that fail (issue 12 item 2): a fault-injecting proxy in front of the real llama.cpp server, and that
server killed mid-batch and restarted. Every row that goes in comes out once, a failed row is an `error` naming
its fault after a bounded number of attempts, and a rerun with the same judgment store asks again only the rows
that were not `ok` (the proxy counts the requests)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pandas as pd
import pytest
from fault_proxy import FAULTS, FaultPlan, FaultProxy, LlamaProcess, free_port, row_key, row_text

from alignpipe.evaluation.judgment_cache import CachedJudge, JudgmentStore
from alignpipe.evaluation.llm_judge import PointwiseLLMJudge
from alignpipe.records import Candidate, Judgment, Prompt, read_records
from alignpipe.synthesis import openai_generator
from alignpipe.synthesis.backends import BackendError, OpenAIBackend
from alignpipe.synthesis.openai_generator import OpenAIGenerator, derive_seed, forget_servers

MODEL = "smollm2-135m-instruct"
# The 135M model rarely writes a verdict line on its own ("The response is 3."): the server is asked to decode
# under a grammar (llama.cpp's `grammar` request field), so a clean row is a real, parseable verdict of the
# model and a rerun that asks only the failed rows is told apart from one that asks everything.
SCORE_GRAMMAR = 'root ::= "Score: " [1-9]'
VERDICT_GRAMMAR = 'root ::= "Verdict: " ("A" | "B" | "tie")'
RETRIES = 2  # every test client: 1 + 2 attempts per row
# the reason a row gets once every attempt met the fault (the proxy answers 500/429/hang itself, the others
# spoil the real server's answer)
REASONS = {"500": "HTTP 500 after 3 attempts", "429": "HTTP 429 after 3 attempts",
           "truncate": "truncated response body after 3 attempts", "malformed": "malformed JSON body after 3 attempts",
           "no_choices": "response without choices after 3 attempts"}


def backend(url: str, **kw) -> OpenAIBackend:
    # Retry-After is honoured up to max_backoff: the proxy's 429 asks for 30 s, the client waits 0.4 s at most
    options = {"api_key_env": None, "concurrency": 4, "timeout": 60.0, "max_retries": RETRIES, "backoff": 0.2,
               "max_backoff": 0.4, "extra_body": {"grammar": SCORE_GRAMMAR}, **kw}
    return OpenAIBackend(url, MODEL, **options)


def judge(url: str, **kw) -> PointwiseLLMJudge:
    # one request per row: no parse re-asks, a few tokens (CPU generation on two shared cores is slow)
    return PointwiseLLMJudge(backend(url, **kw), max_new_tokens=6, parse_retries=0, brief=True)


def items(n: int) -> list[tuple[Prompt, Candidate]]:
    prompt = Prompt(id="p", prompt="What is 2 + 3?")
    return [(prompt, Candidate("p", f"c{i}", f"answer-{i}: it is {i + 3}.")) for i in range(n)]


def waits(caplog: pytest.LogCaptureFixture) -> dict[str, list[float]]:
    """The backoff the client chose before each retry, per failure kind (from its log, not from a clock)."""
    out: dict[str, list[float]] = {}
    for rec in caplog.records:
        m = re.match(r"chat completion attempt \d+ failed \((.+?)\); retrying in ([\d.]+)s", rec.getMessage())
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


def by_marker(faults: dict[int, str | None]):
    """A plan's `rows`: the row whose text holds `answer-N` gets `faults[N]`."""
    return lambda body: next((f for i, f in faults.items() if f"answer-{i}:" in row_text(body)), None)


def test_judge_rows_survive_every_fault_and_a_rerun_asks_only_the_failed(llama_server, tmp_path, caplog):
    """(a) each fault on its own row of a pointwise judge, every attempt spoiled; (b) the same judgment store
    afterwards, the proxy healed: only the rows that were not ok are asked again, and they come back."""
    kinds = [k for k in FAULTS if k != "hang"]  # a hang needs a short client timeout: its own test below
    faults: dict[int, str | None] = {i: k for i, k in enumerate(kinds)}
    faults.update({len(kinds): None, len(kinds) + 1: None})  # two rows the proxy leaves alone
    rows = items(len(faults))
    store = JudgmentStore(tmp_path / "judge-cache")
    plan = FaultPlan(rows=by_marker(faults), retry_after="30")
    with FaultProxy(llama_server, plan) as proxy:
        cached = CachedJudge(judge(proxy.base_url), store)
        with caplog.at_level(logging.INFO, logger="alignpipe.synthesis.backends"):
            first = cached.score(rows)
        assert [j.candidate_ids for j in first] == [[c.id] for _, c in rows]  # rows in = rows out, in order
        for i, j in enumerate(first):
            if faults[i] is None:
                assert j.status == "ok" and 1 <= j.scores["score"] <= 9, j.reason  # the real model's verdict
            else:
                assert j.status == "error" and REASONS[faults[i]] in j.reason, (faults[i], j.reason)
        # bounded: each spoiled row was asked exactly 1 + RETRIES times, each clean row once
        counts = sorted(proxy.attempts.values())
        assert counts == [1, 1] + [1 + RETRIES] * len(kinds)
        assert proxy.faults == {k: 1 + RETRIES for k in kinds}
        assert cached.backend.stats.retries == RETRIES * len(kinds) and cached.backend.stats.failed == len(kinds)
        assert proxy.chat_requests() == sum(counts)
        # exponential backoff 0.2 s, 0.4 s; the 429's Retry-After of 30 s is honoured only up to max_backoff
        assert waits(caplog)["HTTP 500"] == [0.2, 0.4] and waits(caplog)["HTTP 429"] == [0.4, 0.4]
        first_requests, first_faults = proxy.chat_requests(), dict(proxy.faults)

        # (b) the rerun: same store, nothing spoiled any more
        proxy.plan = FaultPlan()
        proxy.reset_counts()
        not_ok = [i for i, j in enumerate(first) if j.status != "ok"]
        assert len(not_ok) == len(kinds)
        again = CachedJudge(judge(proxy.base_url), JudgmentStore(tmp_path / "judge-cache")).score(rows)
        assert proxy.chat_requests() == len(not_ok)  # only the rows that were not ok were asked
        assert sorted(proxy.attempts.values()) == [1] * len(not_ok)
        assert [j.candidate_ids for j in again] == [j.candidate_ids for j in first]
        assert all(j.status == "ok" for j in again)
        for i, j in enumerate(first):
            if j.status == "ok":
                assert again[i].scores == j.scores  # answered from the store
        # the store on disk: one line per ok judgment of either run, none twice
        lines = [json.loads(line) for f in (tmp_path / "judge-cache").glob("*.jsonl")
                 for line in f.read_text().splitlines()]
        assert len(lines) == len({row["key"] for row in lines}) == sum(j.status == "ok" for j in again)
    print(f"\njudge faults: {len(rows)} rows, {first_requests} requests, faults {first_faults}, "
          f"{len(kinds)} errors; rerun asked {len(not_ok)}")


def test_hanging_server_is_a_timeout_per_attempt():
    """A server that never answers: each attempt times out at the client's deadline; the rows are errors."""
    plan = FaultPlan(rows=lambda body: "hang", hang_s=10.0)
    with FaultProxy("http://127.0.0.1:9/v1", plan) as proxy:  # nothing upstream is ever reached
        start = time.monotonic()
        out = judge(proxy.base_url, timeout=0.5).score(items(2))
        assert time.monotonic() - start < 8.0  # hang guard: far below the proxy's 10 s hang
        assert [j.status for j in out] == ["error", "error"]
        assert all("timeout (0.5s) after 3 attempts" in j.reason for j in out)
        assert sorted(proxy.attempts.values()) == [3, 3] and proxy.faults == {"hang": 6}
        assert proxy.forwarded == 0


def test_one_unsendable_row_does_not_fail_its_batch(llama_server):
    """A conversation the client cannot even encode is that row's error; the other row is answered."""
    with FaultProxy(llama_server) as proxy:
        client = backend(proxy.base_url)
        good = [{"role": "user", "content": "Say hi."}]
        bad = [{"role": "user", "content": {"not", "json"}}]  # a set: not JSON-serialisable
        out = client.complete([good, bad], max_new_tokens=4)
        assert isinstance(out[1], BackendError) and "client error: TypeError" in out[1]
        assert not isinstance(out[0], BackendError) and out[0].strip()
        assert proxy.chat_requests() == 1


# ---------------------------------------------------------------- the openai sampling generator


def generator(url: str, **kw) -> OpenAIGenerator:
    forget_servers()
    options = {"api_key_env": None, "concurrency": 4, "timeout": 60.0, "max_retries": RETRIES, "backoff": 0.2,
               "max_backoff": 0.4, "use_n": False, **kw}
    return OpenAIGenerator(url, MODEL, **options)


def sample(gen: OpenAIGenerator, prompts: list[Prompt], k: int) -> list[Candidate]:
    return gen.sample(prompts, k, temperature=0.8, top_p=0.95, max_new_tokens=4, seed=7,
                      source={"source": "policy"}, description="fault test")


PROMPTS = [Prompt(id=f"q{i}", prompt=f"Name a colour number {i}.") for i in range(3)]


def test_generator_samples_survive_every_fault(llama_server):
    """3 prompts x k=2 = 6 samples; five carry one fault each on every attempt, one is clean."""
    kinds = [k for k in FAULTS if k != "hang"]
    seeds = {derive_seed(7, p.id, j): (p.id, j) for p in PROMPTS for j in range(2)}
    fault_of = dict(zip(sorted(seeds), [*kinds, None], strict=True))  # sample seed -> fault
    plan = FaultPlan(rows=lambda body: fault_of.get(body.get("seed")), retry_after="30")
    with FaultProxy(llama_server, plan) as proxy:
        gen = generator(proxy.base_url)
        out = sample(gen, PROMPTS, 2)
        ids = [c.id for c in out]
        assert ids == [f"{p.id}/{j}" for p in PROMPTS for j in range(2)] and len(set(ids)) == 6
        for seed, fault in fault_of.items():
            pid, j = seeds[seed]
            cand = out[ids.index(f"{pid}/{j}")]
            if fault is None:
                assert "error" not in cand.source and cand.completion.strip()  # the real model's text
            else:
                assert cand.completion == "" and REASONS[fault] in cand.source["error"], (fault, cand.source)
        assert sorted(proxy.attempts.values()) == [1] + [1 + RETRIES] * len(kinds)
        assert proxy.faults == {k: 1 + RETRIES for k in kinds}
        assert gen.stats.failed == len(kinds) and gen.stats.requests == proxy.chat_requests() == 1 + 3 * len(kinds)
    print(f"\ngenerator faults: 6 samples, {proxy.chat_requests()} requests, faults {dict(proxy.faults)}, "
          f"{gen.stats.failed} errors")


def test_generator_transient_faults_are_retried_to_success(llama_server, caplog):
    """Rows picked by a seeded rate meet a 500 or a 429 on their first attempt only: all come back."""
    plan = FaultPlan(rate=0.5, kinds=("500", "429"), times=1, seed=3, retry_after="0.3")
    with FaultProxy(llama_server, plan) as proxy:
        gen = generator(proxy.base_url)
        with caplog.at_level(logging.INFO, logger="alignpipe.synthesis.backends"):
            out = sample(gen, PROMPTS, 2)
        assert [c.id for c in out] == [f"{p.id}/{j}" for p in PROMPTS for j in range(2)]
        assert all("error" not in c.source for c in out)
        spoiled = sum(proxy.faults.values())
        assert spoiled >= 1  # seed 3 picks some rows (the draw is per row, not per arrival order)
        assert sorted(proxy.attempts.values()) == [1] * (6 - spoiled) + [2] * spoiled
        assert gen.stats.retries == spoiled and gen.stats.failed == 0 and proxy.forwarded == 6
        # a Retry-After longer than the backoff (0.3 s > 0.2 s) and under the cap is waited for
        assert waits(caplog) == {"HTTP 500": [0.2] * proxy.faults["500"], "HTTP 429": [0.3] * proxy.faults["429"]}
    print(f"\ntransient: 6 samples, {proxy.chat_requests()} requests, faults {dict(proxy.faults)}, 0 errors")


def test_faults_by_request_index_are_retried_through(llama_server):
    """A plan by arrival index, one request at a time (a row holds its slot through its retries): the first
    row asked meets a 500, then a malformed body (the real answer garbled), then gets through on its third
    attempt; the second row is not touched."""
    with FaultProxy(llama_server, FaultPlan(at={0: "500", 1: "malformed"})) as proxy:
        gen = generator(proxy.base_url, concurrency=1)
        out = sample(gen, PROMPTS[:2], 1)
        assert [c.id for c in out] == ["q0/0", "q1/0"] and all("error" not in c.source for c in out)
        assert proxy.faults == {"500": 1, "malformed": 1} and proxy.chat_requests() == 4
        assert sorted(proxy.attempts.values()) == [1, 3] and proxy.forwarded == 3  # the 500 never reached it
        assert gen.stats.retries == 2 and gen.stats.failed == 0


def test_n_request_with_a_garbled_answer_is_a_failure_not_a_server_without_n(llama_server):
    """A 200 without `choices` to an n=2 request is the server failing, not evidence that it ignores n: the
    prompt's samples are errors and the server is not remembered as single-request only."""
    plan = FaultPlan(rows=lambda body: "no_choices" if body.get("n") else None)
    with FaultProxy(llama_server, plan) as proxy:
        gen = generator(proxy.base_url, use_n=True)
        out = sample(gen, PROMPTS[:1], 2)
        assert [c.id for c in out] == ["q0/0", "q0/1"]
        assert all(REASONS["no_choices"] in c.source["error"] for c in out)
        assert gen.url not in openai_generator._SINGLE_ONLY and gen.stats.n_fallbacks == 0
        assert proxy.chat_requests() == 1 + RETRIES and proxy.faults == {"no_choices": 1 + RETRIES}
    forget_servers()


# ---------------------------------------------------------------- the real server killed and restarted


@pytest.fixture()
def own_llama(tmp_path):
    """A llama.cpp server of this test's own (the session's `llama_server` must not be killed)."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from alignpipe import AlignpipeError
    from alignpipe.models import embedded_gguf

    try:
        gguf = embedded_gguf()
    except AlignpipeError as exc:
        pytest.skip(f"embedded GGUF unavailable: {exc}")
    server = LlamaProcess(gguf, free_port(), tmp_path / "llama.log", alias=MODEL)
    server.start()
    yield server
    server.stop()


def test_server_killed_mid_batch_then_restarted(own_llama, tmp_path):
    """(c) One request at a time; the server is SIGKILLed as the second row is sent. That row and the rest are
    errors after bounded retries, the batch finishes, every row is there once. Restarted on the same port,
    a rerun with the judgment store asks only the failed rows, and they come back."""
    rows = items(4)
    client = backend(own_llama.base_url, concurrency=1)
    cached = CachedJudge(PointwiseLLMJudge(client, max_new_tokens=6, parse_retries=0, brief=True),
                         JudgmentStore(tmp_path / "judge-cache"))
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while client.stats.requests < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        own_llama.kill()
        killed.set()

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    first = cached.score(rows)
    watcher.join(timeout=5)
    assert killed.is_set()
    assert [j.candidate_ids for j in first] == [[c.id] for _, c in rows]
    assert [j.status for j in first] == ["ok", "error", "error", "error"]
    for j in first[1:]:
        assert "after 3 attempts" in j.reason and ("connection error" in j.reason or "truncated" in j.reason), j.reason
    assert client.stats.requests == 1 + 3 * (1 + RETRIES)  # one answered row, three rows of bounded retries
    # the sampling generator during the outage: every sample an error after its bounded attempts, none lost
    gen = generator(own_llama.base_url)
    down = sample(gen, PROMPTS[:2], 2)
    assert [c.id for c in down] == ["q0/0", "q0/1", "q1/0", "q1/1"]
    assert all(c.completion == "" and "connection error" in c.source["error"] and "after 3 attempts" in
               c.source["error"] for c in down)
    assert gen.stats.requests == 4 * (1 + RETRIES) and gen.stats.failed == 4

    own_llama.start()  # the same port
    rerun = PointwiseLLMJudge(backend(own_llama.base_url, concurrency=1), max_new_tokens=6, parse_retries=0,
                              brief=True)
    not_ok = [i for i, j in enumerate(first) if j.status != "ok"]
    again = CachedJudge(rerun, JudgmentStore(tmp_path / "judge-cache")).score(rows)
    assert rerun.backend.stats.requests == len(not_ok) == 3  # only the rows that were not ok
    assert [j.candidate_ids for j in again] == [j.candidate_ids for j in first]
    assert [j.status for j in again] == ["ok"] * 4 and again[0].scores == first[0].scores
    print(f"\nkilled mid-batch: 4 rows, {client.stats.requests} requests, "
          f"{sum(j.status == 'error' for j in first)} errors; rerun asked {len(not_ok)}")


# ---------------------------------------------------------------- a loop round with a judge behind the proxy


def loop_recipe(tmp_path, model, judge_url: str):
    """A one-round loop on chat prompts: 2 prompts x 2 samples of the tiny policy, judged pairwise by the server."""
    from alignpipe.config import Recipe

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": p, "task": "chat"}) + "\n" for p in
                            ["Say hello.", "Name a colour.", "Give me a fruit.", "Name an animal.", "Say goodbye.",
                             "Name a city.", "Give me a word.", "Tell me a number."]))
    return Recipe.model_validate({
        "name": "judged", "model": str(model), "rounds": 1, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(chat), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 2, "samples_per_prompt": 2, "max_new_tokens": 5, "temperature": 1.0},
        "evaluation": {"judge": f"pairwise:{judge_url}#{MODEL}", "verdict": "generate", "max_new_tokens": 6},
        "optimization": {"objectives": [{"name": "dpo"}], "batch_size": 2, "adapter": {"r": 4, "alpha": 8},
                         "max_length": 64},
        "heldout": {"n": 2, "max_new_tokens": 5, "judge": "longer"},
    })


@pytest.mark.usefixtures("one_thread")
def test_loop_round_with_failing_judge_server_and_rerun(llama_server, tiny_model_path, tmp_path, monkeypatch):
    """(d) A one-round loop judged pairwise (both orders) through the proxy, which fails the first two rows it
    sees on every attempt (a 500 and a 429). The round completes with those rows counted as errors in its
    judge statistics; with the round's judgments deleted (killed after judging started), the same command
    asks the server again only for the comparisons that were not ok."""
    from alignpipe.loop import run
    from alignpipe.synthesis import backends

    class VerdictGrammar(OpenAIBackend):
        """The registry's server backend, decoding verdicts under the grammar (a recipe has no key for it)."""

        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **{"extra_body": {"grammar": VERDICT_GRAMMAR}, **kw})

    monkeypatch.setattr(backends, "OpenAIBackend", VerdictGrammar)
    picked: dict[str, str] = {}
    lock = threading.Lock()

    def first_two(body: dict) -> str | None:
        with lock:
            key = row_key(body)
            if key not in picked and len(picked) < 2:
                picked[key] = ("500", "429")[len(picked)]
            return picked.get(key)

    with FaultProxy(llama_server, FaultPlan(rows=first_two, retry_after="0")) as proxy:
        recipe = loop_recipe(tmp_path, tiny_model_path, proxy.base_url)
        summary = run(recipe)
        round_dir = tmp_path / "runs" / "judged" / "round-00"
        js = read_records(round_dir / "judgments.parquet", Judgment)
        raw = [j for j in js if len(j.candidate_ids) == 2]
        single = [j for j in js if len(j.candidate_ids) == 1]
        assert len(single) == 4 and len(raw) == 4  # 2 prompts x 1 pair x both orders; no row lost or doubled
        assert len({tuple(j.candidate_ids) for j in raw}) == 4
        errors = [j for j in raw if j.status == "error"]
        assert [j.status for j in raw].count("ok") == 2  # the two rows the proxy let through
        assert sorted(j.reason.split(" after ")[0].split(": ")[-1] for j in errors) == ["HTTP 429", "HTTP 500"]
        assert all("after 4 attempts" in j.reason for j in errors)  # the loop's judge: 3 retries by default
        metrics = summary["rounds"][0]
        assert metrics["judge"]["pairwise"]["comparisons"] == 4
        assert metrics["judge"]["pairwise"]["error_rate"] == pytest.approx(2 / 4)
        assert sorted(proxy.attempts[k] for k in picked) == [4, 4] and proxy.faults == {"500": 4, "429": 4}
        not_ok = [j for j in raw if j.status != "ok"]
        first_requests, first_faults = proxy.chat_requests(), dict(proxy.faults)

        # killed after judging started: the round's judgments and everything after them are gone
        for name in ("judgments.parquet", "judgments.parquet.fingerprint", "metrics.json", "checkpoint.fingerprint"):
            (round_dir / name).unlink(missing_ok=True)
        proxy.plan = FaultPlan()
        proxy.reset_counts()
        again = run(recipe)
        # only the comparisons that were not ok are asked, once each
        assert set(proxy.attempts) == set(picked) and proxy.chat_requests() == len(not_ok) == 2
        js2 = read_records(round_dir / "judgments.parquet", Judgment)
        raw2 = [j for j in js2 if len(j.candidate_ids) == 2]
        assert sorted(tuple(j.candidate_ids) for j in raw2) == sorted(tuple(j.candidate_ids) for j in raw)
        assert all(j.status == "ok" for j in raw2)
        assert again["rounds"][0]["judge"]["pairwise"]["error_rate"] == 0.0
        assert again["rounds"][0]["judgments_not_ok"] == {}
        table = pd.DataFrame([vars(j) for j in js2])
        assert len(table) == 8 and table.candidate_ids.map(tuple).is_unique
        print(f"\nloop: {len(raw)} comparisons, {first_requests} requests, faults {first_faults}, "
              f"{len(errors)} errors ({json.dumps(metrics['judge']['pairwise'])}); rerun asked "
              f"{len(proxy.attempts)} rows in {proxy.chat_requests()} requests")
