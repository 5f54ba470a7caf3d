"""Hugging Face LLaVA in and out: a tiny random ``LlavaForConditionalGeneration`` saved here is
imported (``vlm-import``, ``stage.init_from=hf:``) and must give transformers' own logits to
1e-5 and its greedy tokens; exports load with transformers alone and give ours; import and
export are inverse on the state dict; what HF's class cannot express is refused in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import cli, compose_run, data_overrides, run_train, steps
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlm.cli.build import build_module
from vlm.cli.import_hf import import_checkpoint
from vlm.core import hf_llava
from vlm.core.lit_module import VLMLitModule
from vlm.core.tokenizer import IMAGE_TOKEN, train_tokenizer

# llava-hf/llava-1.5-7b-hf's processor template: content lists, images first.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEXT = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
QUESTION = "what colour is the shape here?"


@pytest.fixture(scope="module")
def tokenizer():
    words = ["what colour is the shape here", "a red circle left of a blue square", "USER ASSISTANT yes no"]
    tok = train_tokenizer(words * 20, vocab_size=200)
    tok.chat_template = None  # llava-hf keeps the template in the processor
    return tok


def llava_folder(
    path: Path, tok, tower="clip", text="llama", layer=-2, strategy="default", tie=False
) -> Path:
    """A random llava-hf style folder: weights, config, processor with LLaVA-1.5's template.
    Weights are drawn wider than HF's init so logits are far from ties."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(
        **vision, image_size=32, patch_size=8
    )
    lm = TEXT[text](
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok) + 9, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=lm, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=16 + (strategy == "full" and tower == "clip"), vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    mean, std = ([0.5] * 3, [0.5] * 3) if tower == "siglip" else ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
        chat_template=LLAVA15_TEMPLATE, num_additional_image_tokens=int(tower == "clip"),
    )  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def image(seed=0, size=32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_inputs(folder: Path, img: Image.Image, question: str = QUESTION):
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt, processor(images=img, text=prompt, return_tensors="pt")


def our_logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])["logits"]


def state_dict_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


CASES = {  # tower, LM, vision_feature_layer, strategy, tied embeddings
    "clip-llama-penultimate": ("clip", "llama", -2, "default", False),
    "clip-mistral-list-full": ("clip", "mistral", [1, -1], "full", False),
    "clip-llama-list": ("clip", "llama", [0, 2, 3], "default", False),
    "siglip-qwen2-tied": ("siglip", "qwen2", -1, "full", True),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_llava_gives_transformers_logits_and_greedy_tokens(case, tokenizer, tmp_path):
    tower, text, layer, strategy, tie = CASES[case]
    folder = llava_folder(tmp_path / "hf", tokenizer, tower, text, layer, strategy, tie)
    module = VLMLitModule.from_checkpoint(import_checkpoint(str(folder), tmp_path / "ours.ckpt"))
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    prompt, inputs = hf_inputs(folder, image())
    # our template renders the LLaVA turn as the processor's template renders its content list
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": ""}]
    assert "".join(s.text for s in module.processor.template.segments(turns[:-1], True)) == prompt
    # the same pixels from our transform (no resize at the tower's size)
    ours_pixels = module.processor.pixels(image())
    assert torch.allclose(ours_pixels, inputs["pixel_values"][0], atol=1e-5)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert (our_logits(module, inputs) - theirs).abs().max() < 1e-5
    new = inputs["input_ids"].shape[1]
    with torch.no_grad():
        hf_tokens = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, new:]
    ours = module.model.generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=8,
        do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    assert ours.tolist() == hf_tokens[:, : ours.shape[1]].tolist() and ours.shape[1] > 0
    # import then export: transformers' state dict back, tensor for tensor
    out = hf_llava.export(module, tmp_path / "exported")
    back = LlavaForConditionalGeneration.from_pretrained(out)
    state_dict_equal(hf.state_dict(), back.state_dict())
    assert back.config.vision_feature_select_strategy == strategy


