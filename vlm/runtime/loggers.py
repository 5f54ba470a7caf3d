"""Loggers from the ``logger`` group, with wandb's mode, name, group and tags filled per run.

wandb defaults to offline when no credentials are configured, so a laptop, CI or an air-gapped
node never blocks on a login prompt and still keeps a syncable run (``wandb sync <dir>``);
with credentials it goes online. ``WANDB_MODE`` or an explicit ``logger.wandb.mode`` win.
"""

import netrc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from vlm.runtime.identity import RunIdentity

_WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
_WANDB_MODES = ("online", "offline", "disabled", "shared")


def wandb_credentials_present() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file has an entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: str | None) -> str:
    """The configured mode, else ``WANDB_MODE``, else online with credentials and offline without."""
    mode = (
        configured or os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
    )
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in _WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {_WANDB_MODES}, got {mode!r}")
    return mode


def _wandb_overrides(cfg: DictConfig, identity: RunIdentity) -> dict[str, Any]:
    return {
        "mode": resolve_wandb_mode(cfg.get("mode")),
        "name": cfg.get("name") or identity.name,
        "group": cfg.get("group") or identity.group,
        "tags": list(dict.fromkeys([*cfg.get("tags", []), *identity.tags])),
    }


def instantiate_loggers(logger_cfg: DictConfig | None, identity: RunIdentity | None = None) -> list[Logger]:
    """One Lightning logger per entry of the ``logger`` group (empty for ``logger=none``)."""
    identity = identity or RunIdentity()
    loggers: list[Logger] = []
    for key, entry in (logger_cfg or {}).items():
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"logger.{key} needs a _target_, got {entry!r}")
        overrides = _wandb_overrides(entry, identity) if entry._target_ == _WANDB_TARGET else {}
        loggers.append(hydra.utils.instantiate(entry, **overrides))
    return loggers


def log_resolved_config(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    """Record the whole resolved config as hyper-parameters: configs, never modules."""
    loggers = list(loggers)
    if not loggers:
        return
    params: Any = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for logger in loggers:
        logger.log_hyperparams(params)
