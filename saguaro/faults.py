"""Faults are never silent: whatever makes saguaro go on in a degraded way (a drafter worker that
failed, a prompt past the model's trained length, a call handed to HF's generate) is reported both
as a `SaguaroWarning` and as a record on the "saguaro" logger, so scripts see it in their
warnings and services in their logs."""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger("saguaro")


class SaguaroWarning(UserWarning):
    """saguaro went on in a degraded way; the output is still exact (see the message for what happened)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """warnings.warn(message, SaguaroWarning) pointing at the caller's caller, and logger.warning."""
    warnings.warn(message, SaguaroWarning, stacklevel=stacklevel + 1)
    logger.warning(message)


class WorkerFailed(RuntimeError):
    """The drafter worker died, raised, or did not answer within its timeout."""
