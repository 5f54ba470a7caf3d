"""``vlm-curate``: the dense_connector seed's training subsets (``20kUmap``: even per UMAP
cluster, ``10kRandom``: uniform) of a LLaVA-format JSON, by default the ShapesWorld of
``conf/data/shapesworld_dense.yaml`` (generated when missing); see ``conf/curate.yaml``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from vlm.cli.common import CONFIG_DIR, unknown_option
from vlm.families.dense_connector import curation
from vlm.runtime.errors import ConfigError, message, said_in_one_line
from vlm.runtime.task import task_wrapper
from vlm.runtime.validate import check_targets

log = logging.getLogger(__name__)


def source_file(cfg: DictConfig) -> Path:
    """``source``, or else the data config's ``llava_train.json``, generated first if missing."""
    if cfg.source:
        return Path(cfg.source)
    check_targets(cfg)
    hydra.utils.instantiate(cfg.data).prepare_data()
    return Path(cfg.data.root) / "llava_train.json"


@task_wrapper
def curate(cfg: DictConfig) -> dict:
    try:
        path = source_file(cfg)
        records, dropped = curation.read_pool(path, cfg.image_filter)
        log.info(
            f"pool: {len(records)} records of {path}"
            + (f" whose image path contains {cfg.image_filter!r}" if cfg.image_filter else "")
            + (f" ({dropped} unusable records left out)" if dropped else "")
        )
        summary = curation.curate(
            records,
            cfg.out_dir,
            OmegaConf.to_container(cfg.subsets, resolve=True),
            seed=cfg.seed,
            embed_args=OmegaConf.to_container(cfg.embed, resolve=True),
            umap_args=OmegaConf.to_container(cfg.umap, resolve=True),
            cluster_args=OmegaConf.to_container(cfg.cluster, resolve=True),
            reference_pool=cfg.reference_pool,
            provenance={"source": str(path), "image_filter": cfg.image_filter, "unusable": dropped},
        )
    except curation.CurationError as err:  # the config's fault: one line, as validate says it
        raise ConfigError(message(err)) from err
    sizes = ", ".join(f"{name} {size}" for name, size in summary["sizes"].items())
    log.info(f"{len(summary['clusters'])} {summary['method']} clusters in {summary['dims']} UMAP dims")
    log.info(f"subsets: {sizes}; written to {cfg.out_dir} with clusters.json and umap.png")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="curate")
def _main(cfg: DictConfig) -> None:
    with said_in_one_line():
        curate(cfg)


def main() -> None:
    """``vlm-curate``: Hydra's own command line, an unknown ``data=`` option said in one line."""
    if wrong := unknown_option(sys.argv):
        sys.exit(f"vlm-curate: {wrong}")
    _main()


if __name__ == "__main__":
    main()
