"""The wrapper every entry-point task runs in, so a failed job leaves a clean slate for the next.

Hydra 1.3 already runs each multirun job inside ``try`` and raises the first failure only after
the whole batch; what breaks the jobs after a failure is state the failed one leaves behind: an
unfinished wandb run (the next ``WandbLogger`` attaches to it), DDP launch variables and a live
process group (see ``distributed``). The wrapper clears those, logs the traceback into the job's
own log, always names the output dir, and re-raises: the original exception in a single run;
in a multirun a ``JobFailedError`` naming the job, because launchers that run jobs in other
processes (joblib, submitit) must pickle it back and not every exception pickles. An expected
error (``vlm.runtime.errors``: config, data, checkpoint) is raised unwrapped from Hydra's
``instantiate`` wrappers and its traceback goes to the job's log file only, so its one-line
message is what the user and the multirun summary see.
"""

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vlm.runtime.distributed import isolated_distributed_state
from vlm.runtime.errors import expected_error, full_errors, one_line, to_log_files

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobFailedError(RuntimeError):
    """A multirun job's failure as a plain message (its traceback is in the job's log)."""


def _job() -> tuple[str, bool, str]:
    """(output dir, whether this is a multirun job, a short job label)."""
    if not HydraConfig.initialized():
        return "<no Hydra run>", False, ""
    hc = HydraConfig.get()
    label = f"#{hc.job.get('num', '?')} [{' '.join(hc.overrides.task)}]"
    return hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN, label


def _finish_wandb(exit_code: int) -> None:
    if "wandb" in sys.modules:  # never import wandb just to close it
        wandb = sys.modules["wandb"]
        if getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=exit_code)


def task_wrapper(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Decorate an entry point's ``task(cfg)``; see the module docstring for what it guarantees."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> T:
        output_dir, multirun, label = _job()
        exit_code = 1
        try:
            with isolated_distributed_state():
                result = task(cfg)
            exit_code = 0
            return result
        except Exception as caught:
            exc = expected_error(caught)
            if exc is None or full_errors():
                log.exception("Task failed")  # a bug: the traceback wherever the logs go
            else:
                to_log_files(caught)  # a user error: said in one line, the traceback in the log file
            if multirun:
                raise JobFailedError(
                    f"job {label} failed with {one_line(exc or caught)}\n(traceback in {output_dir})"
                ) from exc or caught
            if exc is not None and exc is not caught:
                raise exc from None
            raise
        finally:
            log.info(f"Output dir: {output_dir}")
            _finish_wandb(exit_code)

    return wrapped
