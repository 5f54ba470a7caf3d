"""LLaVA as transformers writes it, in and out of the llava family: ``LlavaForConditionalGeneration``
folders (llava-hf on the hub, and what vLLM and SGLang serve).

HF's LLaVA is our core model with its choices fixed: a CLIP or SigLIP tower read at
``vision_feature_layer`` (one hidden state, or several concatenated along channels: our
``select_layer``), ``vision_feature_select_strategy`` "default" (the CLS token dropped:
``select_feature=patch``) or "full" (every token), a Linear-act-Linear projector
(``connector=mlp2x_gelu``) and a causal LM. Hidden state ``i`` means the same on both sides
(0: the embeddings after CLIP's pre-norm; ``-2``: the penultimate block's output).

Import reads the folder with transformers' own loader (either key layout, sharded or not);
export builds transformers' class around our tensors and writes it with ``save_pretrained``
(safetensors) beside a ``LlavaProcessor``, so the folder loads with nothing of ours installed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, snapshot_download
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm.core.connectors import Connector
from vlm.core.tokenizer import IMAGE_TOKEN, load_tokenizer
from vlm.core.zoo.errors import CheckpointMissingError
from vlm.core.zoo.hub import local_snapshot

PREFIX = "hf:"  # stage.init_from=hf:<folder or hub id>
TOWERS = ("clip_vision_model", "siglip_vision_model")  # zoo entries named by HF model_type
LLMS = ("llama", "mistral", "qwen2")
ACTIVATIONS = ("gelu", "relu", "silu")  # the same function under the same name on both sides
_META_KEYS = {"model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"}


class NotExportable(ValueError):
    """A model HF's LLaVA cannot express; the message names what would export."""


def is_hf(init_from: str | None) -> bool:
    return bool(init_from) and str(init_from).startswith(PREFIX)


def source_folder(src: str) -> Path:
    """``src`` without ``hf:``: a local folder, or a hub id in the local cache (downloaded
    only when online)."""
    src = src.removeprefix(PREFIX)
    if Path(src).is_dir():
        return Path(src)
    folder = local_snapshot(src)
    if folder is not None:
        return folder
    if constants.is_offline_mode():
        raise CheckpointMissingError.for_hub_id(src, "stage.init_from")
    return Path(snapshot_download(src))


def read_config(folder: Path) -> LlavaConfig:
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llava":
        raise ValueError(
            f"{folder}: model_type {config.model_type!r} is not 'llava' (LlavaForConditionalGeneration); "
            "only LLaVA checkpoints import into the llava family"
        )
    return config


def _arch(config: Any) -> dict[str, Any]:
    """The config's non-default keys, as the zoo's builders take them."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in _META_KEYS}


def _image_size(folder: Path) -> tuple[int, list[float], list[float]]:
    """The image processor's crop (or resize) size and normalisation."""
    proc = AutoImageProcessor.from_pretrained(folder)
    size = proc.crop_size if getattr(proc, "do_center_crop", False) else proc.size
    side = size.get("height") or size.get("shortest_edge")
    return int(side), list(proc.image_mean), list(proc.image_std)


