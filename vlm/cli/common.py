"""What every entry point shares, set up on import, before ``@hydra.main`` composes anything:
where ``conf/`` lives, the structured-config schemas, every family's classes (the names configs
and checkpoints may use), and ``PROJECT_ROOT`` (``paths.root_dir``), so runs land in the
repository's ``logs/`` whatever the working directory.

    from vlm.cli.common import CONFIG_DIR

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def main(cfg: DictConfig) -> None: ...
"""

import logging
import os
import warnings
from pathlib import Path

import vlm.families  # noqa: F401  (registers every family's classes)
from vlm.core.schema import register_schemas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")

os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
register_schemas()


def _not_asked_for(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return "litlogger" not in text and "Skipping setting a default `ModelSummary`" not in text


# What a researcher did not ask to see: a cloud-logging tip and a note on Lightning's own model
# summary on every run, and deprecation notes Lightning and transformers raise about their internals.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_asked_for)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")


def unknown_option(argv: list[str], config_dir: str = CONFIG_DIR) -> str | None:
    """The first ``group=option`` of the command line with no ``conf/<group>/<option>.yaml``, said
    in one line with the choices (Hydra's own message also prints its whole search path).
    Hydra's groups (``hydra/...``, options from plugins) and sweep functions pass unchecked."""
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group = Path(config_dir) / key
        if not sep or key.startswith("hydra") or not group.is_dir() or any(c in value for c in "($"):
            continue
        for item in (v.strip("'\"") for v in value.strip("[]").split(",")):  # a, a,b or [a,b]
            if item not in ("", "null") and not (group / f"{item}.yaml").exists():
                options = sorted(
                    p.relative_to(group).with_suffix("").as_posix()
                    for p in group.rglob("*.yaml")
                    if not p.name.startswith("_")
                )
                return f"{key}={item}: no such option in conf/{key}; choose from {', '.join(options)}"
    return None


def quote_numeric_options(argv: list[str], config_dir: str = CONFIG_DIR) -> list[str]:
    """``layers=18`` as Hydra needs it, ``layers='18'``: an option named by a number (the
    paper's layer set ``18``) would parse as an int, which a config-group override rejects.
    Sweeps (``layers=18,3-18``) are quoted item by item; other arguments pass unchanged."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = Path(config_dir) / key.lstrip("+~")
        if sep and group.is_dir():
            items = value.split(",")
            value = ",".join(f"'{v}'" if v.isdigit() and (group / f"{v}.yaml").exists() else v for v in items)
        out.append(f"{key}{sep}{value}")
    return out
