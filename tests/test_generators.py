"""Generators (synthesis backends): the shared-prefill sampler against the repeated-prompt sampler on the tiny
Llama, chat rendering of multi-turn prompts, the openai generator against a stdlib HTTP server written here
(n honoured / ignored / refused, retries) and against the real llama.cpp server, and the load-time errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from http_fakes import LocalServer, reply_json
from tiny import perturb

import alignpipe.synthesis.transformers_backend as tb
from alignpipe import AlignpipeError
from alignpipe.records import Prompt
from alignpipe.synthesis.generators import (
    Generator,
    build_generator,
    check_backend_available,
    drop_failed,
)
from alignpipe.synthesis.openai_generator import derive_seed, forget_servers
from alignpipe.synthesis.transformers_backend import generate

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hi", "What is 12 + 34?", "a much longer question about the numbers 1, 2 and 3", "ok?"]
PROMPTS = [Prompt(id=f"p{i}", prompt=t) for i, t in enumerate(TEXTS)]
SRC = {"source": "policy", "round": 2}


@pytest.fixture(scope="module")
def noisy(tiny_model_path):
    """The tiny model with large random weights: its greedy continuations differ from prompt to prompt (the
    plain tiny model greedily writes newlines whatever the prompt)."""
    from alignpipe.models import load_policy

    model = load_policy(tiny_model_path)
    perturb(model, seed=0, scale=1.0)
    return model.eval()


def completions(cands):
    return [(c.id, c.completion, c.num_tokens, c.truncated) for c in cands]


# ---------------------------------------------------------------- shared prefill


def test_shared_prefill_equals_repeated_prompts_under_greedy(noisy, tok):
    lengths = {len(tok(tb.render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 4  # four widths: every batch is left-padded
    for batch_size in (64, 5):  # 5 rows: a prompt's samples are split across batches
        plain = generate(noisy, tok, PROMPTS, 3, 0.0, 1.0, 10, batch_size, 0, shared_prefill=False)
        shared = generate(noisy, tok, PROMPTS, 3, 0.0, 1.0, 10, batch_size, 0, shared_prefill=True)
        assert completions(shared) == completions(plain)
    assert [c.id for c in shared] == [f"p{i}/{j}" for i in range(4) for j in range(3)]
    assert len({c.completion for c in shared}) == 4 and all(c.completion.strip() for c in shared)
    # and each prompt decoded alone, without padding, gives the same tokens
    alone = [generate(noisy, tok, [p], 1, 0.0, 1.0, 10, 1, 0)[0].completion for p in PROMPTS]
    assert [c.completion for c in shared[::3]] == alone


def test_shared_prefill_runs_each_prompt_once(noisy, tok):
    width = max(len(tok(tb.render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    shapes: list[tuple[int, int]] = []
    hook = noisy.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        generate(noisy, tok, PROMPTS, 3, 0.0, 1.0, 4, 64, 0, shared_prefill=False)
        plain, shapes[:] = list(shapes), []
        generate(noisy, tok, PROMPTS, 3, 0.0, 1.0, 4, 64, 0, shared_prefill=True)
    finally:
        hook.remove()
    assert plain == [(12, width)] + [(12, 1)] * 3  # every row runs the whole prompt
    assert shapes == [(4, width - 1)] + [(12, 1)] * 4  # 4 prompts once, then one token per row and step


def test_adapters_lora_shares_the_prefill_and_prefix_tuning_falls_back(tiny_model_path, tok):
    from tiny import lora

    from alignpipe.config import AdapterConfig
    from alignpipe.models import attach_adapter, load_policy
    from alignpipe.synthesis.shared_prefill import supports_shared_prefill

    policy = lora(tiny_model_path)
    perturb(policy, seed=1, scale=1.0)  # LoRA weights away from zero: the adapter changes the outputs
    assert supports_shared_prefill(policy)
    plain = generate(policy, tok, PROMPTS, 2, 0.0, 1.0, 6, 64, 0, shared_prefill=False)
    assert completions(generate(policy, tok, PROMPTS, 2, 0.0, 1.0, 6, 64, 0)) == completions(plain)
    with policy.disable_adapter():
        assert completions(generate(policy, tok, PROMPTS, 2, 0.0, 1.0, 6, 64, 0)) != completions(plain)
    prefix = attach_adapter(load_policy(tiny_model_path), AdapterConfig(method="prefix_tuning", num_virtual_tokens=3))
    assert not supports_shared_prefill(prefix)  # it brings its own KV cache: the repeated-prompt path is used
    assert len(generate(prefix, tok, PROMPTS[:2], 2, 1.0, 1.0, 3, 64, 0)) == 4


def test_sampling_is_seeded_and_path_independent(noisy, tok):
    def run(seed, shared=True):
        return [c.completion for c in generate(noisy, tok, PROMPTS, 3, 1.0, 0.9, 8, 64, seed, shared_prefill=shared)]

    first = run(3)
    assert run(3) == first
    assert run(4) != first
    assert len(set(first[:3])) > 1  # a prompt's samples differ from each other
    assert run(3, shared=False) == first  # the prefill draws no random numbers


def test_multi_turn_prompts_render_their_turns(noisy, tok, monkeypatch):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    prompt = Prompt(id="m", prompt="and 3+3?", meta={"messages": messages})
    expected = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tb.render_prompt(tok, prompt) == expected
    assert tb.render_prompt(tok, PROMPTS[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    seen: list[list[str]] = []
    real_batch, real_shared = tb.generate_batch, tb.generate_shared
    monkeypatch.setattr(tb, "generate_batch", lambda m, t, texts, *a: seen.append(texts) or real_batch(m, t, texts, *a))
    monkeypatch.setattr(tb, "generate_shared",
                        lambda m, t, texts, *a: seen.append(texts) or real_shared(m, t, texts, *a))
    generate(noisy, tok, [prompt], 1, 0.0, 1.0, 4, 8, 0)
    generate(noisy, tok, [prompt], 2, 0.0, 1.0, 4, 8, 0)
    assert seen == [[expected], [expected]]


def test_transformers_generator_records_source(tiny_model_path, tok):
    gen = build_generator("transformers", model=str(tiny_model_path), id_prefix="t", batch_size=4)
    assert isinstance(gen, Generator) and gen.name == "transformers"
    out = gen.sample(PROMPTS[:2], 2, temperature=0.7, top_p=0.9, max_new_tokens=3, seed=1, source=SRC)
    assert [c.id for c in out] == ["p0/t0", "p0/t1", "p1/t0", "p1/t1"]
    assert out[0].source == {"source": "policy", "round": 2, "backend": "transformers",
                             "model": str(tiny_model_path.resolve()), "temperature": 0.7, "top_p": 0.9}
    assert all(c.num_tokens is not None and 1 <= c.num_tokens <= 3 for c in out)
    with pytest.raises(ValueError, match="source"):
        gen.sample(PROMPTS[:1], 1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0, source={"round": 1})
    with pytest.raises(AlignpipeError, match="does not exist"):
        build_generator("transformers", model=str(tiny_model_path / "missing"))


# ---------------------------------------------------------------- errors at load time


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(AlignpipeError, match=r"unknown synthesis.backend 'tgi'; known backends: openai, transformers, vllm"):
        build_generator("tgi")
    assert "unknown synthesis backend 'tgi'" in check_backend_available("tgi")
    assert check_backend_available("transformers") is None and check_backend_available("openai") is None
    assert check_backend_available("offline") is None  # config's older spelling of source offline: no generator


def test_vllm_without_vllm_or_gpu_is_a_clear_error(tiny_model_path):
    reason = check_backend_available("vllm")
    if reason is None:
        pytest.skip("vllm and a CUDA GPU are both present here")
    assert "vllm package is not installed" in reason or "no CUDA GPU" in reason
    with pytest.raises(AlignpipeError, match=r"^synthesis.backend 'vllm' needs the vllm package and a CUDA GPU: ") as exc:
        build_generator("vllm", model=str(tiny_model_path))
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- openai: a local stdlib server


class ChatServer(LocalServer):
    """`POST /v1/chat/completions`. `mode`: "n" honours n; "ignore" always answers one choice; "refuse"
    answers 400 to a request with n > 1. `plan`: statuses for the first requests that reach it (then 200).
    Each choice's text names the request's seed and the choice index."""

    def __init__(self, mode: str, plan=()):
        super().__init__(ChatHandler)
        self.mode, self.plan, self.lock, self.bodies = mode, list(plan), threading.Lock(), []


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        srv: ChatServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body.get("n", 1)
        with srv.lock:
            srv.bodies.append(body)
            status = srv.plan.pop(0) if srv.plan else 200
        if srv.mode == "refuse" and n > 1:
            status = 400
        count = n if srv.mode == "n" else 1
        choices = [{"index": i, "message": {"role": "assistant", "content": f"{body['seed']}/{i}"},
                    "finish_reason": "length" if i == 0 else "stop"} for i in range(count)]
        payload = {"choices": choices, "usage": {"completion_tokens": 5 * count}} if status == 200 else {"error": "no"}
        reply_json(self, status, payload)


@pytest.fixture()
def chat_server(threaded_servers):
    def start(mode, plan=()):
        forget_servers()
        return threaded_servers(ChatServer(mode, plan))

    yield start
    forget_servers()


def openai_gen(srv, **kw):
    return build_generator("openai", base_url=srv.base_url, model="m", api_key_env=None, backoff=0.01, **kw)


def sample(gen, prompts, k, seed=5):
    return gen.sample(prompts, k, temperature=0.8, top_p=0.95, max_new_tokens=7, seed=seed, source=SRC)


def test_openai_asks_for_n_samples_in_one_request(chat_server):
    srv = chat_server("n")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}]
    prompts = [PROMPTS[1], Prompt(id="m", prompt="and 3+3?", meta={"messages": messages})]
    gen = openai_gen(srv)
    out = sample(gen, prompts, 3)
    assert len(srv.bodies) == 2 and gen.stats.requests == 2 and gen.stats.n_fallbacks == 0
    by_prompt = {b["messages"][-1]["content"]: b for b in srv.bodies}
    assert by_prompt["and 3+3?"]["messages"] == messages  # the turns are sent as turns
    body = by_prompt["What is 12 + 34?"]
    assert {k: body[k] for k in ("model", "n", "max_tokens", "temperature", "top_p")} == {
        "model": "m", "n": 3, "max_tokens": 7, "temperature": 0.8, "top_p": 0.95}
    seed_p1, seed_m = derive_seed(5, "p1", 0), derive_seed(5, "m", 0)
    assert body["seed"] == seed_p1
    assert [(c.id, c.completion, c.truncated, c.num_tokens) for c in out] == [
        ("p1/0", f"{seed_p1}/0", True, None), ("p1/1", f"{seed_p1}/1", False, None),
        ("p1/2", f"{seed_p1}/2", False, None),
        ("m/0", f"{seed_m}/0", True, None), ("m/1", f"{seed_m}/1", False, None), ("m/2", f"{seed_m}/2", False, None)]
    assert out[0].source == {"source": "policy", "round": 2, "backend": "openai", "model": "m", "temperature": 0.8,
                             "top_p": 0.95}


def test_openai_falls_back_to_single_requests_and_retries(chat_server):
    # one choice for n=3; the two single requests then meet a 500 and a 503 before succeeding
    srv = chat_server("ignore", plan=[200, 500, 503])
    gen = openai_gen(srv, concurrency=1)
    out = sample(gen, [PROMPTS[0]], 3)
    assert [b.get("n") for b in srv.bodies] == [3, None, None, None, None]
    assert gen.stats.retries == 2 and gen.stats.requests == 5 and gen.stats.n_fallbacks == 1
    assert gen.stats.failed == 0
    seeds = [derive_seed(5, "p0", j) for j in range(3)]  # the n request carries sample 0's seed
    assert [c.completion for c in out] == [f"{s}/0" for s in seeds]
    assert [c.num_tokens for c in out] == [5, 5, 5]  # one choice per answer: usage is that choice's
    # remembered: the next call sends single requests only
    sample(gen, [PROMPTS[1]], 2)
    assert [b.get("n") for b in srv.bodies[5:]] == [None, None] and gen.stats.requests == 7


def test_openai_n_refused_then_singles(chat_server):
    srv = chat_server("refuse")
    gen = openai_gen(srv, concurrency=1)
    out = sample(gen, [PROMPTS[0]], 2)
    assert [b.get("n") for b in srv.bodies] == [2, None, None] and gen.stats.retries == 0
    assert [c.completion for c in out] == [f"{derive_seed(5, 'p0', j)}/0" for j in (0, 1)]
    assert drop_failed(out) == (out, 0)


def test_openai_failed_samples_are_marked_not_raised(chat_server):
    srv = chat_server("n", plan=[500] * 2)
    gen = openai_gen(srv, max_retries=1)
    out = sample(gen, [PROMPTS[0]], 2)
    assert [(c.id, c.completion, c.num_tokens, c.truncated) for c in out] == [("p0/0", "", 0, False),
                                                                              ("p0/1", "", 0, False)]
    assert all("HTTP 500" in c.source["error"] and "2 attempt" in c.source["error"] for c in out)
    assert gen.stats.failed == 2 and len(srv.bodies) == 2  # not k single requests against a failing server
    assert drop_failed(out) == ([], 2)
    # the server recovers: the same generator samples again
    assert [c.completion for c in sample(gen, [PROMPTS[0]], 2)] == [f"{derive_seed(5, 'p0', 0)}/{j}" for j in (0, 1)]


# ---------------------------------------------------------------- openai: the real llama.cpp server


def test_openai_generator_against_llama_cpp(llama_server):
    forget_servers()
    gen = build_generator("openai", base_url=llama_server, model="smollm2-135m-instruct", api_key_env=None,
                          concurrency=2, timeout=120)
    prompts = [Prompt(id="a", prompt="What is 2 + 3?"), Prompt(id="b", prompt="Name a colour.")]
    out = gen.sample(prompts, 2, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=1,
                     source={"source": "teacher"}, description="llama.cpp")
    assert [c.id for c in out] == ["a/0", "a/1", "b/0", "b/1"]
    assert gen.stats.failed == 0 and drop_failed(out) == (out, 0)
    assert all(c.completion.strip() for c in out)  # real model text came back
    assert all(c.source == {"source": "teacher", "backend": "openai", "model": "smollm2-135m-instruct",
                            "temperature": 0.8, "top_p": 0.95} for c in out)
    assert all(c.num_tokens is None or 1 <= c.num_tokens <= 8 for c in out)
    # llama-cpp-python answers one choice whatever n is; a server that honours n needs one request per prompt
    assert (gen.stats.requests, gen.stats.n_fallbacks) in {(2, 0), (4, 2)}
    # a server promises no determinism: llama.cpp's output depends on what it cached from earlier requests,
    # even greedy; a greedy request still gives one real answer per prompt
    greedy = gen.sample(prompts, 1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=1, source={"source": "teacher"})
    assert [c.id for c in greedy] == ["a/0", "b/0"] and all(c.source["temperature"] == 0.0 for c in greedy)
    assert all(c.completion.strip() for c in greedy)
