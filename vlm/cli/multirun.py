"""Read a Hydra multirun folder back: one :class:`Job` per job dir, with its overrides, the
config-group choices Hydra made, the composed config and the Lightning CSV metrics.

A job is any folder holding ``.hydra/config.yaml``, so the sweep's subdir pattern (job number,
override dirname, nested folders) does not matter.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@dataclass
class Job:
    path: Path
    num: int | None  # hydra.job.num; None when hydra.yaml is missing
    overrides: dict[str, str]  # "fusion=E_D" -> {"fusion": "E_D"}; "+", "++", "~" prefixes dropped
    choices: dict[str, str]  # hydra.runtime.choices: every config group's option
    config: DictConfig
    metrics: list[dict[str, str]] = field(default_factory=list)  # rows of metrics.csv

    def name(self, root: Path) -> str:
        """The job number, prefixed by its sweep's folder when ``root`` holds several sweeps
        (a grid and its baseline): ``mlvf/3``, ``llava/0``."""
        if self.num is None:
            return self.path.relative_to(root).as_posix()
        sweep = self.path.parent.relative_to(root).as_posix()
        return str(self.num) if sweep == "." else f"{sweep}/{self.num}"

    def value(self, key: str) -> str | None:
        """A key as the job saw it: its override, else the group choice, else the config value
        (a sweep over ``layers`` still reports the ``fusion`` an experiment file picked); a config
        node that is a whole section is no value."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return self.choices[key]
        found = OmegaConf.select(self.config, key, default=None)
        return None if found is None or OmegaConf.is_config(found) else str(found)


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``key=value`` lines -> dict; a quoted value (``layers='18'``) loses its quotes."""
    out = {}
    for line in lines:
        key, _, value = line.partition("=")
        quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
        out[key.lstrip("+~")] = value[1:-1] if quoted else value
    return out


def metrics_rows(job_dir: Path) -> list[dict[str, str]]:
    """Rows of the newest ``metrics.csv`` under the job (CSVLogger: ``<name>/version_N/``)."""
    files = sorted(job_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with files[-1].open(newline="") as f:
        return list(csv.DictReader(f))


def read_job(job_dir: Path) -> Job:
    hydra_dir = job_dir / ".hydra"
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
    hydra_file = hydra_dir / "hydra.yaml"
    hydra_cfg = OmegaConf.load(hydra_file).hydra if hydra_file.exists() else OmegaConf.create()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices", default=None) or {}
    num = OmegaConf.select(hydra_cfg, "job.num", default=None)
    return Job(
        path=job_dir,
        num=int(num) if num is not None else None,
        overrides=parse_overrides(list(overrides)),
        choices={k: str(v) for k, v in choices.items() if v is not None},
        config=OmegaConf.load(hydra_dir / "config.yaml"),
        metrics=metrics_rows(job_dir),
    )


def read_multirun(root: Path) -> list[Job]:
    """Every job under ``root``, in sweep order (Hydra's job number, then path)."""
    dirs = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")})
    if not dirs:
        raise FileNotFoundError(f"no Hydra job (a folder with .hydra/config.yaml) under {root}")
    return sorted((read_job(d) for d in dirs), key=lambda j: (j.num is None, j.num or 0, str(j.path)))


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order; with one job
    (nothing differs) all its overrides."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    varying = [k for k in keys if len({j.value(k) for j in jobs}) > 1]
    return varying if len(jobs) > 1 else keys
