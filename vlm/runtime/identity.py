"""A run's name, tags and group, read from the options Hydra composed.

The name joins the chosen model and data options, ``{family}_{encoder}_{llm}_{data}``, so a
wandb table reads like the seed papers' tables (an experiment may set ``run_name`` to the
seed's own, e.g. ``siglip_14_665k``); the tags are the chosen options as
``group:option`` (filterable; bookkeeping groups aside), plus the config's own ``tags``. A
multirun job gets its sweep folder as group and its job number in the name, so the runs of
one ablation sit together.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

NAME_GROUPS = ("family", "encoder", "llm", "data")
# Groups that say where a run writes, not what it is: no tags for them.
UNTAGGED = ("hydra", "paths", "logger", "callbacks")


@dataclass(frozen=True)
class RunIdentity:
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None


def run_name(choices: Mapping[str, str | None], fallback: str, groups: Sequence[str] = NAME_GROUPS) -> str:
    """``{family}_{encoder}_{llm}_{data}`` from the chosen options; ``fallback`` if none is chosen."""
    parts = [str(choices[g]).replace("/", "-") for g in groups if choices.get(g)]
    return "_".join(parts) or fallback


def choice_tags(choices: Mapping[str, str | None]) -> list[str]:
    """``group:option`` for every chosen option, bookkeeping groups (``UNTAGGED``) aside."""
    return [
        f"{group}:{option}"
        for group, option in choices.items()
        if option and group.split("/")[0] not in UNTAGGED
    ]


def run_identity(cfg: DictConfig) -> RunIdentity:
    """Name, tags and group of the current Hydra job (just the task name outside Hydra)."""
    task_name = cfg.get("task_name", "run")
    user_tags = list(cfg.get("tags") or [])
    if not HydraConfig.initialized():
        return RunIdentity(name=task_name, tags=user_tags)
    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    name = cfg.get("run_name") or run_name(choices, fallback=task_name)
    group = None
    if hc.mode == RunMode.MULTIRUN:
        name = f"{name}-{hc.job.num}"
        group = f"{task_name}-{Path(hc.sweep.dir).name}"
    return RunIdentity(name=name, tags=list(dict.fromkeys([*user_tags, *choice_tags(choices)])), group=group)
