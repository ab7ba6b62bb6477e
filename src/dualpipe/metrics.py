"""Per-step training metrics from the runtime's measured timeline: step time, bubble
fraction (idle share of the ranks' time) and tokens per second, for logging."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .runtime.pipeline import Pipeline
from .runtime.timeline import MeasuredTimeline

__all__ = ["StepMetrics", "timeline_metrics", "step_metrics"]


@dataclass(frozen=True)
class StepMetrics:
    """One measured step.

    Attributes:
        step_ms: from the first rank's start to the last rank's end of the step.
        busy_ms: per pipeline rank, time spent computing (actions, waits inside excluded).
        idle_ms: per pipeline rank, ``step_ms`` minus busy time.
        bubble: mean idle share of the ranks' time, ``mean(idle_ms) / step_ms``.
        tokens_per_s: ``tokens / step`` seconds when the step's token count was given.
        peak_memory_bytes: per pipeline rank, the most bytes held after an action
            (saved activations, deferred weight-gradient state, message buffers; see
            :class:`dualpipe.runtime.memory.MemoryProbe`); empty when not measured.
    """

    step_ms: float
    busy_ms: list[float]
    idle_ms: list[float]
    bubble: float
    tokens_per_s: float | None
    peak_memory_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for a logger)."""
        return asdict(self)


def timeline_metrics(timeline: MeasuredTimeline, tokens: int | None = None) -> StepMetrics:
    """The metrics of a measured step (``tokens``: tokens the step processed, all
    micro-batches of all streams together)."""
    step = timeline.makespan
    idle = timeline.idle
    return StepMetrics(
        step_ms=step,
        busy_ms=[step - i for i in idle],
        idle_ms=idle,
        bubble=statistics.fmean(idle) / step if step > 0 else 0.0,
        tokens_per_s=tokens / (step / 1000.0) if tokens is not None and step > 0 else None,
        peak_memory_bytes=timeline.peak_memory if timeline.memory else [],
    )


def step_metrics(pipe: Pipeline, tokens: int | None = None) -> StepMetrics:
    """Collective over the pipeline's ranks: the metrics of the last step run with
    ``record=True``, the same on every rank."""
    timeline = pipe.gather_timeline(dst=None)
    assert timeline is not None
    return timeline_metrics(timeline, tokens)
