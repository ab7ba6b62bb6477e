"""The training run of one rank: pipeline step, first-step gradient check, optimizer,
progress bar, and the measured timeline of a recorded step.

:func:`train_rank` is what every spawned process of the demo runs (through
:func:`dualpipe.testing.run_distributed`); ``torch.distributed`` is already
initialised when it starts.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.pipeline import Pipeline
from ..runtime.timeline import MeasuredTimeline
from ..schedules.layout import Layout
from ..schedules.registry import layout_for
from .model import GPTConfig, GPTStage, gpt_stages
from .task import CopyTask, lm_loss

__all__ = [
    "DemoOptions",
    "GradCheck",
    "RankResult",
    "default_chunks",
    "model_config",
    "stream_batches",
    "reference_step",
    "check_gradients",
    "train_rank",
]

GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-6
"""Tolerances of the gradient check (losses must be bit-equal)."""


def default_chunks(schedule: str, ranks: int) -> int:
    """Micro-batches per step: ``2 * ranks``, the least with which DualPipe and DualPipeV
    reach their steady state; the other schedules get the same count (and batch) so
    runs compare."""
    del schedule
    return 2 * ranks


def model_config(num_stages: int) -> GPTConfig:
    """The demo's model for ``num_stages`` stages: 6 blocks, more if every stage
    needs one (the embedding and the head share stages with blocks or sit alone)."""
    task = CopyTask()
    return GPTConfig(
        vocab_size=task.vocab_size, seq_len=task.seq_len, n_layer=max(6, num_stages - 2)
    )


@dataclass(frozen=True)
class DemoOptions:
    """Everything a rank needs to know about the run (picklable, sent to each process).

    Attributes:
        schedule: pipeline schedule name.
        chunks: micro-batches per step (``num_chunks`` of :meth:`Pipeline.step`).
        steps: optimizer steps.
        micro_batch: sequences per micro-batch; a step sees ``chunks * micro_batch``.
        seed: seeds the weights and the data.
        lr: AdamW learning rate.
        record_steps: how many of the last steps to record; the one with the median
            step time is reported.
        timeout: seconds a rank waits for a message before the step fails.
        progress: show a tqdm bar on the reporting rank.
    """

    schedule: str = "dualpipev"
    chunks: int = 8
    steps: int = 100
    micro_batch: int = 8
    seed: int = 0
    lr: float = 3e-3
    record_steps: int = 5
    timeout: float = 60.0
    progress: bool = True


@dataclass
class GradCheck:
    """Outcome of comparing the pipeline's first step with the single-process model."""

    ok: bool
    max_abs_diff: float
    losses_equal: bool
    messages: list[str] = field(default_factory=list)

    @classmethod
    def combine(cls, checks: Sequence[GradCheck | None]) -> GradCheck:
        """One outcome from several processes' (``None``: a process that checked nothing)."""
        done = [c for c in checks if c is not None]
        return cls(all(c.ok for c in done), max(c.max_abs_diff for c in done),
                   all(c.losses_equal for c in done), [m for c in done for m in c.messages])


@dataclass
class RankResult:
    """What a rank returns to the parent process (the reporting rank fills it all)."""

    rank: int
    reporter: bool
    num_params: int
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    iter_ms: list[float] = field(default_factory=list)
    grad_check: GradCheck | None = None
    timeline: MeasuredTimeline | None = None
    recorded_step: int = -1


def reporter_rank(layout: Layout) -> int:
    """The rank that shows progress: the lowest rank where a stream ends (holds a loss)."""
    return min(layout.exit(s)[0] for s in range(layout.num_streams))


def stream_batches(
    tokens: torch.Tensor, targets: torch.Tensor, num_streams: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a step's batch between the streams (DualPipe: the first half goes down
    from rank 0, the second half up from rank N-1)."""
    return list(zip(tokens.chunk(num_streams), targets.chunk(num_streams), strict=True))


def reference_step(
    stages: Sequence[nn.Module],
    streams: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunks_per_stream: int,
) -> list[torch.Tensor]:
    """Run every micro-batch through the whole model on this process, in order, and
    backpropagate each micro-batch's loss (so gradients are those of their sum, as in
    the pipeline). Returns per stream the stacked per-micro-batch losses."""
    losses = []
    for tokens, targets in streams:
        per_mb = []
        for x, y in zip(
            tokens.tensor_split(chunks_per_stream),
            targets.tensor_split(chunks_per_stream),
            strict=True,
        ):
            for stage in stages:
                x = stage(x)
            loss = lm_loss(x, y)
            loss.backward()
            per_mb.append(loss.detach())
        losses.append(torch.stack(per_mb))
    return losses


def check_gradients(
    mine: Sequence[tuple[int, nn.Module]],
    reference: Sequence[nn.Module],
    loss: torch.Tensor | None,
    expected_loss: torch.Tensor | None,
) -> GradCheck:
    """Compare this rank's stage gradients with the reference model's (``mine`` holds
    ``(stage id, module)`` pairs) and its losses with the reference losses (bit-equal)."""
    messages: list[str] = []
    worst = 0.0
    for k, module in mine:
        named = list(module.named_parameters())
        ref = list(reference[k].parameters())
        for (name, p), q in zip(named, ref, strict=True):
            if p.grad is None or q.grad is None:
                messages.append(f"stage {k} {name}: missing gradient")
                continue
            worst = max(worst, (p.grad - q.grad.to(p.grad.device)).abs().max().item())
            try:
                torch.testing.assert_close(
                    p.grad, q.grad.to(p.grad.device), rtol=GRAD_RTOL, atol=GRAD_ATOL
                )
            except AssertionError as exc:
                messages.append(f"stage {k} {name}: {str(exc).splitlines()[0]}")
    losses_equal = True
    if expected_loss is not None:
        losses_equal = loss is not None and torch.equal(loss.cpu(), expected_loss.cpu())
        if not losses_equal:
            messages.append(f"losses differ: pipeline {loss} vs single process {expected_loss}")
    return GradCheck(not messages, worst, losses_equal, messages)


def _merge_checks(checks: Sequence[GradCheck]) -> GradCheck:
    messages = [m for c in checks for m in c.messages]
    return GradCheck(
        all(c.ok for c in checks),
        max(c.max_abs_diff for c in checks),
        all(c.losses_equal for c in checks),
        messages,
    )


def _progress(opts: DemoOptions, enabled: bool) -> Any:
    """A tqdm bar on the reporting rank (None elsewhere or when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=opts.steps, desc=f"{opts.schedule} train", unit="step",
                dynamic_ncols=True, file=sys.stderr)


