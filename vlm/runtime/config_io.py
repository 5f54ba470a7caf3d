"""Showing and keeping the composed config: a rich tree on the console, resolved YAML in the run dir."""

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# Shown first, in this order; every other top-level key follows in config order.
PRINT_ORDER = ("task_name", "tags", "seed", "family", "encoder", "llm", "connector", "data", "stage")


@rank_zero_only
def print_config_tree(cfg: DictConfig, order: Sequence[str] = PRINT_ORDER, resolve: bool = True) -> None:
    """One branch per top-level key, its value as highlighted YAML; unset (null) groups are left out."""
    tree = rich.tree.Tree("config", style="bold")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        value = cfg[key]
        if value is None:
            continue
        branch = tree.add(str(key), style="bold cyan")
        if OmegaConf.is_config(value):
            text = OmegaConf.to_yaml(value, resolve=resolve)
            branch.add(rich.syntax.Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
        else:
            branch.add(str(value))
    rich.print(tree)


@rank_zero_only
def save_resolved_config(
    cfg: DictConfig, output_dir: str | Path, filename: str = "resolved_config.yaml"
) -> None:
    """Write the resolved config next to the run (``.hydra/config.yaml`` keeps the interpolations)."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