def run_config(src: str) -> dict[str, Any]:
    """The train-config values that make the llava family's model the checkpoint's
    architecture: ``encoder``, ``llm``, ``connector``, ``family.model.select_*`` and
    ``tokenizer.name`` (the folder's own tokenizer)."""
    folder = source_folder(src)
    config = read_config(folder)
    vision, text = config.vision_config, config.text_config
    if vision.model_type not in TOWERS:
        raise ValueError(f"{folder}: vision tower {vision.model_type!r} does not import; supported: {TOWERS}")
    if text.model_type not in LLMS:
        raise ValueError(f"{folder}: language model {text.model_type!r} does not import; supported: {LLMS}")
    if config.projector_hidden_act not in ACTIVATIONS or not config.multimodal_projector_bias:
        raise ValueError(
            f"{folder}: projector {config.projector_hidden_act!r} (bias={config.multimodal_projector_bias}) "
            f"has no connector here; supported: {ACTIVATIONS} with bias"
        )
    size, mean, std = _image_size(folder)
    if size != vision.image_size:
        raise ValueError(
            f"{folder}: the processor crops {size} px but the tower is built for {vision.image_size}"
        )
    has_cls = vision.model_type == "clip_vision_model"
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise ValueError(
            f"{folder}: strategy 'default' drops a CLS token that {vision.model_type} does not have"
        )
    layer = config.vision_feature_layer
    return {
        "encoder": {
            "_target_": "vlm.core.zoo.encoders.build_vision_tower",
            "name": vision.model_type,
            "pretrained": False,
            "preset": "real",
            "image_mean": mean,
            "image_std": std,
            **_arch(vision),
        },
        "llm": {
            "_target_": "vlm.core.zoo.llms.build_llm",
            "name": text.model_type,
            "pretrained": False,
            "preset": "real",
            **{k: v for k, v in _arch(text).items() if k != "vocab_size"},
            "padded_vocab_size": text.vocab_size,
        },
        "connector": {
            "_target_": "vlm.core.connectors.Connector",
            "_partial_": True,
            "depth": 2,
            "activation": config.projector_hidden_act,
            "pool": 1,
        },
        "family.model.select_layer": layer if isinstance(layer, int) else list(layer),
        "family.model.select_feature": "cls_patch" if strategy == "full" and has_cls else "patch",
        "tokenizer.name": str(folder),
    }


def tokenizer(src: str):
    """The folder's tokenizer with the processor's chat template, its ``<image>`` checked
    against the config's image token."""
    folder = source_folder(src)
    config = read_config(folder)
    tok = load_tokenizer(str(folder))
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
        raise ValueError(
            f"{folder}: the tokenizer's {IMAGE_TOKEN} is id {tok.convert_tokens_to_ids(IMAGE_TOKEN)} "
            f"but the config's image_token_index is {config.image_token_index}"
        )
    if not tok.chat_template:
        tok.chat_template = getattr(AutoProcessor.from_pretrained(folder), "chat_template", None)
    return tok