def _say(bar: Any, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def train_rank(rank: int, world: int, opts: DemoOptions) -> RankResult:
    """Train the demo model with ``opts.schedule`` as pipeline rank ``rank`` of ``world``.

    Every rank builds all stages from the same seed, keeps its own, and makes the same
    batches, so no data moves except through the pipeline. Losses and step times are
    gathered every step for the progress bar; the reporting rank returns them with the
    gradient check and the measured timeline of a recorded step.
    """
    layout = layout_for(opts.schedule, world)
    config = model_config(layout.num_stages)
    task = CopyTask(vocab_size=config.vocab_size)
    stages = gpt_stages(config, layout.num_stages, seed=opts.seed)
    reference = copy.deepcopy(stages)  # pristine copy for the first-step check
    my_ids = layout.rank_stages[rank]
    mine: list[GPTStage] = [stages[k] for k in my_ids]
    pipe = Pipeline(mine, opts.schedule, timeout=opts.timeout)
    params = [p for m in mine for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.98), weight_decay=0.01)

    reporter = reporter_rank(layout)
    starts = layout.streams_starting_on(rank)
    ends = layout.streams_ending_on(rank)
    num_streams = layout.num_streams
    per_stream = opts.chunks // num_streams
    batch_size = opts.chunks * opts.micro_batch
    num_params = sum(p.numel() for s in stages for p in s.parameters())
    result = RankResult(rank, rank == reporter, num_params)
    bar = _progress(opts, opts.progress and rank == reporter)
    first_recorded = max(1, opts.steps - opts.record_steps) if opts.steps > 1 else 0
    recorded: list[tuple[float, int, MeasuredTimeline | None]] = []
    try:
        for step in range(opts.steps):
            t_iter = time.perf_counter()
            tokens, targets = task.batch(batch_size, opts.seed, step)
            streams = stream_batches(tokens, targets, num_streams)
            inputs = streams[starts[0]][0:1] if starts else ()
            labels = streams[ends[0]][1:2] if ends else ()
            optimizer.zero_grad(set_to_none=True)
            record = step >= first_recorded
            if record:
                # start together: the timeline measures the step, not the ranks' skew
                # (the reporting rank may still be unpacking the previous timeline)
                dist.barrier()
            t0 = time.perf_counter()
            loss, _ = pipe.step(*inputs, num_chunks=opts.chunks, criterion=lm_loss,
                                labels=labels, record=record)
            step_s = time.perf_counter() - t0

            if step == 0:
                ref_losses = reference_step(reference, streams, per_stream)
                check = check_gradients(
                    list(zip(my_ids, mine, strict=True)), reference, loss,
                    ref_losses[ends[0]] if ends else None,
                )
                checks: list[GradCheck | None] = [None] * world
                dist.all_gather_object(checks, check)
                del reference
                if rank == reporter:
                    merged = _merge_checks([c for c in checks if c is not None])
                    result.grad_check = merged
                    _say(bar, _grad_check_line(merged))
            optimizer.step()
            iter_s = time.perf_counter() - t_iter

            # one small all-gather per step: loss sums and times for the progress bar
            mine_stats = torch.zeros(4, dtype=torch.float64)
            if loss is not None:
                mine_stats[0] = loss.double().sum()
                mine_stats[1] = loss.numel()
            mine_stats[2] = step_s
            mine_stats[3] = iter_s
            everyone = [torch.zeros(4, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(everyone, mine_stats)
            stats = torch.stack(everyone)
            if record:
                timeline = pipe.gather_timeline(dst=reporter)
                recorded.append((float(stats[:, 2].max()), step, timeline))
            if rank == reporter:
                mean_loss = float(stats[:, 0].sum() / stats[:, 1].sum())
                result.losses.append(mean_loss)
                result.step_ms.append(float(stats[:, 2].max()) * 1000.0)
                result.iter_ms.append(float(stats[:, 3].max()) * 1000.0)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}",
                                    step=f"{result.step_ms[-1]:.0f}ms", refresh=False)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if rank == reporter and recorded:
        ordered = sorted(recorded, key=lambda r: r[0])
        _, result.recorded_step, result.timeline = ordered[len(ordered) // 2]
    return result


def _grad_check_line(check: GradCheck) -> str:
    if check.ok:
        return (
            f"gradient check vs single process: OK (max abs diff {check.max_abs_diff:.2e}, "
            f"losses bit-equal)"
        )
    head = f"gradient check vs single process: FAILED (max abs diff {check.max_abs_diff:.2e})"
    return "\n  ".join([head, *check.messages[:10]])

