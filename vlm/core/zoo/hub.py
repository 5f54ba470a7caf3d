"""Pretrained resolution: where an entry's weights come from, kept apart from construction.

The local HF cache is always tried first, so an offline machine with a warm cache works
without any flag. Only when the cache has no weights and the hub is reachable is the
download left to the loader; any failure then is a ``CheckpointMissingError``.
"""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from vlm.core.zoo.errors import CheckpointMissingError

T = TypeVar("T")

# A snapshot holding only a tokenizer or config (cached by another loader) has no weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def local_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder of ``hub_id`` if it holds weight files, else None."""
    try:
        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return folder if any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()) else None


def load_pretrained(load: Callable[[str], T], hub_id: str, config_key: str) -> T:
    """``load(source)`` with the local snapshot folder, or with ``hub_id`` when online.

    ``config_key`` names the setting that avoids the download, for the error message.
    """
    folder = local_snapshot(hub_id)
    if folder is not None:
        return load(str(folder))
    if constants.is_offline_mode():
        raise CheckpointMissingError.for_hub_id(hub_id, config_key)
    try:
        return load(hub_id)
    except OSError as err:
        raise CheckpointMissingError.for_hub_id(hub_id, config_key) from err
