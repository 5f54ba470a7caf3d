"""Lightning's script-relaunch DDP made safe under Hydra, multirun included.

With ``strategy: ddp`` Lightning starts ranks 1..N-1 by running the entry script again with
``sys.argv[1:]`` plus ``hydra.run.dir=<hydra.run.dir>`` (``_hydra_subprocess_cmd`` in
``lightning.fabric.strategies.launchers.subprocess_script``). Under ``-m`` that argv still
holds the flag and the sweep (``optimizer.lr=1e-3,1e-4``), so each child starts the whole sweep
again, and ``hydra.run.dir`` is the single-run template, not the job's folder
(Lightning-AI/pytorch-lightning#11300; the fix #11617 was reverted). Two more traps hit the
second job of a sweep in the same process: the launcher leaves ``LOCAL_RANK``/``WORLD_SIZE``/
``MASTER_PORT`` in ``os.environ`` -- so Lightning takes the process for an externally launched
rank and spawns no children -- and the process group stays initialised, so the job reuses a
group whose other ranks are gone: the second job hangs or dies in its first collective.

``prepare_script_relaunch`` rewrites argv to this one job and points ``hydra.run.dir`` at its
output dir; ``isolated_distributed_state`` undoes the environment and process group after it.
"""

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import read_write

# Hydra's own flags that select the config; everything else on the command line is re-derived.
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# Hydra overrides that belong to the sweep or that Lightning sets itself for each child.
_SWEEP_ONLY = (
    "hydra.mode",
    "hydra.sweep",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run.dir",
    "hydra.job.name",
    "hydra.output_subdir",
)


def job_argv(argv: Sequence[str], task_overrides: Sequence[str], hydra_overrides: Sequence[str]) -> list[str]:
    """The command line that re-creates exactly one (multirun) job as a single run."""
    kept = [argv[0]]
    rest = iter(argv[1:])
    for token in rest:
        if token.split("=", 1)[0] in _CONFIG_FLAGS:
            kept.append(token)
            if "=" not in token:
                kept.append(next(rest))
    hydra_kept = [o for o in hydra_overrides if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
    return [*kept, *task_overrides, *hydra_kept, "hydra.mode=RUN"]


def _under_pytest() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return Path(sys.argv[0]).name in ("pytest", "py.test") or (
        main_spec is not None and main_spec.name.split(".")[0] == "pytest"
    )


def prepare_script_relaunch(trainer: Trainer) -> None:
    """Before ``fit``: make the children Lightning will start re-run this job, and only this job.

    A no-op unless the strategy relaunches the script itself (``ddp`` with >1 local process,
    not under SLURM/torchrun, which start the ranks) inside a Hydra app.
    """
    launcher = trainer.strategy.launcher
    if (
        not isinstance(launcher, _SubprocessScriptLauncher)
        or launcher.cluster_environment.creates_processes_externally
        or launcher.num_processes < 2
        or not HydraConfig.initialized()
    ):
        return
    if _under_pytest():
        raise RuntimeError(
            "strategy=ddp starts its ranks by re-running the entry script, here pytest itself. "
            "Run the CLI in a subprocess (python -m vlm.cli.train trainer=ddp_cpu ...) or use ddp_spawn."
        )
    hc = HydraConfig.get()
    sys.argv = job_argv(sys.argv, hc.overrides.task, hc.overrides.hydra)
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir


_LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)


@contextmanager
def isolated_distributed_state() -> Iterator[None]:
    """Give a job back the launch environment and process-group state it started with."""
    saved = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    was_initialized = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not was_initialized and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
