"""Progressive unfreezing of the decoder: phase 1 trains the blocks above the first 70 %,
phase 2 those above the first 50 % (fractions, learning rates and epochs from config).

Every parameter that any phase trains has ``requires_grad`` from the start, and a phase drops
the gradients of those it does not train yet before the optimizer step (AdamW skips a
parameter without a gradient: no update, no weight decay, no moment). Flipping
``requires_grad`` between phases instead would be silently wrong under DDP, whose reducer
only syncs the parameters that required grad when the model was wrapped: the blocks unfrozen
in phase 2 would train apart on each rank.

Tied embeddings: GPT-2 and GPT-Neo share one matrix between the token embeddings and the LM
head, so training the head trains the embeddings. With ``head: true, embeddings: false`` the
head is untied (its own copy of the matrix) and the input embeddings stay bit-identical.
"""

from __future__ import annotations

import logging

from torch import nn

from vlm.core.zoo.llms import decoder_layers

log = logging.getLogger(__name__)


class ProgressiveUnfreezing:
    """Phase k freezes the first ``frozen_fractions[k]`` of the decoder blocks for
    ``epochs[k]`` epochs at learning rate ``lrs[k]``; what lies above them trains, with the
    final norm, the head (``head``) and the embeddings (``embeddings``)."""

    def __init__(
        self,
        llm: nn.Module,
        frozen_fractions: list[float],
        lrs: list[float],
        epochs: list[int],
        head: bool = True,
        embeddings: bool = False,
    ):
        if not frozen_fractions or not len(frozen_fractions) == len(lrs) == len(epochs):
            raise ValueError(
                f"unfreeze: frozen_fractions, lrs and epochs need one entry per phase, got "
                f"{len(frozen_fractions)}, {len(lrs)} and {len(epochs)}"
            )
        for f, lr, e in zip(frozen_fractions, lrs, epochs, strict=True):
            if not 0.0 <= f <= 1.0 or lr <= 0 or e < 1:
                raise ValueError(
                    f"unfreeze: phase (frozen_fraction={f}, lr={lr}, epochs={e}) needs "
                    "frozen_fraction in [0, 1], lr > 0 and epochs >= 1"
                )
        self.lrs = [float(x) for x in lrs]
        self.epochs = [int(x) for x in epochs]
        self.blocks = decoder_layers(llm)
        n = len(self.blocks)
        self.frozen_blocks = [int(f * n + 0.5) for f in frozen_fractions]
        inputs = [llm.get_input_embeddings(), *_position_embeddings(llm)]
        head_module = llm.get_output_embeddings()
        if head and not embeddings and head_module.weight is inputs[0].weight:
            untie(llm)
            log.info("unfreeze: LM head untied from the frozen input embeddings")
        in_blocks = {id(p) for p in self.blocks.parameters()}
        embed_ids = {id(p) for m in inputs for p in m.parameters()}
        head_ids = {id(p) for p in head_module.parameters()}
        self.top = [  # trains with the unfrozen blocks: the final norm, head and embeddings as configured
            p
            for p in llm.parameters()
            if id(p) not in in_blocks
            and (id(p) not in embed_ids or embeddings)
            and (id(p) not in head_ids or head)
        ]

    @property
    def num_phases(self) -> int:
        return len(self.lrs)

    def trained(self, phase: int) -> list[nn.Parameter]:
        frozen = self.frozen_blocks[phase]
        if frozen == len(self.blocks):
            return []
        return [p for b in self.blocks[frozen:] for p in b.parameters()] + self.top

    def ever_trained(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for k in range(self.num_phases):
            seen.update((id(p), p) for p in self.trained(k))
        return list(seen.values())

    def phase_at(self, epoch: int) -> int:
        """The phase of a 0-based epoch; the last phase goes on past the schedule's end."""
        end = 0
        for k, n in enumerate(self.epochs):
            end += n
            if epoch < end:
                return k
        return self.num_phases - 1


def _position_embeddings(llm: nn.Module) -> list[nn.Module]:
    """GPT-2 / GPT-Neo learned positions (``wpe``); rotary models have none."""
    wpe = getattr(llm.base_model, "wpe", None)
    return [wpe] if isinstance(wpe, nn.Module) else []


def untie(llm: nn.Module) -> None:
    """Give the LM head its own copy of the tied matrix, and keep it untied on save/reload."""
    head = llm.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    llm.config.tie_word_embeddings = False
