"""``vlm-predict ckpt=<path> input=<folder | LLaVA JSON | JSONL> output=<file.jsonl>``: every input
answered in batches (left-padded prompts, the same ``generate`` as one image at a time), one JSON
line per input in input order: ``{id, image, question, answer | error, generation}``.

Resuming: lines are written whole and flushed after every batch, in input order, so a killed run
leaves the answers of a prefix of the inputs (at most a last line cut short, which is dropped).
A rerun with the same ``output`` checks that its ids are the first inputs' and that it was written
with the same generation settings, then appends from the first missing input; no line is
rewritten, so an input that got an error keeps it (remove its lines to ask again).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from lightning.pytorch.utilities import move_data_to_device
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader, Dataset

from vlm.cli.load import load_for
from vlm.cli.predict_inputs import BadImage, Item, read_image, read_inputs
from vlm.core.lit_module import VLMLitModule
from vlm.core.processor import VLMProcessor
from vlm.data.datasets import SkipSample
from vlm.runtime.errors import ConfigError


class Prompts(Dataset):
    """Items → ``(item, prompt)``; one that cannot be asked comes back with its error and no prompt."""

    def __init__(self, items: list[Item], processor: VLMProcessor, reads_question: bool):
        self.items, self.processor, self.reads_question = items, processor, reads_question

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[Item, dict | None]:
        item = self.items[k]
        if item.error:
            return item, None
        if self.reads_question and not (item.question or "").strip():
            return replace(item, error="no question: give one in the record, or question= for all"), None
        try:
            return item, self.processor.encode_question(read_image(item.path), item.question or "")
        except (BadImage, SkipSample) as err:
            return replace(item, error=str(err)), None


def collate(processor: VLMProcessor, pairs: list[tuple[Item, dict | None]]) -> tuple[list[Item], dict]:
    """The batch's items, and the prompts of those without an error collated (``{}`` if none)."""
    return [item for item, _ in pairs], processor.collate_prompts([p for _, p in pairs])


def generation_settings(module: VLMLitModule, given: DictConfig) -> dict:
    """What ``module.generate`` decodes with: ``generation.*`` over the trained settings, as JSON."""
    settings = module.generation_settings(**{k: v for k, v in given.items() if v is not None})
    return json.loads(json.dumps(settings))


def written(output: Path, ids: list[str]) -> list[dict]:
    """The lines an earlier run wrote to ``output`` (a last line cut short by a kill is dropped from
    the file), checked to answer the first inputs."""
    if not output.exists():
        return []
    data = output.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(output, "r+b") as f:
            f.truncate(len(whole))
    try:
        lines = [json.loads(line) for line in whole.decode("utf-8").splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"vlm-predict: output={output} is no vlm-predict output ({err}): "
            "give another output= or remove it"
        ) from None
    got = [line.get("id") if isinstance(line, dict) else None for line in lines]
    if got != ids[: len(got)]:
        k = next(k for k, i in enumerate(got) if k >= len(ids) or i != ids[k])
        raise ConfigError(
            f"vlm-predict: output={output} answers other inputs (its line {k + 1} is not input {k + 1}): "
            "give another output= or remove it"
        )
    return lines


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def predict_batch(cfg: DictConfig) -> None:
    if not cfg.output:
        raise ConfigError("vlm-predict: input= needs output=<file.jsonl> to write the answers to")
    if isinstance(cfg.question, ListConfig):
        raise ConfigError("vlm-predict: with input= give one question (question='...'), asked of every image")
    source, output = Path(cfg.input), Path(cfg.output)
    question = None if cfg.question is None else str(cfg.question)
    items = read_inputs(source, question, cfg.image_folder)
    done = written(output, [item.id for item in items])
    if len(done) == len(items):
        print(f"all {len(items)} inputs are answered in {output}: nothing to do")
        return
    module = load_for("vlm-predict", cfg.ckpt, cfg.device)
    if module.reads_question and source.is_dir() and not (question or "").strip():
        raise ConfigError(
            f"vlm-predict: {cfg.ckpt} answers questions: "
            f"give question='...' to ask of every image in {source}"
        )
    settings = generation_settings(module, cfg.generation)
    for line in done:
        if line.get("generation") != settings:
            raise ConfigError(
                f"vlm-predict: output={output} was written with generation {line.get('generation')}, "
                f"this run's is {settings}: give the same generation.* or another output="
            )
    todo = items[len(done) :]
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    errors = write_answers(module, todo, output, settings, cfg, len(done))
    wall = time.perf_counter() - start
    resumed = f" after the {len(done)} already there" if done else ""
    print(
        f"{len(todo)} inputs{resumed} in {wall:.1f} s ({len(todo) / wall:.2f} items/s), "
        f"{errors} with an error: {output}"
    )


def write_answers(
    module: VLMLitModule, items: list[Item], output: Path, settings: dict, cfg: DictConfig, done: int
) -> int:
    """Append one line per item to ``output``, flushed batch by batch; the number of errors."""
    loader = DataLoader(
        Prompts(items, module.processor, module.reads_question),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=partial(collate, module.processor),
    )
    errors = 0
    with open(output, "a", encoding="utf-8") as f, progress_bar() as bar:
        task = bar.add_task("answering", total=done + len(items), completed=done)
        for batch_items, batch in loader:
            asked = move_data_to_device(batch, module.device)
            answers = iter(module.generate(asked, **settings) if batch else [])
            for item in batch_items:
                line = {"id": item.id, "image": item.image, "question": item.question}
                line |= {"error": item.error} if item.error else {"answer": next(answers)}
                f.write(json.dumps(line | {"generation": settings}) + "\n")
            f.flush()
            errors += sum(bool(item.error) for item in batch_items)
            bar.advance(task, len(batch_items))
    return errors
