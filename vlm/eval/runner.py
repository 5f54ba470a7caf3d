"""Answers of a module to a benchmark's items: batched generation through ``Trainer.predict``
(Lightning's loop, devices, precision and progress bar), images read by the data loader.

Items go through :class:`~vlm.data.datasets.ConversationDataset`, so a missing or unreadable
image, or a prompt longer than the module's ``max_length``, follows the data's ``on_bad_sample``
policy: skipped, counted by reason and named in a warning, or one line that stops the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from vlm.data.datasets import ConversationDataset
from vlm.eval.base import Benchmark

# The reply turn a conversation record must have; encode_prompt stops before it and never reads it.
UNREAD_REPLY = "-"


def prompt_dataset(
    benchmark: Benchmark, transform: Callable[[dict], Any] | None, on_bad_sample: str = "skip"
) -> ConversationDataset:
    """The benchmark's items as one-turn conversations about their images (absolute or relative
    to the working directory), ``transform`` applied to each sample as it is read."""
    records = [
        {
            "id": it.id,
            "image": str(it.image_path),
            "conversations": [
                {"from": "human", "value": benchmark.prompt(it)},
                {"from": "gpt", "value": UNREAD_REPLY},
            ],
        }
        for it in benchmark.items()
    ]
    source = " ".join(filter(None, (benchmark.name, benchmark.split)))
    return ConversationDataset(records, ".", on_bad_sample, transform, source=source)


def generate_answers(
    module: L.LightningModule,
    benchmark: Benchmark,
    trainer: L.Trainer,
    batch_size: int,
    num_workers: int = 0,
    on_bad_sample: str = "skip",
) -> tuple[dict[str, str], Counter[str]]:
    """``{item id: generated text}`` for every item that could be read, and the skipped ones
    counted by reason. ``module`` needs a ``processor`` and a ``predict_step`` that returns
    ``{"id", "text"}`` per batch (:class:`~vlm.core.lit_module.VLMLitModule`)."""
    processor = module.processor
    dataset = prompt_dataset(benchmark, processor.encode_prompt, on_bad_sample)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=processor.collate_prompts
    )
    outputs = trainer.predict(module, loader)
    answers = {i: text for out in outputs for i, text in zip(out["id"], out["text"], strict=True)}
    return answers, dataset.bad_samples
