"""Callbacks that tests add to real ``vlm-train`` runs through ``+callbacks.<name>._target_``.

They only observe (or, for ``Preempt``, stop) a run, so what the tests read back is what the
unmodified entry point did: the samples of every optimizer step, per rank, and the final weights.
"""

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch


def sample_digests(batch: dict) -> list[str]:
    """One short digest per sample of a train batch (its unpadded tokens, and its pixels when
    every sample has an image): train batches carry no ids, and equal digests mean the same
    sample."""
    pixels = batch.get("pixel_values")
    towers = list(pixels.values()) if isinstance(pixels, dict) else [] if pixels is None else [pixels]
    if any(len(t) != len(batch["input_ids"]) for t in towers):
        towers = []  # text-only samples in the batch: the tokens alone tell the samples apart
    out = []
    for i, mask in enumerate(batch["attention_mask"].bool()):
        digest = hashlib.sha1(batch["input_ids"][i][mask].numpy().tobytes())
        for tower in towers:  # one tensor, or one per tower (CALM)
            digest.update(tower[i].numpy().tobytes())
        out.append(digest.hexdigest()[:16])
    return out


def state_sha(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor of a state dict in key order: equal iff the weights are."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BatchLog(L.Callback):
    """``batches_rank<r>.jsonl``: the samples each optimizer step trains on, one line per
    step as it starts (so a run that dies still leaves its record); ``state_rank<r>.json``:
    the final global step and the hash of the weights."""

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        line = {"step": trainer.global_step, "samples": sample_digests(batch) if batch else []}
        with open(self._dir(trainer) / f"batches_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "sha": state_sha(pl_module.state_dict()),
        }
        (self._dir(trainer) / f"state_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class Preempted(RuntimeError):
    """What ``Preempt`` raises: the run dies like a job killed by its scheduler."""


class Preempt(L.Callback):
    """Kill the run as optimizer step ``at_step`` is about to start (after any checkpoint the
    previous step wrote), the way a pre-empted job dies: no clean shutdown, no final save."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise Preempted(f"pre-empted at step {self.at_step}")


class PartHashes(L.Callback):
    """``parts_rank<r>.json``: for each named submodule of the LightningModule, the hash of
    its weights when fitting starts, after each epoch and when it ends (what trained, what stayed
    bit-identical)."""

    def __init__(self, parts: Mapping[str, str]) -> None:
        self.parts = dict(parts)  # label -> dotted path in the LightningModule
        self.start: dict[str, str] = {}

    def _hashes(self, pl_module) -> dict[str, str]:
        return {label: state_sha(pl_module.get_submodule(p).state_dict()) for label, p in self.parts.items()}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = self._hashes(pl_module)
        self.epochs: list[dict[str, str]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(self._hashes(pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"start": self.start, "end": self._hashes(pl_module), "epochs": self.epochs}
        path = Path(trainer.default_root_dir) / f"parts_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


class ParamDtypes(L.Callback):
    """``dtypes_rank<r>.json``: each parameter's dtype and ``requires_grad`` inside the loop (at
    the first training batch) and after the fit (at teardown, after every ``on_fit_end``)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.inside: dict[str, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.inside:
            self.inside = {n: [str(p.dtype), p.requires_grad] for n, p in pl_module.named_parameters()}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        after = {n: str(p.dtype) for n, p in pl_module.named_parameters()}
        path = Path(trainer.default_root_dir) / f"dtypes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"inside": self.inside, "after": after}))


class Compiled(L.Callback):
    """``compiled_rank<r>.json``: the submodules wrapped by ``nn.Module.compile`` when training
    starts (what ``family.compile`` compiled, by name)."""

    def on_train_start(self, trainer, pl_module) -> None:
        names = [n for n, m in pl_module.named_modules() if getattr(m, "_compiled_call_impl", None)]
        path = Path(trainer.default_root_dir) / f"compiled_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(names))
