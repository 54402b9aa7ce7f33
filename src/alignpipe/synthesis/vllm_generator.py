"""Sampling with vLLM in this process (the `vllm` generator): needs the vllm package and a CUDA GPU.

The base model is loaded once; a round's policy is its LoRA adapter directory (`round-NN/checkpoint`,
written by the loop) handed to vLLM as a `LoRARequest`, so no merged weights are copied. `n=k` samples
per prompt come from one request (vLLM shares the prompt's KV cache between them), each prompt seeded
from (seed, prompt id). Prompts are rendered with the same chat template as training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.data.chat import format_messages
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.generators import check_backend_available, source_record
from alignpipe.synthesis.openai_generator import derive_seed


class VLLMGenerator:
    """`model`: the base model directory; `adapter`: a LoRA adapter directory (or later `set_adapter`).
    Other keyword options go to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`)."""

    def __init__(self, model: str | Path, *, adapter: str | Path | None = None, seed: int = 0,
                 max_lora_rank: int = 64, id_prefix: str = "", name: str = "vllm", **llm_options: Any) -> None:
        reason = check_backend_available("vllm")
        if reason is not None:
            raise AlignpipeError(f"synthesis.backend 'vllm' needs the vllm package and a CUDA GPU: {reason}")
        from vllm import LLM

        self.model_name, self.id_prefix, self.name = str(model), id_prefix, name
        self.llm = LLM(model=str(model), seed=seed, enable_lora=True, max_lora_rank=max_lora_rank, **llm_options)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora: Any = None
        self._adapters = 0
        if adapter is not None:
            self.set_adapter(adapter)

    def set_adapter(self, path: str | Path | None) -> None:
        """Sample from base + this LoRA adapter from now on (None: the base model). Each call gets a new
        adapter id, so a directory rewritten by the next round is loaded again."""
        if path is None:
            self._lora = None
            return
        from vllm.lora.request import LoRARequest

        if not Path(path).is_dir():
            raise AlignpipeError(f"LoRA adapter directory does not exist: {path}")
        self._adapters += 1
        self._lora = LoRARequest(f"adapter-{self._adapters}", self._adapters, str(path))

    def sample(self, prompts: list[Prompt], k: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, source: dict, description: str = "sampling") -> list[Candidate]:
        from vllm import SamplingParams

        record = source_record(source, self.name, self.model_name, temperature, top_p)
        if self._lora is not None:
            record["adapter"] = self._lora.lora_path
        # token ids, not text: vLLM would add a BOS token that training (add_special_tokens=False) does not see
        inputs = [{"prompt_token_ids": self.tokenizer(format_messages(
            self.tokenizer, p.meta.get("messages") or [{"role": "user", "content": p.prompt}]),
            add_special_tokens=False)["input_ids"]} for p in prompts]
        params = [SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=derive_seed(seed, p.id, 0)) for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=self._lora, use_tqdm=False)
        out = []
        for prompt, result in zip(prompts, outputs, strict=True):
            for j, o in enumerate(result.outputs):
                out.append(Candidate(prompt_id=prompt.id, id=f"{prompt.id}/{self.id_prefix}{j}", completion=o.text,
                                     source=dict(record), num_tokens=len(o.token_ids),
                                     truncated=o.finish_reason == "length"))
        return out
