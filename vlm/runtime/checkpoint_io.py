"""Checkpoint writes that never leave a truncated ``last.ckpt`` behind.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec
transaction. On a local path that transaction stages the bytes in a ``tempfile.mkstemp()``
file (the system temp dir) and ``shutil.move``-s it onto the target: a rename only when the
temp dir and the log dir share a filesystem. On clusters they seldom do (local or tmpfs
``/tmp``, logs on NFS/Lustre), and the move becomes a copy into the live path, so a job killed
mid-copy (preemption, time limit) corrupts the one checkpoint a resume needs; a large
checkpoint also has to fit in ``/tmp`` and, first, in RAM.

``AtomicCheckpointIO`` streams to a temp file in the target's own directory, fsyncs it and
``os.replace``-s it onto the target, which POSIX makes atomic. Remote URLs keep Lightning's path.
"""

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-temp-then-rename in the same directory."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry) across a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """The temp files of writes whose process is gone (killed mid-write), removed."""
    removed = []
    for tmp in Path(directory).glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
