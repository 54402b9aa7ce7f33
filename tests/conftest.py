"""Shared fixtures: a tiny random Llama built in code (2 layers, width 64) for fast unit tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignpipe.models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    path = SHARED / "data" / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip("shared/data/gsm8k is not beside the repository")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny model's matmuls are microseconds; on a few shared cores intra-op threads
    spin-wait for each other and make every step ~100x slower. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    """The tiny model's tokenizer."""
    from alignpipe.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(autouse=True)
def fp32_unless_asked(request, monkeypatch):
    """`precision: auto` means bf16 autocast on a CPU with AVX512-BF16/AMX, and fp32 elsewhere. The tests compare
    log-probs, losses and gradients with plain fp32/float64 references at tight tolerances, so they run `auto`
    as fp32 on every machine; the bf16 paths are tested where a test asks for `bf16` explicitly, and the
    detection itself in test_precision.py."""
    if request.module.__name__.endswith("test_precision"):
        return
    from alignpipe import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


@pytest.fixture()
def threaded_servers():
    """`start(server)` serves a socketserver-style HTTP server on a daemon thread until the test ends."""
    servers = []

    def start(srv):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- llama.cpp server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on the embedded GGUF, started once per test session."""
    from alignpipe.synthesis.backends import wait_until_ready

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python lacks its [server] extra")
    from alignpipe import AlignpipeError
    from alignpipe.models import embedded_gguf

    try:
        gguf = embedded_gguf()
    except AlignpipeError as exc:
        pytest.skip(f"embedded GGUF unavailable: {exc}")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--model_alias", "smollm2-135m-instruct"],
            stdout=fh, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        try:
            wait_until_ready(base_url, timeout=120)
        except TimeoutError:
            pytest.fail(f"llama.cpp server did not start: {log.read_text()[-2000:]}")
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
