"""Conversation templates that say, per piece of text, whether it is a training target.

LLaVA masks labels by re-tokenising each turn and counting tokens; when a tokenizer merges
across a turn boundary the count drifts ("tokenization mismatch") and the whole sample is
silently masked out. Here a template renders a conversation as *segments*: each segment is
tokenised on its own and carries its own target flag, so the mask follows the template's
turn boundaries by construction and the same segmentation is used at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from vlm.core.tokenizer import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Segment:
    text: str
    target: bool


class Template(Protocol):
    name: str
    reads_question: bool  # whether the human turn's text reaches the model (plain: image only)

    def segments(self, turns: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """``turns``: LLaVA ``conversations`` ({"from", "value"}); with ``add_generation_prompt``
        the last turn must be a user turn and the result ends where the reply would start."""


def to_messages(turns: list[dict]) -> list[dict]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


class PlainTemplate:
    """LLaVA stage-1 ``plain``: the image, then the caption and EOS; no roles, no question text.

    The human turn's text besides ``<image>`` is dropped, as in LLaVA's ``conv_llava_plain``.
    """

    name = "plain"
    reads_question = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token

    def segments(self, turns: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        image = "<image>" if "<image>" in turns[0]["value"] else ""
        out = [Segment(self.bos + image, False)]
        if not add_generation_prompt:
            out.append(Segment(turns[1]["value"] + self.eos, True))
        return out


class RawTemplate(PlainTemplate):
    """No chat template: each question as written, a newline, then its answer and EOS; no roles.

    The dense_connector seed's "raw instruction-response pairs". Unlike ``plain`` the question
    text stays, so a VQA model can still read what it is asked.
    """

    name = "raw"
    reads_question = True

    def segments(self, turns: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        out = [Segment(self.bos, False)] if self.bos else []
        for t in turns:
            if ROLES[t["from"]] == "user":
                out.append(Segment(t["value"] + "\n", False))
            else:
                out.append(Segment(t["value"] + self.eos, True))
        return out


class ChatTemplate:
    """The tokenizer's own Jinja chat template, split into segments by incremental rendering.

    Rendering ``messages[:k]`` with the generation prompt and then ``messages[:k+1]`` gives the
    assistant header and, as the difference, exactly the reply plus its end-of-turn text,
    whatever the template's syntax. A template that reads content lists (a processor's, as
    llava-hf ships) is given them: ``reads_parts`` is probed once by rendering. Templates that
    rewrite earlier turns when a later one is added (so a rendering is not a prefix of the next)
    are rejected with a clear error.
    """

    name = "chat"
    reads_question = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        template_vars: dict | None = None,
    ):
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer '{tokenizer.name_or_path}' has no chat template: use template=vicuna_v1"
            )
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_vars = template_vars or {}
        self.reads_parts = self._reads_parts()

    def _reads_parts(self) -> bool:
        """Whether the template drops a string message's text but renders a content list's."""
        probe = "\x00probe\x00"
        as_text = [{"role": "user", "content": probe}]
        try:
            if probe in self._apply(as_text, gen=False):
                return False
            return probe in self._apply([self.as_parts(as_text[0])], gen=False)
        except (TemplateError, TypeError):  # a template that cannot take the other form at all
            return False

    @staticmethod
    def as_parts(message: dict) -> dict:
        """A LLaVA turn as the content list HF processors' templates read (llava-hf's: the
        images first, then the text): ``<image>`` markers become image parts."""
        text = message["content"]
        n_images = text.count(IMAGE_TOKEN)
        rest = text.replace(IMAGE_TOKEN, "").strip("\n") if n_images else text
        parts = [{"type": "image"}] * n_images + ([{"type": "text", "text": rest}] if rest else [])
        return {"role": message["role"], "content": parts}

    def _apply(self, messages: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=gen,
            chat_template=self.chat_template,
            **self.template_vars,
        )

    def _render(self, messages: list[dict], gen: bool) -> str:
        if not messages:
            return ""
        return self._apply([self.as_parts(m) for m in messages] if self.reads_parts else messages, gen)

    def segments(self, turns: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        messages = to_messages(turns)
        out: list[Segment] = []
        done = ""
        for k, msg in enumerate(messages):
            is_reply = msg["role"] == "assistant"
            text = self._render(messages[: k + 1], gen=False)
            if is_reply:
                header = self._render(messages[:k], gen=True)
                self._check_prefix(done, header)
                out.append(Segment(header[len(done) :], False))
                done = header
            self._check_prefix(done, text)
            out.append(Segment(text[len(done) :], is_reply))
            done = text
        if add_generation_prompt:
            header = self._render(messages, gen=True)
            self._check_prefix(done, header)
            out.append(Segment(header[len(done) :], False))
        return [s for s in out if s.text]

    @staticmethod
    def _check_prefix(prefix: str, text: str) -> None:
        if not text.startswith(prefix):
            raise ValueError(
                "chat template rewrites earlier turns when a turn is added, so turn boundaries "
                "are ambiguous: pass an explicit template (template=vicuna_v1)"
            )


VICUNA_V1 = (
    "{{ bos_token }}{% if system %}{{ system }} {% endif %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def build_template(name: str, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> Template:
    """``plain`` (pretrain), ``raw`` (question and answer as text, no roles), ``chat`` (the
    tokenizer's own template), ``vicuna_v1`` (LLaVA-1.5's conversation format, for base LLMs
    without a template), ``auto`` (chat if the tokenizer has a template, else vicuna_v1)."""
    if name == "plain":
        return PlainTemplate(tokenizer)
    if name == "raw":
        return RawTemplate(tokenizer)
    if name == "auto":
        name = "chat" if tokenizer.chat_template else "vicuna_v1"
    if name == "chat":
        return ChatTemplate(tokenizer)
    if name == "vicuna_v1":
        sys = VICUNA_SYSTEM if system is None else system
        return ChatTemplate(tokenizer, VICUNA_V1, {"system": sys})
    raise ValueError(f"unknown template '{name}': choose plain, raw, chat, vicuna_v1 or auto")
