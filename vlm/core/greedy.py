"""Greedy decoding as a plain loop over the LLM's forward with its KV cache: the path
``LlavaModel.generate`` takes for a plain greedy call (one beam, no sampling, explicit lengths
and token ids, an LLM whose generation config adds no logits processor).

Per new token, transformers' ``generate`` spends about as long again as the forward itself on
its machinery: ``MinLength``/``MinNewTokensLength`` processors that each clone the scores and
rebuild a vocabulary-sized EOS mask with ``torch.isin`` at every step (20 % of a step with a
32k vocabulary on a CPU), stopping criteria, ``prepare_inputs_for_generation`` and
signature inspection. This loop makes the same forward calls on the same inputs (prompt
embeddings, then token ids; the caller's position ids continued by one per token; the same
cache kind and length; ``logits_to_keep=1`` where the LLM takes it) and picks the same argmax,
so its tokens are ``generate``'s.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

# What a greedy call may pass and what the LLM's generation config may set, for this loop.
CALL_KEYS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "pad_token_id", "eos_token_id",
    "cache_implementation", "use_cache",
}  # fmt: skip
CONFIG_KEYS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "use_cache",
    "output_attentions", "output_hidden_states", "_from_model_config", "transformers_version",
}  # fmt: skip


def is_plain_greedy(llm: nn.Module, kwargs: dict) -> bool:
    """Whether ``generate`` would decode these kwargs by argmax with nothing but the EOS
    suppression of ``min_new_tokens``; anything else (sampling, beams, penalties, a
    repetition penalty in the LLM's own generation config) is left to ``generate``."""
    return (
        set(kwargs) <= CALL_KEYS
        and not kwargs.get("do_sample", False)
        and kwargs.get("num_beams", 1) == 1
        and kwargs.get("use_cache", True)
        and kwargs.get("cache_implementation") in (None, "dynamic", "static")
        and all(kwargs.get(k) is not None for k in ("max_new_tokens", "pad_token_id", "eos_token_id"))
        and kwargs["max_new_tokens"] > 0
        and set(llm.generation_config.to_diff_dict()) <= CONFIG_KEYS
    )


@torch.no_grad()
def greedy(
    llm: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
    max_new_tokens: int, pad_token_id: int, eos_token_id: int | list[int], min_new_tokens: int | None = None,
    cache_implementation: str | None = None, **_: object,
) -> Tensor:  # fmt: skip
    """(B, T, D) prompt embeddings -> (B, <= max_new_tokens) new ids; a row that has ended
    takes ``pad_token_id``, and decoding stops once every row has."""
    batch, length = attention_mask.shape
    device = inputs_embeds.device
    eos = torch.tensor(eos_token_id, device=device).reshape(-1)
    config = llm.config.get_text_config(decoder=True)
    if cache_implementation == "static":
        cache = StaticCache(config=config, max_cache_len=length + max_new_tokens - 1)
    else:
        cache = DynamicCache(config=config)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(llm.forward).parameters else {}
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=-1)
    steps = torch.arange(1, max_new_tokens + 1, device=device, dtype=position_ids.dtype)
    later_positions = position_ids[..., -1:] + steps  # (..., B, max_new_tokens)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids}
    suppress = min_new_tokens or 0
    for step in range(max_new_tokens):
        logits = llm(
            attention_mask=mask[:, : length + step], cache=cache, use_cache=True, **inputs, **keep
        ).logits
        scores = logits[:, -1].float()
        if step < suppress:  # no row can end yet, so none has
            scores[:, eos] = -math.inf
            token = scores.argmax(-1)
        else:
            token = torch.where(unfinished, scores.argmax(-1), pad_token_id)
            unfinished &= ~torch.isin(token, eos)
        out[:, step] = token
        if step >= suppress and not unfinished.any():
            return out[:, : step + 1]
        inputs = {"input_ids": token[:, None], "position_ids": later_positions[..., step : step + 1]}
    return out
