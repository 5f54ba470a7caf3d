"""Layer-fusion LLaVA as a LightningModule.

Recipe parts are ``vision_tower``, ``connector``, ``fusion`` (the E_M module, or the internal
projectors and I_M blocks) and ``llm``. Unless ``tune.fusion`` is given, the fusion trains
exactly when the connector does, so the stock stages read as the paper's: stage 1 (pretrain)
trains projectors and fusion modules, stage 2 (finetune) adds the LLM.
"""

from __future__ import annotations

import hydra
from torch import nn

from vlm.core.lit_module import VLMLitModule
from vlm.core.tokenizer import IMAGE_TOKEN
from vlm.core.zoo.llms import decoder_layers
from vlm.families.layer_fusion.external import STRATEGIES as EXTERNAL
from vlm.families.layer_fusion.external import ExternalFusion
from vlm.families.layer_fusion.internal import STRATEGIES as INTERNAL
from vlm.families.layer_fusion.internal import InternalFusion
from vlm.families.layer_fusion.layers import resolve
from vlm.families.layer_fusion.model import LayerFusionModel


def build_layer_fusion(cfg: dict, tokenizer) -> LayerFusionModel:
    tower = hydra.utils.instantiate(cfg["vision_tower"])
    llm = hydra.utils.instantiate(cfg["llm"], vocab_size=len(tokenizer))
    fusion_cfg, layers_cfg = dict(cfg["fusion"]), dict(cfg["layers"])
    strategy = fusion_cfg.pop("strategy")
    layer_set = resolve(
        layers_cfg["name"], layers_cfg["blocks"], tower.depth, layers_cfg.get("reference"), tower.name
    )
    make_connector = hydra.utils.instantiate(cfg["connector"])
    d_v, d_llm = tower.hidden_size, llm.config.hidden_size
    if strategy in EXTERNAL:
        fusion = ExternalFusion(strategy, len(layer_set.groups), d_v, **fusion_cfg)
        connector = make_connector(fusion.out_dim, d_llm)
    elif strategy in INTERNAL:
        heads = fusion_cfg.pop("num_heads", None) or llm.config.num_attention_heads
        fusion = InternalFusion(
            strategy,
            layer_set.blocks,
            tower.depth,
            len(decoder_layers(llm)),
            lambda: make_connector(d_v, d_llm),
            d_llm,
            heads,
            **fusion_cfg,
        )
        connector = make_connector(d_v, d_llm)
    else:
        raise ValueError(f"fusion.strategy={strategy!r}: choose from {', '.join(EXTERNAL + INTERNAL)}")
    return LayerFusionModel(
        tower,
        connector,
        llm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        layer_set=layer_set,
        fusion=fusion,
        select_layer=cfg.get("select_layer", -2),
        select_feature=cfg.get("select_feature", "patch"),
    )


class LayerFusionModule(VLMLitModule):
    def build_model(self, cfg: dict, tokenizer) -> nn.Module:
        return build_layer_fusion(cfg, tokenizer)

    def parts(self) -> dict[str, nn.Module]:
        return super().parts() | {"fusion": self.model.fusion}

    def apply_recipe(self, tune: dict) -> None:
        tune = dict(tune)
        tune.setdefault("fusion", tune.get("connector"))
        super().apply_recipe(tune)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """``fusion/gate_<name>`` = tanh of each modular gate, every ``monitor_every`` steps: a
        gate still at zero late in training means that fusion never opened."""
        if self.monitoring_step():
            self.log_now({f"fusion/gate_{k}": v for k, v in self.model.fusion.gates().items()})
