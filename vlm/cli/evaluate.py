"""``vlm-eval ckpt=<path>``: a checkpoint scored on its data's test (or val) split, or on a
published benchmark (``benchmark=<name> benchmark.root=<dir>``).

Without a benchmark, the data config saved in the checkpoint is the default; ``data.<key>=...``
overrides it (for example a real LLaVA-format benchmark JSON) without retraining anything.

With one, the benchmark's reader lists the items from its published files (:mod:`vlm.eval`),
``Trainer.predict`` generates the answers in batches, and the benchmark's official scorer gives
the figures; predictions, scores, a results-table row and (where the benchmark has one) the
upload file go to ``<run>/eval/<benchmark>_<split>/``, the figures to wandb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from vlm.cli.common import CONFIG_DIR
from vlm.core.checkpoint import read_checkpoint
from vlm.core.lit_module import VLMLitModule
from vlm.eval.base import Benchmark
from vlm.eval.benchmarks import build_benchmark
from vlm.eval.embedded import embedded
from vlm.eval.outputs import write_outputs
from vlm.eval.runner import generate_answers
from vlm.runtime.errors import said_in_one_line
from vlm.runtime.loggers import resolve_wandb_mode
from vlm.runtime.validate import check_targets


def out_dir(cfg: DictConfig) -> Path:
    """``out_dir``, or ``eval/`` in the run the checkpoint belongs to (``<run>/checkpoints/x.ckpt``),
    so that evaluating never writes into the directory it was started from."""
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    folder = Path(cfg.ckpt).resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    module = VLMLitModule.from_checkpoint(cfg.ckpt)
    given = {key: value for key, value in (cfg.get("data") or {}).items() if value is not None}
    data_cfg = OmegaConf.merge(module.data_config or {}, given)
    check_targets(OmegaConf.create({"data": data_cfg}))
    datamodule = hydra.utils.instantiate(data_cfg)
    if not datamodule.has_split(cfg.split):
        raise SystemExit(f"vlm-eval: the data has no {cfg.split} split: set data.{cfg.split}_json=<file>")
    datamodule.prepare_data()
    datamodule.attach(module.processor)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, default_root_dir=out_dir(cfg), **cfg.trainer
    )
    run = trainer.test if cfg.split == "test" else trainer.validate
    # One dict per loader (the data module's LOSS and GENERATE loaders); metric names are unique.
    return {key: value for loader in run(module, datamodule=datamodule) for key, value in loader.items()}


def benchmark_dir(cfg: DictConfig, benchmark: Benchmark) -> Path:
    """``out_dir`` itself, or ``<run>/eval/<benchmark>_<split>`` (``<benchmark>`` without a split)."""
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    return out_dir(cfg) / "_".join(filter(None, (benchmark.name, benchmark.split)))


def evaluate_benchmark(
    cfg: DictConfig,
) -> tuple[Benchmark, dict[str, Any], dict[str, float], dict[str, Path]]:
    """Read the benchmark (its files checked before the checkpoint is loaded), answer every item,
    score, write the files; (benchmark, score header, figures, written paths)."""
    options = OmegaConf.to_container(cfg.benchmark, resolve=True)
    name, on_bad_sample = options.pop("name"), options.pop("on_bad_sample")
    if not options.get("root"):  # the checkpoint's own ShapesWorld, written in this benchmark's layout
        data = read_checkpoint(cfg.ckpt, mmap=True)["vlm"].get("data")
        check_targets(OmegaConf.create({"data": data}))
        options["root"], options["split"] = embedded(name, data)
    benchmark = build_benchmark(name, **options)
    items = benchmark.items()
    module = VLMLitModule.from_checkpoint(cfg.ckpt)
    chosen = {k: v for k, v in cfg.generation.items() if v is not None}
    module.hparams.generation = {**(module.hparams.generation or {}), **chosen}
    folder = benchmark_dir(cfg, benchmark)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=folder, **cfg.trainer)
    if trainer.world_size > 1:
        raise SystemExit("vlm-eval: a benchmark runs on one device (trainer.devices=1)")
    predictions, skipped = generate_answers(
        module, benchmark, trainer, cfg.batch_size, cfg.num_workers, on_bad_sample
    )
    scores = benchmark.score(predictions)
    header = {
        "benchmark": name,
        "split": benchmark.split,
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "items": len(items),
        "scored": len(benchmark.answered(predictions)),
        "skipped": len(items) - len(predictions),
        "skipped_by_reason": dict(skipped),
    }
    return benchmark, header, scores, write_outputs(folder, benchmark, predictions, scores, header)


def log_to_wandb(header: dict[str, Any], scores: dict[str, float], folder: Path) -> Path:
    """One wandb run in project ``vlm-eval`` per benchmark run, its files under ``folder``:
    offline without credentials (:func:`resolve_wandb_mode`); the run's folder."""
    import wandb  # only benchmark runs that log need it, and it is slow to import

    name = "_".join(filter(None, (header["benchmark"], header["split"])))
    run = wandb.init(
        project="vlm-eval",
        dir=str(folder),
        mode=resolve_wandb_mode(None),
        name=name,
        job_type="eval",
        config=header,
    )
    run.log({f"{header['benchmark']}/{k}": v for k, v in scores.items()})
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise SystemExit(
            "usage: vlm-eval ckpt=<path.ckpt> [split=test|val] [data.<key>=...] [benchmark=<name> ...]"
        )
    if cfg.get("benchmark"):
        with said_in_one_line():
            benchmark, header, scores, paths = evaluate_benchmark(cfg)
        report_benchmark(cfg, benchmark, header, scores, paths)
        return
    with said_in_one_line():
        metrics = evaluate(cfg)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")
    print(f"sample predictions: {out_dir(cfg) / 'predictions'}")


def report_benchmark(
    cfg: DictConfig,
    benchmark: Benchmark,
    header: dict[str, Any],
    scores: dict[str, float],
    paths: dict[str, Path],
) -> None:
    """The figures, the skipped items and where everything went, on the terminal (and wandb)."""
    for key, value in scores.items():
        print(f"{benchmark.name}/{key}: {value:.4f}")
    if not scores:
        answered = any(it.answer is not None for it in benchmark.items())
        why = "every item was skipped" if answered else "the files hold no answers (submit submission.json)"
        print(f"{benchmark.name}: nothing scored: {why}")
    if header["skipped"]:
        reasons = ", ".join(f"{n} {r}" for r, n in header["skipped_by_reason"].items())
        print(f"skipped {header['skipped']} of {header['items']} items ({reasons})")
    folder = paths["score.json"].parent
    print(f"predictions, score and table row: {folder} ({', '.join(paths)})")
    if cfg.wandb:
        print(f"wandb run: {log_to_wandb(header, scores, folder)}")


if __name__ == "__main__":
    main()
