"""LLaVA-1.5 as a LightningModule: the shared core with nothing plugged in."""

from __future__ import annotations

import hydra
from torch import nn

from vlm.core.lit_module import VLMLitModule
from vlm.core.llava import LlavaModel
from vlm.core.tokenizer import IMAGE_TOKEN


def build_llava(cfg: dict, tokenizer) -> LlavaModel:
    """Vision tower and LLM from the zoo; the connector is completed with their widths."""
    tower = hydra.utils.instantiate(cfg["vision_tower"])
    llm = hydra.utils.instantiate(cfg["llm"], vocab_size=len(tokenizer))
    connector = hydra.utils.instantiate(cfg["connector"])(tower.hidden_size, llm.config.hidden_size)
    return LlavaModel(
        tower,
        connector,
        llm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        select_layer=cfg.get("select_layer", -2),
        select_feature=cfg.get("select_feature", "patch"),
    )


class LlavaModule(VLMLitModule):
    def build_model(self, cfg: dict, tokenizer) -> nn.Module:
        return build_llava(cfg, tokenizer)
