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
from timm.models import get_pretrained_cfg

from vlm.core.zoo.errors import CheckpointMissingError
from vlm.core.zoo.registry import llm_entry, vision_entry

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


def require_local(hub_id: str, config_key: str, weights: bool = True) -> None:
    """Offline, the checkpoint (``weights``) or tokenizer snapshot ``hub_id`` must be cached:
    checked before anything is built, so a missing one is said in seconds, not after minutes."""
    if not constants.is_offline_mode():
        return
    if weights:
        missing = local_snapshot(hub_id) is None
    else:
        try:
            snapshot_download(hub_id, local_files_only=True)
            missing = False
        except LocalEntryNotFoundError:
            missing = True
    if missing:
        raise CheckpointMissingError.for_hub_id(hub_id, config_key)


def weights_hub_id(kind: str, name: str) -> str | None:
    """Where ``pretrained: true`` takes the weights of zoo entry ``name`` from (``kind``:
    "encoder" or "llm"); None for entries without hub weights (their builders say so)."""
    if kind == "llm":
        return llm_entry(name).hub_id
    entry = vision_entry(name)
    if entry.family != "timm":
        return entry.hub_id
    cfg = get_pretrained_cfg(entry.timm_name)
    return cfg.hf_hub_id if cfg is not None else None
