"""``vlm-bench``: training throughput, peak memory, MFU and generation latency of any
experiment config, on synthetic batches of the configured shape (no data on disk).

    vlm-bench                                     # the tiny default, on whatever device
    vlm-bench size=real encoder=clip_vit_l14_336 llm=tinyllama_1.1b stage=finetune \\
        trainer=gpu trainer.precision=bf16-mixed  # LLaVA-1.5 finetune shape, random weights
    vlm-bench compare=hf                          # beside transformers' LLaVA with our weights

The steps run through a Lightning ``Trainer`` built from the ``trainer`` group (precision,
accumulation, strategy as in training) with the module ``vlm-train`` would build; loggers
and callbacks are left out so checkpointing or logging never lands inside the timed window.
Figures go to stdout and, with the device, versions and overrides, to ``bench.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from vlm.bench import compare_hf
from vlm.bench.device import device_name, peak_tflops
from vlm.bench.meter import GenerationMeter, StepMeter
from vlm.bench.synthetic import corpus, synthetic_batches
from vlm.cli.build import build_module, build_tokenizer
from vlm.cli.common import CONFIG_DIR, quote_numeric_options, unknown_option
from vlm.core.schema import TrainConf
from vlm.core.tokenizer import IGNORE_INDEX
from vlm.core.zoo.registry import LLM_ENTRIES
from vlm.runtime.errors import ConfigError, said_in_one_line
from vlm.runtime.trainer import make_trainer
from vlm.runtime.validate import validate

GIB = 2**30


@dataclass
class BenchConf:
    """The ``bench`` block of ``conf/bench.yaml`` (documented there)."""

    batch_size: int = 8
    text_len: int = 512  # text tokens per sample besides the image span
    warmup: int = 3  # untimed steps; the first is FLOP-counted
    steps: int = 10
    generate_tokens: int = 32
    generate_repeats: int = 3
    cache_implementation: str | None = None  # transformers' KV cache kind for generation
    vocab_size: Any = "auto"  # "auto" | int | null, see conf/bench.yaml
    peak_tflops: float | None = None  # overrides the device table
    compare: str | None = None  # null | hf
    compare_rounds: int = 5
    compare_batch: int | None = None  # the large generation batch; null: batch_size


@dataclass
class BenchRunConf(TrainConf):
    bench: BenchConf = field(default_factory=BenchConf)
    compare: str | None = None  # ``vlm-bench compare=hf``: bench.compare's short form


# conf/bench.yaml composes conf/train.yaml, whose first default is the strict ``_train_schema``;
# in this process that schema gains the ``bench`` block, so its keys are checked like any other.
ConfigStore.instance().store(name="_train_schema", node=BenchRunConf)


def real_vocab_size(cfg: DictConfig, tokenizer) -> int | None:
    """The LLM's own vocabulary when it is built at real size around a tokenizer trained
    in-process (which has no ``name_or_path``): its embeddings, LM head and their optimizer
    state then have their real size."""
    if tokenizer.name_or_path or OmegaConf.select(cfg, "llm.preset") != "real":
        return None
    entry = LLM_ENTRIES.get(OmegaConf.select(cfg, "llm.name"))
    return entry.arch.get("vocab_size") if entry else None


def bench_tokenizer(cfg: DictConfig):
    tokenizer = build_tokenizer(cfg, corpus())
    size = real_vocab_size(cfg, tokenizer) if cfg.bench.vocab_size == "auto" else cfg.bench.vocab_size
    if size and size > len(tokenizer):
        tokenizer.add_tokens([f"<bench_{i}>" for i in range(size - len(tokenizer))], special_tokens=True)
    return tokenizer


def bench_trainer(cfg: DictConfig, callbacks: list[L.Callback], output_dir: str) -> L.Trainer:
    """The configured trainer (precision, accumulation, strategy, frozen dtype as in training)
    with the loop length set by the bench, and no validation, checkpointing or logging inside it."""
    loop = dict(
        max_steps=cfg.bench.warmup + cfg.bench.steps,
        max_epochs=1,
        max_time=None,
        fast_dev_run=False,
        limit_train_batches=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,  # the module prints its own parameter table
        default_root_dir=output_dir,
    )  # fmt: skip
    return make_trainer(cfg, callbacks, overrides=loop, harness=False)


def compare_prompts(processor, b: DictConfig, seed: int) -> dict[int, dict]:
    """Generation batches for ``compare=hf``: one prompt, and the large batch."""
    sizes = sorted({1, b.compare_batch or b.batch_size})
    return {n: synthetic_batches(processor, n, b.text_len, seed)[1] for n in sizes}


def bench(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Build the module, run ``warmup + steps`` optimizer steps, then the generation benchmark;
    with ``compare=hf``, then the same work side by side with transformers' LLaVA."""
    b = cfg.bench
    if b.compare not in (None, "hf"):
        raise ConfigError(f"bench.compare={b.compare}: choose from hf or null")
    seed = cfg.seed if cfg.seed is not None else 0
    L.seed_everything(seed, workers=True)
    tokenizer = bench_tokenizer(cfg)
    module = build_module(cfg, tokenizer)
    if b.compare:
        compare_hf.check_maps(module.model)
    batch, prompts = synthetic_batches(module.processor, b.batch_size, b.text_len, seed)
    steps = StepMeter(b.warmup, b.steps)
    generation = GenerationMeter(
        prompts,
        b.generate_tokens,
        b.generate_repeats,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        b.cache_implementation,
    )
    trainer = bench_trainer(cfg, [steps, generation], output_dir)
    n_batches = (b.warmup + b.steps) * trainer.accumulate_grad_batches
    trainer.fit(module, train_dataloaders=DataLoader([batch] * n_batches, batch_size=None))
    if len(steps.step_times) != b.steps:
        raise RuntimeError(f"the trainer stopped at step {trainer.global_step}, inside the timed window")
    result = {
        "device": device_name(trainer.strategy.root_device),
        "accelerator": trainer.strategy.root_device.type,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "versions": {p: version(p) for p in ("torch", "transformers", "lightning")},
        "batch_size": b.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "image_tokens": module.processor.num_image_tokens,
        "text_len": b.text_len,
        "seq_len": batch["input_ids"].shape[1],
        "target_tokens_per_batch": int((batch["labels"] != IGNORE_INDEX).sum()) if "labels" in batch else 0,
        "vocab_size": len(tokenizer),
        "parameters": {
            r["component"]: {"total": r["total"], "trainable": r["trainable"]}
            for r in module.parameter_rows()
        },
        "warmup_steps": b.warmup,
        "timed_steps": b.steps,
        **training_figures(steps, batch, trainer, b.peak_tflops),
        "generate": generation_figures(generation, prompts),
    }
    if b.compare:
        prompts_hf = compare_prompts(module.processor, b, seed)
        context, device = trainer.precision_plugin.forward_context, trainer.strategy.root_device
        result["compare_hf"] = compare_hf.compare(
            module, batch, prompts_hf, generation.kwargs, context, device, b.warmup, b.compare_rounds
        )
    return result


