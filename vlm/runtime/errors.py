"""Errors a person reads. An expected error (a config, data file, checkpoint or input the user
can fix) is said in one line, ``<Error>: <what is wrong, where, what to do>``, and the command
exits with 1; its traceback goes to the run's log file, or to the terminal with
``HYDRA_FULL_ERROR=1``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException

from vlm.core.checkpoint import CheckpointError
from vlm.core.zoo.errors import CheckpointMissingError, UnknownModelError
from vlm.data.datasets import BadSampleError
from vlm.data.readers import DataFormatError


class ConfigError(ValueError):
    """A config that cannot run (or may not: an instantiate target outside the allow-list)."""


EXPECTED = (
    ConfigError, CheckpointError, CheckpointMissingError, UnknownModelError, BadSampleError, DataFormatError,
)  # fmt: skip


def unwrapped(exc: BaseException) -> BaseException:
    """The error under Hydra's ``instantiate`` wrappers (one per nested ``_target_``)."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def expected_error(exc: BaseException) -> BaseException | None:
    """``exc`` (unwrapped) if it is an expected error, else None."""
    inner = unwrapped(exc)
    return inner if isinstance(inner, EXPECTED) else None


def message(exc: BaseException) -> str:
    """The message on one line. An error re-raised from a DataLoader worker carries the
    worker's traceback in its message; its last line is the original message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        text = text.removeprefix(prefix)
    return text


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {message(exc)}"


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def to_log_files(exc: BaseException) -> None:
    """The traceback into the run's log file(s) only, not the terminal."""
    info = (type(exc), exc, exc.__traceback__)
    record = logging.LogRecord("vlm", logging.ERROR, __file__, 0, "Task failed", None, info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextmanager
def said_in_one_line() -> Iterator[None]:
    """Around a command's body (outside ``task_wrapper``, which logs the traceback): an
    expected error becomes its one line and exit status 1."""
    try:
        yield
    except Exception as caught:
        exc = expected_error(caught)
        if exc is None or full_errors():
            raise
        print(one_line(exc), file=sys.stderr)
        raise SystemExit(1) from None
