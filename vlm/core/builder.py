"""Building models and objectives from their configs.

``family.model._target_`` names a known :class:`~vlm.core.model.VLMModel`, ``objective._target_``
a known :class:`~vlm.core.objectives.Objective` (:mod:`vlm.core.classes`: looked up, not imported).

For a "vision tower -> connector -> LLM" model, ``family.model`` is resolved once here.

Every such family needs the same things settled the same way: the tower and the LLM from the
zoo (the LLM sized to the tokenizer), the ``<image>`` id, which hidden state ``select_layer``
names (checked against the tower's depth), and a connector completed with the two widths.
:func:`build_parts` does that in a fixed order (tower, LLM, then whatever the family adds),
so random init is reproducible and a family's ``from_config`` only adds its own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hydra
from torch import nn

from vlm.core.classes import known_class
from vlm.core.model import VLMModel
from vlm.core.objectives import Objective
from vlm.core.tokenizer import IMAGE_TOKEN


def select_index(select_layer: int, tower: nn.Module) -> int:
    """``select_layer`` (0..N, or -1..-(N+1) from the end, as HF's ``hidden_states``) as a
    hidden-state index: 0 is the embeddings, ``i`` the output of block ``i``."""
    depth = tower.depth
    index = select_layer if select_layer >= 0 else depth + 1 + select_layer
    if not 0 <= index <= depth:
        raise ValueError(
            f"select_layer={select_layer} is outside the {depth}-block encoder "
            f"'{tower.name}' (valid: 0..{depth} or -1..-{depth + 1}; 0 is the embeddings)"
        )
    return index


def select_indices(select_layer: int | Sequence[int], tower: nn.Module) -> tuple[int, ...]:
    """One ``select_layer`` or a list of them (as HF LLaVA's ``vision_feature_layer``: the
    states concatenated along channels, in the order given), as hidden-state indices."""
    layers = [select_layer] if isinstance(select_layer, int) else list(select_layer)
    if not layers:
        raise ValueError("select_layer is an empty list: give one layer or several, e.g. [-2] or [3, 18, -2]")
    return tuple(select_index(layer, tower) for layer in layers)


@dataclass
class LlavaParts:
    tower: nn.Module
    llm: nn.Module
    image_token_id: int
    select_indices: tuple[int, ...]
    select_feature: str
    make_connector: Callable[[int, int], nn.Module] | None

    @property
    def llm_width(self) -> int:
        return self.llm.config.hidden_size

    @property
    def select_index(self) -> int:
        """The one state read, for families whose base feature is a single layer."""
        if len(self.select_indices) > 1:
            raise ValueError(
                f"select_layer={list(self.select_indices)} concatenates several layers, which the "
                "llava family does (HF LLaVA's list vision_feature_layer); this family reads one base layer"
            )
        return self.select_indices[0]

    def connector(self, in_dim: int | None = None) -> nn.Module:
        """The configured connector from ``in_dim`` (default: the tower's width times the
        layers read) to the LLM's."""
        return self.make_connector(
            in_dim or self.tower.hidden_size * len(self.select_indices), self.llm_width
        )


def build_parts(
    tokenizer: Any,
    vision_tower: dict,
    llm: dict,
    connector: dict | None = None,
    select_layer: int | Sequence[int] = -2,
    select_feature: str = "patch",
    tower: nn.Module | None = None,
) -> LlavaParts:
    """Tower (unless a family built its own, e.g. CALM's anchor), then the LLM; ``connector``
    is a ``_partial_`` config, completed later by :meth:`LlavaParts.connector`."""
    tower = tower or hydra.utils.instantiate(vision_tower)
    lm = hydra.utils.instantiate(llm, vocab_size=len(tokenizer))
    return LlavaParts(
        tower=tower,
        llm=lm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        select_indices=select_indices(select_layer, tower),
        select_feature=select_feature,
        make_connector=hydra.utils.instantiate(connector) if connector else None,
    )


def build_model(cfg: dict, tokenizer: Any) -> VLMModel:
    """``family.model``: ``_target_`` names the model class, the rest goes to its ``from_config``."""
    cfg = dict(cfg)
    return known_class(cfg.pop("_target_", None), VLMModel, "family.model._target_").from_config(
        tokenizer, **cfg
    )


def build_objective(cfg: dict) -> Objective:
    """``objective``: ``_target_`` names the objective class, the rest are its arguments."""
    cfg = dict(cfg)
    return known_class(cfg.pop("_target_", None), Objective, "objective._target_")(**cfg)
