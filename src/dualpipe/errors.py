"""Every exception the library raises, in one place (imports nothing)."""

from __future__ import annotations

__all__ = [
    "ScheduleError",
    "PipelineError",
    "RemoteFailure",
    "ActionFailure",
    "StepTimeout",
    "CheckpointError",
    "DistributedRunError",
    "UsageError",
]


class ScheduleError(ValueError):
    """A schedule cannot be built for these arguments, or is unsound."""


class PipelineError(RuntimeError):
    """A pipeline step failed on some rank (or timed out waiting for one)."""


class RemoteFailure(PipelineError):
    """Another rank's failure, as read from the process group's store.

    Attributes:
        failure: the failure as that rank posted it (the message may add what this rank
            was doing when it learned of it); passed on unchanged when this rank tells
            its own pipeline.
    """

    def __init__(self, message: str, failure: str | None = None) -> None:
        super().__init__(message)
        self.failure = failure if failure is not None else message


class ActionFailure(PipelineError):
    """An action failed on this rank; the other ranks have been told."""


class StepTimeout(PipelineError, TimeoutError):
    """A wait of a step ran past the pipeline's ``timeout``."""


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed (raised on every rank)."""


class DistributedRunError(RuntimeError):
    """A rank of :func:`dualpipe.testing.run_distributed` raised, crashed or did not
    finish in time."""


class UsageError(Exception):
    """A bad command-line option or argument: reported on one line, exit status 2."""
