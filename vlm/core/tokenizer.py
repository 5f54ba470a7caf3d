"""Tokenizers: a real one by hub name, or one trained in-process on the dataset text.

Offline, no hub tokenizer can be fetched, so the embedded default trains a small BPE on the
training conversations. It is wrapped as a ``PreTrainedTokenizerFast`` with the same special
tokens and a chat template, so every later step (templates, label masking, generation) runs
the code path a real tokenizer takes.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm.core.zoo.errors import CheckpointMissingError
from vlm.core.zoo.registry import llm_entry

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# Vicuna-style turns as in LLaVA-1.5, without the long system prompt: on the tiny default it
# would cost more tokens than the question itself.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_TEMPLATE_WORDS = ["USER:", "ASSISTANT:"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-free BPE on ``texts`` with pad/bos/eos/unk and ``<image>`` as special tokens.

    Every printable ASCII character is in the initial alphabet, so no prompt a user types maps
    to ``<unk>`` only because the training text never contained it.
    """
    specials = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(_with_template_words(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=[IMAGE_TOKEN],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def _with_template_words(texts: Iterable[str]) -> Iterable[str]:
    yield from _TEMPLATE_WORDS
    yield from texts


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A real tokenizer by hub name (local cache only when offline) or from a saved folder.

    ``<image>`` and a pad token are added when missing; the LLM's embeddings are resized to
    ``len(tokenizer)`` when it is built.
    """
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        if Path(name_or_path).exists():
            raise
        raise CheckpointMissingError.for_hub_id(name_or_path, "tokenizer.name") from err
    added = {}
    if IMAGE_TOKEN not in tok.get_vocab():
        added["extra_special_tokens"] = [IMAGE_TOKEN]
    if tok.pad_token is None:
        added["pad_token"] = tok.unk_token or "<pad>"
    if added:
        tok.add_special_tokens(added)
    tok.padding_side = "right"
    return tok


def build_tokenizer(
    name: str | None = "auto",
    llm_name: str | None = None,
    llm_pretrained: bool = False,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1024,
) -> PreTrainedTokenizerBase:
    """Hydra entry. ``auto``: the LLM's own tokenizer when it loads pretrained weights, else
    one trained on ``corpus``; ``null``: always train; any other value: a hub name or folder."""
    if name == "auto":
        name = llm_entry(llm_name).tokenizer_id if llm_pretrained and llm_name else None
    if name:
        return load_tokenizer(name)
    if corpus is None:
        raise ValueError("tokenizer.name is null, so a corpus is needed to train one in-process")
    return train_tokenizer(corpus, vocab_size)
