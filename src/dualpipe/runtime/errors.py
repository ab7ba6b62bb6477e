"""The errors a pipeline raises."""

from __future__ import annotations

__all__ = ["PipelineError", "RemoteFailure"]


class PipelineError(RuntimeError):
    """A pipeline step failed on some rank (or timed out waiting for one)."""


class RemoteFailure(PipelineError):
    """Another rank's failure, as read from the process group's store."""
