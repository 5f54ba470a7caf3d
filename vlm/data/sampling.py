"""A training order that survives a restart: a shuffle that is a function of (seed, epoch)
alone and can begin part-way through its epoch, and a loader that counts what it handed out.

The position is counted in the main process, where batches are consumed: a sampler can not
count it, since DataLoader workers draw indices ahead of what the model has seen. Lightning's
fit loop does not prefetch from loaders that have a length, so "handed out" is "trained on".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

MEGABATCH = 50  # batches per length-sorted group, as HF Trainer's LengthGroupedSampler


def length_grouped(order: list[int], lengths: Sequence[int], group: int) -> list[int]:
    """``order`` cut into groups of ``group`` samples, each sorted longest first (HF Trainer's
    ``group_by_length``): a batch holds samples of similar length, so little of it is padding,
    while which group comes when stays as random as ``order``."""
    chunks = (order[i : i + group] for i in range(0, len(order), group))
    return [k for chunk in chunks for k in sorted(chunk, key=lambda k: -lengths[k])]


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle over this rank's shard that skips the first ``start`` samples.

    A ``DistributedSampler`` subclass, so under DDP Lightning keeps it (it only swaps in its
    own sampler when a loader's is not one) and the restored order stays per rank. With
    ``lengths`` (one per sample) the shuffle is length-grouped over megabatches of
    ``batch_size`` x ranks x 50 before it is sharded, so every rank's batches are grouped too.
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0
        self.lengths = lengths
        self.group = batch_size * num_replicas * MEGABATCH

    def _grouped(self) -> Iterator[int]:
        """DistributedSampler's own shuffle, padding and sharding, around a length-grouped order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = length_grouped(
            torch.randperm(len(self.dataset), generator=g).tolist(), self.lengths, self.group
        )
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resume offset belongs to the epoch it was saved in
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__() if self.lengths is None else self._grouped()
        return itertools.islice(order, self.start, None)


class CountingLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` that knows its position in the epoch.

    ``iter()`` is lazy: the sampler is read at the first ``next()``, so the fit loop's
    ``set_epoch``, which comes after it builds the iterator, is honoured even with workers.
    """

    def __iter__(self) -> Iterator[Any]:
        self._epoch, self._base, self._served = self.sampler.epoch, self.sampler.start, 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def position(self) -> dict[str, int]:
        """``epoch`` and ``start``: samples of this rank's shard consumed in that epoch."""
        if not hasattr(self, "_served"):
            return {"epoch": self.sampler.epoch, "start": self.sampler.start}
        consumed = self._base + self._served * self.batch_size
        return {"epoch": self._epoch, "start": min(consumed, len(self.sampler))}

    def state_dict(self) -> dict:
        """Empty: ``VLMDataModule.state_dict`` saves the position, because the datamodule is
        restored before the loader is built and the fit loop's own loader restore is skipped
        when ``configure_optimizers`` reads ``estimated_stepping_batches`` (Lightning #20550).
        Having the method tells the fit loop the loader is resumable, so it does not warn."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to load; see ``state_dict``."""
