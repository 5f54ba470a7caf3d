"""Pictures of what the segmenter does: image | ground truth | prediction for the first
validation (and test) samples, saved as ``<run>/overlays/<split>_step<N>.png`` and logged to
wandb as images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import Tensor

DIM, IGNORED = 0.2, (128, 128, 128)


def spotlight(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image lit inside ``mask`` and dimmed outside: readable whatever the shapes' colours
    (a coloured overlay vanishes on a shape of its own colour)."""
    out = image.astype(np.float32) * DIM
    out[mask] = image[mask]
    return out.astype(np.uint8)


def panel(image: Tensor | None, target: Tensor, pred: Tensor) -> Image.Image:
    """One row: the image, the target (ignored pixels grey), the prediction; at the mask's size."""
    size = target.shape[-1]
    if image is None:
        rgb = np.full((size, size, 3), 255, np.uint8)
    else:
        rgb = (image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    t = target.cpu().numpy()
    truth = spotlight(rgb, t == 1)
    truth[t == 255] = IGNORED
    guess = spotlight(rgb, pred.cpu().numpy().astype(bool))
    return Image.fromarray(np.concatenate([rgb, truth, guess], axis=1))


class Overlays:
    """Collects up to ``size`` rows (image | target | prediction, caption) in an evaluation epoch."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[tuple[Image.Image, str]] = []

    def add(
        self, pictures: Tensor | None, batch: dict, predictions: list[Tensor], prompts: list[str]
    ) -> None:
        """Samples spread evenly over the batch (the expressions of one image sit together, so
        the first few would all show it); ``prompts``: each sample's text, the row's caption."""
        counts = batch["masks_per_sample"].tolist()
        step = max(1, len(counts) // self.size)
        for i in range(0, len(counts), step):
            if len(self.rows) >= self.size:
                return
            m = sum(counts[:i])  # the sample's first mask
            image = None if pictures is None else pictures[i]
            caption = f"{batch['id'][i]} ({batch['meta'][i].get('qtype', '')}): {prompts[i]}"
            self.rows.append((panel(image, batch["masks"][m], predictions[m]), caption))

    def flush(self, trainer: L.Trainer, split: str, step: int) -> Path | None:
        rows, self.rows = self.rows, []
        if not rows or not trainer.is_global_zero or trainer.sanity_checking:
            return None
        w, h = rows[0][0].size
        sheet = Image.new("RGB", (w, h * len(rows)), (255, 255, 255))
        for k, (img, _) in enumerate(rows):
            sheet.paste(img, (0, k * h))
        out = Path(trainer.default_root_dir) / "overlays" / f"{split}_step{step}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(f"{split}/overlays", [img for img, _ in rows], caption=[c for _, c in rows])
        return out
