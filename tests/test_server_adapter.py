"""The round's LoRA adapter pushed to the server that samples the policy (issue 14 item 3), against a local HTTP
server that speaks vLLM's runtime LoRA endpoints: the loop samples round 0 from the base and round 1 from
round 0's adapter; a server without the endpoint fails the run with one line saying what to do."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from http_fakes import LocalServer, reply_json
from tiny import digit_prompts

from alignpipe import AlignpipeError
from alignpipe.config import Recipe
from alignpipe.loop import run
from alignpipe.synthesis.generators import build_generator
from alignpipe.synthesis.openai_generator import forget_servers
from alignpipe.synthesis.server_adapter import adapter_name, push_adapter


class LoraServer(LocalServer):
    """Chat completions (each choice's text: the model asked for and the choice index), plus vLLM's
    `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` when `lora` is true (else 404, as vLLM without
    runtime LoRA updating). A request for a model that is neither the base nor a loaded adapter gets 404."""

    def __init__(self, lora: bool = True):
        super().__init__(LoraHandler)
        self.lora, self.lock = lora, threading.Lock()
        self.loaded: dict[str, str] = {}
        self.requests: list[tuple[str, dict]] = []


class LoraHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        srv: LoraServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((self.path, body))
        if self.path.endswith("_lora_adapter"):
            if not srv.lora:
                return reply_json(self, 404, {"detail": "Not Found"})
            if self.path.endswith("/load_lora_adapter"):
                if body["lora_name"] in srv.loaded:
                    return reply_json(self, 400, {"message": "already loaded"})
                srv.loaded[body["lora_name"]] = body["lora_path"]
            else:
                srv.loaded.pop(body["lora_name"], None)
            return reply_json(self, 200, {})
        if body["model"] != "base" and body["model"] not in srv.loaded:
            return reply_json(self, 404, {"message": f"model {body['model']} does not exist"})
        choices = [{"index": i, "message": {"role": "assistant", "content": f"{i}"}, "finish_reason": "stop"}
                   for i in range(body.get("n", 1))]
        reply_json(self, 200, {"choices": choices})


@pytest.fixture()
def lora_server(threaded_servers):
    forget_servers()
    yield lambda lora=True: threaded_servers(LoraServer(lora))
    forget_servers()


def _adapter_dir(tmp_path, name="checkpoint"):
    path = tmp_path / "round-00" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_push_loads_the_adapter_and_sampling_asks_for_it(lora_server, tmp_path):
    srv = lora_server()
    gen = build_generator("openai", base_url=srv.base_url, model="base", api_key_env=None)
    path = _adapter_dir(tmp_path)
    gen.set_adapter(path)
    name = adapter_name("base", path)
    assert srv.loaded == {name: str(path.resolve())} and name.startswith("base-round-00-")
    gen.set_adapter(path)  # the same round pushed again (a rerun): unloaded, then loaded again
    assert [p for p, _ in srv.requests].count("/v1/load_lora_adapter") == 2 and list(srv.loaded) == [name]
    from alignpipe.records import Prompt

    out = gen.sample([Prompt(id="p", prompt="hi")], 2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0,
                     source={"source": "policy"})
    assert [c.completion for c in out] == ["0", "1"] and srv.requests[-1][1]["model"] == name
    other = build_generator("openai", base_url=srv.base_url, model="base", api_key_env=None)
    other.set_adapter(path, load=False)  # another process of the run: the name only, no request
    assert other.model == name and len(srv.requests) == 5


def test_server_without_runtime_lora_is_one_clear_error(lora_server, tmp_path):
    srv = lora_server(lora=False)
    with pytest.raises(AlignpipeError) as exc:
        push_adapter(srv.base_url, "base", _adapter_dir(tmp_path), None)
    message = str(exc.value)
    assert "refused the LoRA adapter (HTTP 404" in message and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message
    assert "synthesis.server_adapter: none" in message and "\n" not in message
    with pytest.raises(AlignpipeError, match="not a LoRA adapter directory"):
        push_adapter(srv.base_url, "base", tmp_path, None)


def _recipe(tmp_path, model, srv, **synthesis) -> Recipe:
    prompts = digit_prompts(tmp_path / "prompts.jsonl", 30)
    return Recipe.model_validate({
        "name": "served", "model": str(model), "rounds": 2, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.2},
        # the server answers "0" and "1": half the samples of a prompt whose answer is 0 or 1 are right
        "synthesis": {"backend": "openai", "server": f"{srv.base_url}#base", "prompts_per_round": 6,
                      "samples_per_prompt": 2, "max_new_tokens": 4, **synthesis},
        "optimization": {"objectives": [{"name": "dpo"}], "batch_size": 2, "adapter": {"r": 4, "alpha": 8},
                         "precision": "fp32"},
        "heldout": {"n": 4, "max_new_tokens": 4},
    })


def test_loop_samples_each_round_from_the_previous_rounds_adapter(lora_server, tmp_path, tiny_model_path):
    srv = lora_server()
    summary = run(_recipe(tmp_path, tiny_model_path, srv))
    assert sum(r["train"]["steps"] for r in summary["rounds"]) > 0
    round0 = (tmp_path / "runs" / "served" / "round-00" / "checkpoint").resolve()
    loads = [body for path, body in srv.requests if path.endswith("/load_lora_adapter")]
    assert [b["lora_path"] for b in loads][0] == str(round0)
    chats = [body["model"] for path, body in srv.requests if path.endswith("/chat/completions")]
    name = adapter_name("base", round0)
    assert chats[:6] == ["base"] * 6 and chats[6:12] == [name] * 6  # one request per prompt (n = 2)


def test_loop_with_a_refusing_server_stops_after_round_0_with_one_line(lora_server, tmp_path, tiny_model_path):
    srv = lora_server(lora=False)
    with pytest.raises(AlignpipeError, match="refused the LoRA adapter"):
        run(_recipe(tmp_path, tiny_model_path, srv))
    # none: the served model is sampled as it is, every round
    srv2 = lora_server(lora=False)
    run(_recipe(tmp_path, tiny_model_path, srv2, server_adapter="none").model_copy(update={"name": "as-served"}))
    assert {body["model"] for path, body in srv2.requests if path.endswith("/chat/completions")} == {"base"}
