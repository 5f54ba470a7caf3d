"""``vlm-bench compare=hf``: our model beside transformers' ``LlavaForConditionalGeneration``
holding a copy of the same weights, doing the same work on the same batches.

Our side is what training and ``vlm-predict`` run: the model's forward with labels (the LM head
on target positions only) and its ``generate``; HF's is its own forward (full-vocabulary logits,
its own label shift) and ``generate``. Before anything is timed, the first warm-up round checks
that both give the same loss and the same greedy tokens, so the ratios compare equal work.
Rounds interleave the two sides (alternating which goes first), so a machine that slows down
mid-run slows both; each figure is the median over rounds with its min–max.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from vlm.bench.device import synchronize
from vlm.core.hf_llava import NotExportable, hf_config, hf_state_dict
from vlm.core.optim import build_optimizer, decay_groups
from vlm.core.recipes import keep_frozen_in_eval
from vlm.runtime.errors import ConfigError

LOSS_RTOL = 1e-5
PROMPT_INPUTS = ("input_ids", "attention_mask", "pixel_values")
MAPS = (
    "family=llava (image_positions=flat), layer_fusion with fusion=E_D "
    "and dense_connector with connector=dense_sci"
)


class NotEquivalent(ConfigError):
    """HF's model does not compute what ours does: timing it would compare different work."""


def check_maps(model: nn.Module) -> None:
    """Refuse, in one line naming what maps, a model HF's LLaVA cannot express; cheap (no
    weights are copied), so it runs before the benchmark does."""
    if not hasattr(model, "hf_llava_layout"):
        raise ConfigError(f"compare=hf: {type(model).__name__} has no HF LLaVA counterpart; {MAPS} map")
    if model.image_positions.name != "flat":
        raise ConfigError(
            f"compare=hf: image_positions={model.image_positions.name} has no place in HF LLaVA; {MAPS} map"
        )
    try:
        _, projector = hf_config(model)
    except NotExportable as err:
        raise ConfigError(f"compare=hf: {err}") from None
    if model.llm.base_model_prefix != "model":  # GPT-2's "transformer.": no place in HF LLaVA's names
        raise ConfigError(
            f"compare=hf: a {model.llm.config.model_type} LLM has no place in HF LLaVA's weights; "
            "llm=tiny_llama, tiny_qwen2 or another llama/mistral/qwen2 entry maps"
        )
    if trained(model) - {v.data_ptr() for v in hf_state_dict(model, projector).values()}:
        raise ConfigError(
            "compare=hf: the model trains tensors HF LLaVA does not have (LoRA adapters); "
            "stage.tune.llm.type=full or frozen maps"
        )


def trained(model: nn.Module) -> set[int]:
    """The trained tensors, by storage: HF's state dict holds the same tensors as ours."""
    return {p.data_ptr() for p in model.parameters() if p.requires_grad}


