"""``vlm-export ckpt=<path.ckpt> out=<folder>``: a checkpoint as a folder other tools load.

A llava-family model (and ``layer_fusion`` E_D / ``dense_connector`` SCI, whose features are
HF LLaVA's list ``vision_feature_layer``) becomes a transformers ``LlavaForConditionalGeneration``
folder (:mod:`vlm.core.hf_llava`), which ``from_pretrained``, vLLM and SGLang load as it is; the
Q-Former captioner writes its own ``save_pretrained`` folder. Anything else is said in one line,
naming the configuration that would export.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm.cli.common import CONFIG_DIR
from vlm.core import hf_llava
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import said_in_one_line


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.out:
        raise SystemExit("usage: vlm-export ckpt=<path.ckpt> out=<folder>")
    with said_in_one_line():
        module = VLMLitModule.from_checkpoint(cfg.ckpt)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(cfg.out)
        print(f"exported {cfg.ckpt} -> {cfg.out}")
        return
    if not hasattr(module.model, "hf_llava_layout"):
        raise SystemExit(f"vlm-export: {type(module.model).__name__} has no export format (only checkpoints)")
    try:
        hf_llava.export(module, cfg.out)
    except hf_llava.NotExportable as err:
        raise SystemExit(f"vlm-export: {err}") from None
    print(f"exported {cfg.ckpt} -> {cfg.out} (LlavaForConditionalGeneration, safetensors)")


if __name__ == "__main__":
    main()
