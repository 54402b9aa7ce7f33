"""The round's LoRA adapter pushed to the server that samples the policy (`synthesis.backend: openai`).

vLLM serves LoRA adapters next to its base model and, when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True,
loads new ones at run time: `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, after which a request
with `"model": lora_name` samples from base + adapter (`/v1/unload_lora_adapter` forgets one). The loop
pushes each round's checkpoint this way, so that generation runs on the server, scaled apart from training,
and still samples the policy being trained. The server reads the adapter from `lora_path` itself: it must
see the run directory at the same path (same machine, or a shared filesystem).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from alignpipe import AlignpipeError
from alignpipe.synthesis.http_transport import auth_headers


def adapter_name(base_model: str, path: str | Path) -> str:
    """The name an adapter directory is served under: the same in every process and every rerun."""
    where = Path(path).resolve()
    digest = hashlib.blake2b(str(where).encode(), digest_size=4).hexdigest()
    return f"{base_model}-{where.name if where.name != 'checkpoint' else where.parent.name}-{digest}"


def push_adapter(base_url: str, base_model: str, path: str | Path, api_key_env: str | None,
                 timeout: float = 300.0) -> str:
    """Load the adapter at `path` into the server at `base_url` (with its /v1); returns the name to sample it
    by. A server that refuses (no such endpoint: runtime LoRA loading not enabled; or an error) raises an
    AlignpipeError naming the server, the status and what to do."""
    path = Path(path).resolve()
    if not (path / "adapter_config.json").is_file():
        raise AlignpipeError(f"{path}: not a LoRA adapter directory (no adapter_config.json): nothing to push")
    name = adapter_name(base_model, path)
    root = base_url.rstrip("/")
    headers = auth_headers(api_key_env)
    with httpx.Client(timeout=timeout, headers=headers) as client:
        try:  # a rerun of the round pushes the same name: forget the old weights first (unknown names are fine)
            client.post(f"{root}/unload_lora_adapter", json={"lora_name": name})
            response = client.post(f"{root}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        except httpx.HTTPError as exc:
            raise AlignpipeError(f"{root}: cannot push the LoRA adapter {path} ({type(exc).__name__}: {exc})") from None
    if response.status_code in (404, 405):
        raise AlignpipeError(
            f"{root} refused the LoRA adapter (HTTP {response.status_code} on /load_lora_adapter): start vLLM with "
            f"--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or set synthesis.server_adapter: none to "
            f"sample the served model as it is (not the policy being trained)")
    if response.status_code >= 400:
        detail = " ".join(response.text.split())[:200]
        raise AlignpipeError(f"{root} refused the LoRA adapter {path}: HTTP {response.status_code}: {detail}")
    return name
