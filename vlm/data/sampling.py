"""A training order that survives a restart: a shuffle that is a function of (seed, epoch)
alone and can begin part-way through its epoch, and a loader that counts what it handed out.

The position is counted in the main process, where batches are consumed: a sampler can not
count it, since DataLoader workers draw indices ahead of what the model has seen. Lightning's
fit loop does not prefetch from loaders that have a length, so "handed out" is "trained on".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle over this rank's shard that skips the first ``start`` samples.

    A ``DistributedSampler`` subclass, so under DDP Lightning keeps it (it only swaps in its
    own sampler when a loader's is not one) and the restored order stays per rank.
    """

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resume offset belongs to the epoch it was saved in
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


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