def hf_twin(model: nn.Module, device: torch.device) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with a copy of ``model``'s weights in their dtypes (tied ones stay
    tied), trained where ``model`` trains and frozen where it is frozen."""
    config, projector = hf_config(model)
    state = hf_state_dict(model, projector)
    with torch.device(device), no_init_weights():  # buffers (rotary frequencies) built, weights left empty
        hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    hf.tie_weights()
    ours = trained(model)
    for name, p in hf.named_parameters():
        p.requires_grad_(state[name].data_ptr() in ours)
    return hf


class Side:
    """One model's optimizer step and greedy generation, timed on the device's clock."""

    def __init__(
        self, model: nn.Module, loss: Callable[[], Tensor], generate: Callable[[dict], Tensor],
        optimizer: torch.optim.Optimizer, parts: list[nn.Module], context: Callable,
    ):  # fmt: skip
        self.model, self.loss, self.generate, self.optimizer = model, loss, generate, optimizer
        self.parts, self.context = parts, context

    def step(self) -> float:
        self.model.train()
        keep_frozen_in_eval(self.parts)
        with self.context():
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def tokens(self, prompts: dict) -> Tensor:
        self.model.eval()
        with torch.no_grad(), self.context():
            return self.generate(prompts)


def sides(module: L.LightningModule, batch: dict, kwargs: dict, context: Callable) -> tuple[Side, Side]:
    """Ours and HF's, each with an optimizer built from the run's optimizer config over its
    own trained parameters (AdamW's decay groups as training makes them)."""
    model = module.model
    hf = hf_twin(model, module.device)
    optimizer = hydra.utils.instantiate(module.hparams.optimizer)

    def new_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(optimizer, decay_groups(p for p in m.parameters() if p.requires_grad))

    ours = Side(
        module, lambda: module(batch)["loss"], lambda p: model.generate(**p, **kwargs),
        new_optimizer(module), list(model.parts().values()), context,
    )  # fmt: skip
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    theirs = Side(
        hf, lambda: hf(**inputs).loss, lambda p: hf.generate(**p, **kwargs)[:, p["input_ids"].shape[1] :],
        new_optimizer(hf), list(hf.model.children()) + [hf.lm_head], context,
    )  # fmt: skip
    return ours, theirs


def check_equal(ours: Side, theirs: Side, prompts: dict[int, dict]) -> dict[str, Any]:
    """Greedy tokens first (while the weights are still identical), then the loss of one
    optimizer step from the same weights; either differing refuses the comparison."""
    for size, p in prompts.items():
        a, b = ours.tokens(p), theirs.tokens(p)
        if a.shape != b.shape:
            raise NotEquivalent(
                f"compare=hf: HF's greedy tokens at batch {size} have shape {tuple(b.shape)}, ours "
                f"{tuple(a.shape)}; not timing"
            )
        if not torch.equal(a, b):
            raise NotEquivalent(
                f"compare=hf: HF's greedy tokens differ from ours at batch {size} "
                f"({(a != b).sum().item()} of {a.numel()} tokens); not timing"
            )
    loss, hf_loss = ours.step(), theirs.step()
    rel = abs(hf_loss - loss) / max(abs(loss), 1e-12)
    if rel > LOSS_RTOL:
        raise NotEquivalent(
            f"compare=hf: HF's loss {hf_loss:.7g} differs from ours {loss:.7g} by {rel:.2e} relative "
            f"(tolerance {LOSS_RTOL:g}); not timing"
        )
    return {"loss": loss, "hf_loss": hf_loss, "loss_rel_diff": rel, "tokens_equal_at_batch": list(prompts)}


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def figures(ours: list[float], hf: list[float]) -> dict[str, Any]:
    ratios = [t / o for o, t in zip(ours, hf, strict=True)]
    return {
        "ours_s": ours, "hf_s": hf, "ratios": ratios,
        "ours_median_s": statistics.median(ours), "hf_median_s": statistics.median(hf),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }  # fmt: skip


def compare(
    module: L.LightningModule, batch: dict, prompts: dict[int, dict], kwargs: dict,
    context: Callable, device: torch.device, warmup: int, rounds: int,
) -> dict[str, Any]:  # fmt: skip
    """The side-by-side figures: ``warmup`` untimed rounds (the first one checked), then
    ``rounds`` timed ones of a train step on ``batch`` and generation on each prompt batch."""
    if warmup < 1 or rounds < 1:
        raise ConfigError(
            f"compare=hf needs bench.warmup >= 1 and bench.compare_rounds >= 1, got {warmup}, {rounds}"
        )
    module.to(device)
    prompts = {n: {k: p[k] for k in PROMPT_INPUTS} for n, p in prompts.items()}
    batch, prompts = move_data_to_device((batch, prompts), device)
    ours, hf = sides(module, batch, kwargs, context)
    work = {f"train_step_b{batch['input_ids'].shape[0]}": Side.step} | {
        f"generate_b{n}": lambda side, p=p: side.tokens(p) for n, p in prompts.items()
    }
    checked = check_equal(ours, hf, prompts)
    for _ in range(warmup - 1):
        for run in work.values():
            run(ours), run(hf)
    times = {name: {ours: [], hf: []} for name in work}
    for r in range(rounds):
        for name, run in work.items():
            for side in (ours, hf) if r % 2 == 0 else (hf, ours):
                times[name][side].append(timed(lambda: run(side), device))  # noqa: B023 (called at once)
    return {
        "checked": checked, "warmup_rounds": warmup, "rounds": rounds, "new_tokens": kwargs["max_new_tokens"],
        "cache_implementation": kwargs.get("cache_implementation", "dynamic"),
        "work": {name: figures(t[ours], t[hf]) for name, t in times.items()},
    }  # fmt: skip


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _span(seconds: list[float]) -> str:
    return f"{_ms(statistics.median(seconds))} ({_ms(min(seconds))}–{_ms(max(seconds))})"


def print_compare(c: dict[str, Any], console: Console | None = None) -> None:
    """One row per workload: medians with their min–max over rounds; a ratio > 1: ours is faster."""
    table = Table(
        title=f"compare=hf, {c['rounds']} rounds; generate: {c['new_tokens']} new tokens, "
        f"{c['cache_implementation']} cache"
    )
    for column in ("work", "ours ms", "HF ms", "HF / ours"):
        table.add_column(column, justify="left" if column == "work" else "right")
    for name, f in c["work"].items():
        ratio = f"{f['ratio']:.2f}x ({f['ratio_min']:.2f}–{f['ratio_max']:.2f})"
        table.add_row(name, _span(f["ours_s"]), _span(f["hf_s"]), ratio)
    (console or Console()).print(table)