# Our module names <-> HF's (runtime names; save_pretrained writes its own file layout).
_RENAMES = (
    ("vision_tower.model.", "model.vision_tower."),
    ("connector.proj.0.", "model.multi_modal_projector.linear_1."),
    ("connector.proj.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)


def _rename(key: str, to_hf: bool) -> str | None:
    for ours, theirs in _RENAMES:
        a, b = (ours, theirs) if to_hf else (theirs, ours)
        if key.startswith(a):
            return b + key[len(a) :]
    return None


def our_state_dict(src: str) -> dict[str, Tensor]:
    """The checkpoint's tensors under the llava family's model names."""
    hf = LlavaForConditionalGeneration.from_pretrained(source_folder(src), dtype=torch.float32)
    state = {}
    for key, value in hf.state_dict().items():
        ours = _rename(key, to_hf=False)
        if ours is None:
            raise ValueError(f"{src}: tensor {key} has no place in the llava family's model")
        state[ours] = value
    return state


# -- export ----------------------------------------------------------------------------------
def _merged(llm: nn.Module) -> nn.Module:
    """A copy of ``llm`` with LoRA adapters merged into their base layers (the original keeps
    them): HF's class has no adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in llm.modules()):
        return llm
    llm = copy.deepcopy(llm)
    for name, module in list(llm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            llm.set_submodule(name, module.get_base_layer())
    return llm


def _hf_layer(index: int, depth: int) -> int:
    """Hidden-state index as HF configs write a single layer (``-2``: the penultimate block)."""
    return index - depth - 1


def hf_config(model: nn.Module) -> tuple[LlavaConfig, Connector]:
    """The ``LlavaConfig`` of our model, and the connector that is its projector; a model HF's
    class cannot express raises :class:`NotExportable` (its message names what would)."""
    layers, projector = model.hf_llava_layout()
    positions = model.image_positions.name
    if positions != "flat":
        raise NotExportable(
            f"image_positions={positions}: HF's LLaVA gives image tokens the 1-D positions of the "
            "text around them and adds nothing to them; image_positions=flat exports"
        )
    tower = model.vision_tower
    tower_config = getattr(getattr(tower, "model", None), "config", None)
    if getattr(tower_config, "model_type", None) not in TOWERS:
        raise NotExportable(
            f"HF LLaVA's vision tower is a transformers CLIP or SigLIP model, not {tower.name!r}: "
            "encoder=clip_vit_l14_336 (or another CLIP/SigLIP entry) exports"
        )
    if tower.interpolate:
        raise NotExportable(
            f"the tower reads {tower.image_spec.size} px through position embeddings built for "
            f"{tower.model.config.image_size} px, which HF's LLaVA does not interpolate: "
            "encoder.image_size=null exports"
        )
    proj = getattr(projector, "proj", None)
    if not isinstance(projector, Connector) or len(proj) != 3 or projector.pool != 1:
        raise NotExportable(
            "HF LLaVA's projector is Linear-act-Linear on every patch: connector=mlp2x_gelu "
            "(connector.pool=1) exports"
        )
    act = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu"}[type(proj[1])]
    if tower.num_prefix_tokens == 0:
        strategy = "full"
    elif tower.num_prefix_tokens == 1:
        strategy = "default" if model.select_feature == "patch" else "full"
    else:
        raise NotExportable(
            f"{tower.name} has {tower.num_prefix_tokens} prefix tokens; HF LLaVA drops at most one"
        )
    depth = tower.depth
    feature_layer = _hf_layer(layers[0], depth) if len(layers) == 1 else list(layers)
    llm = model.llm
    config = LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        multimodal_projector_bias=True,
    )
    return config, projector


def hf_state_dict(model: nn.Module, projector: Connector) -> dict[str, Tensor]:
    """Tower, projector and merged LLM under HF's runtime names."""
    parts = {
        "vision_tower.model.": model.vision_tower.model,
        "connector.proj.0.": projector.proj[0],
        "connector.proj.2.": projector.proj[2],
    }
    llm = _merged(model.llm)
    parts[f"llm.{llm.base_model_prefix}."] = llm.base_model
    parts["llm.lm_head."] = llm.get_output_embeddings()
    state = {}
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            state[_rename(prefix + key, to_hf=True)] = value
    return state


def export_template(module: Any) -> str | None:
    """The chat template HF users render with content lists (``{"type": "image"}``, ``{"type":
    "text"}``), giving the text our template gave in training. A template that already reads
    content lists (an imported one) is kept as it is; ``plain``/``raw`` checkpoints have none."""
    template = module.processor.template
    if template.name != "chat":  # plain / raw: no conversation to template
        return None
    source = template.chat_template or template.tokenizer.chat_template
    if template.reads_parts:
        return source
    setvars = "".join(f"{{%- set {k} = {json.dumps(v)} -%}}" for k, v in template.template_vars.items())
    return setvars + _AS_TEXT + source


# Content lists -> the "<image>\n<text>" strings our templates were trained on, then the template.
_AS_TEXT = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
    "{%- else -%}{%- set t = namespace(images='', text=[]) -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set t.images = t.images + '<image>\\n' -%}"
    "{%- elif p['type'] == 'text' -%}{%- set t.text = t.text + [p['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': t.images + t.text | join(' ')}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def export(module: Any, out_dir: str | Path) -> Path:
    """``module`` (a llava-family LightningModule) as a ``LlavaForConditionalGeneration``
    folder: config, safetensors weights, generation config, tokenizer and processor. Written
    beside its final name and renamed into place."""
    model = module.model
    config, projector = hf_config(model)
    state = hf_state_dict(model, projector)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict(state, strict=True, assign=True)
    tok = module.tokenizer
    hf.generation_config.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    spec = model.vision_tower.image_spec
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.size},
        crop_size={"height": spec.size, "width": spec.size},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=model.vision_tower.model.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=export_template(module),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=model.vision_tower.num_prefix_tokens,
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