def training_figures(steps: StepMeter, batch: dict, trainer: L.Trainer, peak: float | None) -> dict[str, Any]:
    """Rates over the timed window; samples and tokens count every rank's batches."""
    device = trainer.strategy.root_device
    window = sum(steps.step_times)
    batches = steps.batches * trainer.world_size
    step_time = window / len(steps.step_times)
    achieved = steps.flops / step_time / 1e12  # per device: each rank counts its own step
    if peak is None and device.type == "cuda":
        peak = peak_tflops(device_name(device))
    return {
        "step_time_s": step_time,
        "step_time_median_s": statistics.median(steps.step_times),
        "samples_per_s": batches * batch["input_ids"].shape[0] / window,
        "tokens_per_s": batches * int(batch["attention_mask"].sum()) / window,  # non-pad tokens
        "flops_per_step": steps.flops,
        "tflops_per_s": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": steps.peak_memory[0] / GIB,
        "peak_memory_kind": steps.peak_memory[1],
    }


def generation_figures(generation: GenerationMeter, prompts: dict) -> dict[str, Any] | None:
    if not generation.times:  # the model generates no text
        return None
    seconds = statistics.fmean(generation.times)
    batch_size, prompt_len = prompts["input_ids"].shape
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": generation.new_tokens,
        "cache_implementation": generation.kwargs.get("cache_implementation", "dynamic"),
        "repeats": len(generation.times),
        "ms_per_batch": 1000 * seconds,
        "tokens_per_s": batch_size * generation.new_tokens / seconds,
        "encode_ms_per_image": 1000 * statistics.fmean(generation.encode_times) / batch_size,
        "peak_memory_gib": generation.peak_memory[0] / GIB,
    }


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def print_figures(r: dict[str, Any], console: Console | None = None) -> None:
    g = r["generate"]
    mfu = f"{100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} TFLOP/s" if r["mfu"] else "n/a"
    rows = [
        ("device", f"{r['device']} x{r['world_size']}, {r['precision']}"),
        ("batch", f"{r['batch_size']} x ({r['image_tokens']} image + {r['text_len']} text tokens)"),
        ("step time", f"{1000 * r['step_time_s']:.1f} ms (median {1000 * r['step_time_median_s']:.1f})"),
        ("samples/s", _rate(r["samples_per_s"])),
        ("tokens/s", _rate(r["tokens_per_s"])),
        ("FLOPs/step", f"{r['flops_per_step']:.3e} ({r['tflops_per_s']:.3g} TFLOP/s)"),
        ("MFU", mfu),
        ("peak memory", f"{r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})"),
    ]
    if g:
        rows += [
            (
                "generate",
                f"{g['ms_per_batch']:.1f} ms per batch of {g['batch_size']} x {g['new_tokens']} tokens",
            ),
            ("generate tokens/s", _rate(g["tokens_per_s"])),
            ("encode images", f"{g['encode_ms_per_image']:.2f} ms per image (batch of {g['batch_size']})"),
        ]
    table = Table(title="vlm-bench")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def _main(cfg: DictConfig) -> dict[str, Any]:
    hydra_cfg = HydraConfig.get()
    output_dir = cfg.paths.output_dir
    with said_in_one_line():
        validate(cfg, data=False)  # a benchmark reads no data files
        result = bench(cfg, output_dir)
    overrides = list(hydra_cfg.overrides.task)
    result |= {
        "command": " ".join(["vlm-bench", *overrides]),
        "overrides": overrides,
        "choices": {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")},
    }
    print_figures(result)
    if "compare_hf" in result:
        compare_hf.print_compare(result["compare_hf"])
    out = Path(output_dir) / "bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures: {out}")
    return result


def main() -> None:
    """``vlm-bench``: Hydra's command line, with number-named options (``layers=18``) quoted."""
    if wrong := unknown_option(sys.argv):
        sys.exit(f"vlm-bench: {wrong}")
    sys.argv = quote_numeric_options(sys.argv)
    _main()


if __name__ == "__main__":
    main()
