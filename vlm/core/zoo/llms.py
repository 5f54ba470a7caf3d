"""Causal LMs by name: random init from an embedded config, or hub weights from the local cache."""

from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from vlm.core.zoo.hub import load_pretrained
from vlm.core.zoo.registry import arch_config, llm_entry, reject_unknown


def build_llm(
    name: str,
    pretrained: bool = False,
    preset: str = "tiny",
    vocab_size: int | None = None,
    padded_vocab_size: int | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Build the causal LM ``name``.

    Random init (``preset`` "tiny" or "real"): ``vocab_size`` sets the vocabulary, for a
    tokenizer trained in-process, or ``padded_vocab_size`` where that is larger (an imported
    checkpoint's matrix padded past its tokenizer). ``pretrained=True``: weights from the local HF cache
    (``preset`` ignored); embeddings grow to ``vocab_size`` when the tokenizer gained tokens
    (``<image>``, pad), and never shrink (Qwen pads its matrix past the tokenizer).
    ``overrides`` are config keys, e.g. the tokenizer's ``bos/eos/pad_token_id``, plus
    ``attn_implementation`` (default: the entry's, "sdpa" where the class supports it) and,
    when pretrained, ``dtype`` (default float32, so all builds agree).
    """
    entry = llm_entry(name)
    overrides = {k: _plain(v) for k, v in overrides.items()}
    attn = overrides.pop("attn_implementation", entry.attn_implementation)
    defaults = AutoConfig.for_model(entry.model_type)
    reject_unknown(defaults, overrides, name)
    if pretrained:
        if entry.hub_id is None:
            raise ValueError(f"llm {name!r} has no pretrained weights; set llm.pretrained=false")
        kwargs = {"dtype": torch.float32, "attn_implementation": attn} | overrides
        model = load_pretrained(
            lambda src: AutoModelForCausalLM.from_pretrained(src, **kwargs), entry.hub_id, "llm.pretrained"
        )
        if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
        return model
    arch = arch_config(entry, preset, overrides)
    if vocab_size:
        arch["vocab_size"] = max(vocab_size, padded_vocab_size or 0)
    arch |= _ids_inside_vocab(arch, defaults)
    config = AutoConfig.for_model(entry.model_type, **arch, attn_implementation=attn)
    return AutoModelForCausalLM.from_config(config)


def _plain(value: Any) -> Any:
    """Config lists (GPT-Neo's ``attention_types``) as plain lists: HF configs type-check them."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _ids_inside_vocab(arch: dict[str, Any], defaults: PretrainedConfig) -> dict[str, Any]:
    """A shrunk vocabulary would keep the hub's special-token ids (e.g. GPT-2's 50256), which
    point past the embedding matrix: those are unset. Callers pass their tokenizer's ids."""
    vocab = arch.get("vocab_size", defaults.vocab_size)
    fixed = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = arch.get(key, getattr(defaults, key, None))
        if isinstance(ids, list):
            fixed[key] = [i for i in ids if i < vocab] or None
        elif ids is not None and ids >= vocab:
            fixed[key] = None
    return fixed


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks: ``model.layers`` (Llama, Qwen) or ``transformer.h`` (GPT-2, GPT-Neo).

    A PEFT wrapper is looked through, so recipes and families can call this after LoRA.
    """
    model = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base = model.base_model
    for attr in ("layers", "h"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"no decoder layers found on {type(model).__name__}")