def test_export_loads_with_transformers_alone_and_reimports_identically(trained_run, tmp_path):
    """The default trained run (tiny CLIP + Llama, our chat template) through ``vlm-export``:
    a subprocess that imports nothing of ours loads it with ``from_pretrained`` and
    ``AutoProcessor``, renders the prompt with a content list, and gives our logits; importing
    the folder again gives our state dict back."""
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    res = cli("vlm-export", [f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.bin"))
    module = VLMLitModule.from_checkpoint(ckpt)
    img = image(3, 64)
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": ""}]
    item = module.processor.encode_prompt({"image": img, "conversations": turns})
    batch = module.processor.collate_prompts([item])
    img.save(tmp_path / "x.png")
    torch.save({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, tmp_path / "in.pt")
    script = f"""
import sys, json, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(folder)!r}).eval()
processor = AutoProcessor.from_pretrained({str(folder)!r})
inputs = torch.load({str(tmp_path / "in.pt")!r})
with torch.no_grad():
    logits = model(**inputs).logits
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
pixels = processor(images=Image.open({str(tmp_path / "x.png")!r}).convert("RGB"), text=prompt,
                   return_tensors="pt")["pixel_values"]
torch.save({{"logits": logits, "pixels": pixels}}, {str(tmp_path / "out.pt")!r})
ours = sorted(m for m in sys.modules if m.split('.')[0] == 'vlm')
print(json.dumps({{"prompt": prompt, "ours_imported": ours}}))
"""
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    said = json.loads(res.stdout.strip().splitlines()[-1])
    assert said["ours_imported"] == []
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ours = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])["logits"]
    assert (ours - got["logits"]).abs().max() < 1e-5
    # HF users' content-list prompt renders the text our template trained on; same pixels (64 px, no resize)
    assert said["prompt"] == "".join(s.text for s in module.processor.template.segments(turns[:-1], True))
    assert torch.allclose(got["pixels"][0], batch["pixel_values"][0], atol=1e-5)
    again = VLMLitModule.from_checkpoint(import_checkpoint(str(folder), tmp_path / "again.ckpt"))
    state_dict_equal(module.model.state_dict(), again.model.state_dict())


def test_init_from_hf_trains_the_imported_model(tokenizer, shapesworld, tmp_path):
    """``vlm-train stage.init_from=hf:<folder>``: the run's model is the folder's architecture
    with its weights (every tensor loaded), its tokenizer the folder's, and it trains."""
    folder = llava_folder(tmp_path / "hf", tokenizer)
    out = tmp_path / "run"
    run_train([*data_overrides(shapesworld), *steps(2, 2), f"stage.init_from=hf:{folder}", "test=false"], out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    model = ckpt["hyper_parameters"]["model"]
    assert (model["llm"]["name"], model["vision_tower"]["image_size"]) == ("llama", 32)
    assert json.loads(ckpt["vlm"]["tokenizer"]["tokenizer.json"])["model"]["vocab"] == tokenizer.get_vocab()
    hf = {k: v for k, v in LlavaForConditionalGeneration.from_pretrained(folder).state_dict().items()}
    ours = {hf_llava._rename(k.removeprefix("model."), to_hf=True): v for k, v in ckpt["state_dict"].items()}
    assert sorted(ours) == sorted(hf)
    tower = [k for k in hf if k.startswith("model.vision_tower.")]
    assert all(torch.equal(ours[k], hf[k]) for k in tower)  # frozen in stage=finetune: as imported
    assert not torch.equal(ours["lm_head.weight"], hf["lm_head.weight"])  # trained


@pytest.mark.parametrize(
    ("overrides", "exported"),
    [
        (["family=layer_fusion", "fusion=E_D", "layers=3-18"], True),
        (["family=dense_connector", "connector=dense_sci"], True),
        (["family=layer_fusion", "fusion=E_M"], "fusion=E_D with a set of single blocks"),
        (["family=layer_fusion", "fusion=I_D"], "fusion=E_D with a set of single blocks"),
        (["family=layer_fusion", "fusion=E_D", "layers=former"], "layers=former averages groups"),
        (["family=dense_connector", "connector=dense_dci"], "connector=dense_sci or mlp2x_gelu exports"),
        (["family=dense_connector", "connector=dense_sti"], "joins pooled states along tokens"),
        (["connector=mlp4x_gelu"], "connector=mlp2x_gelu"),
        (["connector.pool=2"], "connector.pool=1"),
        (["family=calm", "family.model.calm.num_layers=2"], "family=llava"),
        (["image_positions=mrope"], "image_positions=flat exports"),
        (["image_positions=learned2d"], "image_positions=flat exports"),
    ],
)
def test_which_connectors_export(overrides, exported, shapesworld, tokenizer, tmp_path):
    """E_D over single blocks and SCI are HF's list ``vision_feature_layer`` and give our logits;
    group means, modular and internal fusion, token joins and other projectors are refused in
    one line that names what would export."""
    tok = train_tokenizer(["what colour is the shape"] * 10, vocab_size=120)
    cfg = compose_run([*data_overrides(shapesworld), "+encoder.num_hidden_layers=6", *overrides], tmp_path)
    module = build_module(cfg, tok).eval()
    if exported is not True:
        with pytest.raises(hf_llava.NotExportable, match=exported.replace("=", "=").replace("(", r"\(")):
            hf_llava.export(module, tmp_path / "hf")
        return
    folder = hf_llava.export(module, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert isinstance(hf.config.vision_feature_layer, list) and len(hf.config.vision_feature_layer) == 3
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\nwhat colour"}, {"from": "gpt", "value": ""}]
    batch = module.processor.collate_prompts(
        [module.processor.encode_prompt({"image": image(1, 64), "conversations": turns})]
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert (our_logits(module, inputs) - hf(**inputs).logits).abs().max() < 1e-5


def test_hf_errors_are_one_line(tokenizer, tmp_path):
    folder = llava_folder(tmp_path / "hf", tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "llava_next"}))
    with pytest.raises(ValueError, match="is not 'llava'"):
        hf_llava.run_config(str(folder))
    res = cli("vlm-import", ["hf=nobody/no-such-llava", f"out={tmp_path / 'x.ckpt'}"], tmp_path, timeout=120)
    assert res.returncode != 0 and "nobody/no-such-llava" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1
