"""Shared fixtures: a tiny random Llama built in code (2 layers, width 64) for fast unit tests."""

from __future__ import annotations

import os
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
