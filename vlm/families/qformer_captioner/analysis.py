"""The analysis pictures of a trained captioner, drawn at the end of a test run.

For a few test images: where the Q-Former's tokens look (their last cross-attention layer
over the patches), which tokens each caption word reads (the decoder's gated cross-attention
averaged over its blocks and heads; in prefix mode, the LM's self-attention from the word to
the prefix span), the similarity of the global token and the queries with their
discriminative power (:func:`~vlm.families.qformer_captioner.figures.discriminative_power`),
the images with their captions, and the parameter table. PNGs go to ``<run>/analysis/`` and
to wandb when it logs the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vlm.families.qformer_captioner import figures

FIGURES = ("query_patch_attention", "word_query_attention", "token_similarity", "caption_grid", "parameters")


def images_of(pixel_values: Tensor, mean, std) -> list[np.ndarray]:
    """Undo the encoder's normalisation: (B, 3, H, W) -> H x W x 3 uint8 arrays."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (pixel_values.float().cpu() * s + m).clamp(0, 1)
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]


@torch.no_grad()
def word_attention(module, batch: dict, new_ids: Tensor) -> list[Tensor]:
    """Per image (W_i, T): each generated token's attention over the Q-Former tokens, from a
    teacher-forced pass over prompt + caption."""
    model, pad = module.model, module.tokenizer.pad_token_id
    ids = torch.cat([batch["input_ids"], new_ids], dim=1)
    mask = torch.cat([batch["attention_mask"], (new_ids != pad).long()], dim=1)
    start = batch["input_ids"].shape[1]
    if model.cross:
        model.record_attention(True)
        try:
            model(ids, mask, batch["pixel_values"])
        finally:
            model.record_attention(False)
        maps = torch.stack([m.last_attention for m in model.conditioning.xattn.values()]).mean(0)
    else:
        embeds = model.embed_inputs(ids, batch["pixel_values"])
        llm, impl = model.llm, model.llm.config._attn_implementation
        llm.set_attn_implementation("eager")  # only eager attention returns its weights
        try:
            out = llm.base_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
        finally:
            llm.set_attn_implementation(impl)
        span = ids[0] == model.image_token_id
        maps = torch.stack(out.attentions).mean((0, 2))[:, :, span]  # layers and heads averaged
    lengths = (new_ids != pad).sum(1)
    return [maps[i, start : start + int(n)].float().cpu() for i, n in enumerate(lengths)]


@torch.no_grad()
def query_patches(model, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The Q-Former's tokens for ``pixels`` (B, T, D_q) and their last cross-attention layer
    over the image patches (B, T, P), prefix tokens left out."""
    model.connector.record(True)
    try:
        tokens = model.query_tokens(pixels)
    finally:
        model.connector.record(False)
    cross = [layer.last_attention for layer in model.connector.layers if layer.cross_attn is not None]
    return tokens, cross[-1][..., -model.vision_tower.num_patches :].float().cpu()


def patch_attention_figure(model, pixels: Tensor, title: str | None = None):
    """Where the first image's Q-Former tokens look (:func:`figures.query_patch_attention`)."""
    tower = model.vision_tower
    _, attn = query_patches(model, pixels[:1])
    side = int(round(tower.num_patches**0.5))
    image = images_of(pixels[:1], tower.image_spec.mean, tower.image_spec.std)[0]
    return figures.query_patch_attention(image, attn[0], (side, tower.num_patches // side), title=title)


@torch.no_grad()
def write_analysis(module, batch: dict, run_dir: str | Path, loggers=()) -> dict[str, float]:
    """Draw the figures for ``batch`` (a generation batch); returns the token statistics."""
    model, tokenizer = module.model, module.tokenizer
    tower = model.vision_tower
    pixels = batch["pixel_values"]
    tokens, _ = query_patches(model, pixels)
    new_ids = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        pixels,
        max_new_tokens=module.hparams.caption_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    captions = [c.strip() for c in tokenizer.batch_decode(new_ids, skip_special_tokens=True)]
    words = word_attention(module, batch, new_ids)
    images = images_of(pixels, tower.image_spec.mean, tower.image_spec.std)
    first_words = [tokenizer.decode([t]).strip() or "·" for t in new_ids[0, : len(words[0])].tolist()]
    drawn = {
        "query_patch_attention": patch_attention_figure(model, pixels, title=captions[0]),
        "word_query_attention": figures.word_query_attention(first_words, words[0]),
        "token_similarity": figures.token_similarity(tokens[0].float().cpu()),
        "caption_grid": figures.caption_grid(images, captions, batch.get("references")),
        "parameters": figures.parameter_table(module.parameter_rows()),
    }
    out = Path(run_dir) / "analysis"
    for name, fig in drawn.items():
        path = figures.save_figure(fig, out / f"{name}.png")
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"analysis/{name}", images=[str(path)])
    return figures.discriminative_power(tokens.float().cpu())
