"""User-facing pipelines: :class:`DualPipe`, :class:`DualPipeV` and the generic
:class:`Pipeline` that runs any named schedule (``1f1b``, ``zb1p``, ``gpipe``...).

Drop-in for the original DualPipe API::

    model = DualPipe((stage_a, stage_b), batch_dim=0, process_group=None, rank_mapping=None)
    loss, outputs = model.step(*inputs, num_chunks=20, criterion=criterion, labels=(label,))

Beyond it: any device and backend, no declared shapes, automatic weight-gradient
split, mirrored-stage gradients summed for you, bounded failure detection, and a
measured timeline on request.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..schedules.generators import SCHEDULES, generate
from ..schedules.layout import dualpipe_layout
from ..schedules.schedule import Schedule, ScheduleError, layout_for
from ..schedules.validate import validate
from .executor import Executor, StepData, StepRecord
from .losses import LOSS_REDUCTIONS, reduced_criterion, share_losses
from .microbatch import concat_chunks, split_batch
from .p2p import PipelineError, Transport
from .timeline import MeasuredTimeline, gather_timeline

__all__ = ["Pipeline", "DualPipe", "DualPipeV", "PipelineError"]

_instances = itertools.count()


def _module_device(modules: Sequence[nn.Module]) -> torch.device:
    devices = {
        t.device for m in modules for t in itertools.chain(m.parameters(), m.buffers())
    }
    if len(devices) > 1:
        raise ValueError(
            f"all modules of a rank must be on one device, found {sorted(map(str, devices))}"
        )
    return devices.pop() if devices else torch.device("cpu")


class Pipeline(nn.Module):
    """Runs a named schedule over the ranks of a process group.

    Args:
        modules: the stage modules this rank holds (one for ``1f1b``/``zb1p``/``gpipe``;
            two for ``dualpipe`` — stages r and N-1-r — and ``dualpipev`` — stages r and
            2N-1-r).
        schedule: schedule name (``dualpipe``, ``dualpipev``, ``1f1b``, ``zb1p``, ``gpipe``),
            or a :class:`~dualpipe.schedules.Schedule` of your own (for example parsed
            with ``Schedule.from_text``): it is validated first, and every step then runs
            exactly its ``num_chunks`` micro-batches.
        batch_dim: dimension along which inputs and labels are split into micro-batches.
        process_group: the pipeline's process group (default: the world).
        rank_mapping: ``rank_mapping[i]`` is the group rank that acts as pipeline rank ``i``
            (default: identity).
        timeout: seconds a rank waits for a message before the step fails; a failure on
            another rank is noticed within a fraction of a second.
        split_backward: defer weight-gradient work of input-only backwards to the ``W``
            actions (automatic for ordinary autograd stages). False runs full backwards.
        sync_mirrored_grads: DualPipe only: after each training step, sum the gradients
            of the two copies of every stage so both hold the true gradient.
        mirrored_weights: DualPipe only: ``"check"`` (default) raises if the two copies of
            a stage differ at construction, ``"sync"`` copies the lower rank's weights to
            the higher rank, ``"ignore"`` skips the check.
        static_shapes: promise that every step has the same boundary shapes. Shapes are
            still discovered (on the first step); afterwards no metadata message is sent.
            By default a small header travels once per boundary per step (never per
            micro-batch), so shapes may change between steps.
        loss_reduction: ``"sum"`` (default, the original's): gradients of the sum of the
            micro-batch losses; ``"mean"``: of their mean over all micro-batches of the step
            (what one process computing the mean loss of the batch gets). The returned
            per-micro-batch losses are the criterion's values either way.
    """

    def __init__(
        self,
        modules: nn.Module | Sequence[nn.Module],
        schedule: str | Schedule = "dualpipev",
        *,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        timeout: float = 120.0,
        split_backward: bool = True,
        sync_mirrored_grads: bool = True,
        mirrored_weights: str = "check",
        static_shapes: bool = False,
        loss_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group first"
            )
        if isinstance(modules, nn.Module):
            modules = (modules,)
        self.group = process_group
        size = dist.get_world_size(process_group)
        group_rank = dist.get_rank(process_group)
        mapping = list(rank_mapping) if rank_mapping is not None else list(range(size))
        if sorted(mapping) != list(range(size)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{size - 1}, got {mapping}")
        self.num_ranks = size
        self.rank = mapping.index(group_rank)
        self._fixed: Schedule | None = None
        if isinstance(schedule, Schedule):
            if schedule.num_ranks != size:
                raise ScheduleError(
                    f"the schedule is for {schedule.num_ranks} ranks; the group has {size}"
                )
            validate(schedule)  # a hand-made schedule must be sound before anything runs
            self._fixed = schedule
            self.schedule_name = schedule.name
            self.layout = schedule.layout
        else:
            self.schedule_name = schedule.lower()
            if self.schedule_name not in SCHEDULES:
                raise ScheduleError(
                    f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
                )
            if self.schedule_name == "dualpipe" and size % 2:
                raise ScheduleError(f"dualpipe: the number of ranks must be even, got {size}")
            self.layout = layout_for(self.schedule_name, size)
        # DualPipe's layout holds every stage on two ranks (r and N-1-r)
        self.mirrored = size % 2 == 0 and self.layout == dualpipe_layout(size)
        expected = len(self.layout.rank_stages[self.rank])
        if len(modules) != expected:
            raise ValueError(
                f"schedule {self.schedule_name} needs {expected} module(s) per rank, "
                f"got {len(modules)}"
            )
        self.module_list = nn.ModuleList(modules)
        self.device = _module_device(modules)
        self.batch_dim = batch_dim
        uid = next(_instances)
        self.transport = Transport(
            process_group, mapping, self.device, timeout, f"dualpipe/{uid}/error"
        )
        self.executor = Executor(
            self.rank, modules, self.transport, split_backward, static_shapes=static_shapes
        )
        self.sync_mirrored_grads = sync_mirrored_grads
        self._schedules: dict[int, Schedule] = {}
        self.last_record: StepRecord | None = None
        if self.mirrored and mirrored_weights != "ignore":
            if mirrored_weights not in ("check", "sync"):
                raise ValueError("mirrored_weights must be 'check', 'sync' or 'ignore'")
            self._mirror_weights(sync=mirrored_weights == "sync")

    # --------------------------------------------------------------- compat
    def set_p2p_tensor_shapes(self, shapes: Any) -> None:
        """Compatibility with the original DualPipe. Shapes are discovered at run time;
        calling this (on every rank) only promises they stay fixed, which turns on
        ``static_shapes`` (no metadata messages after the first step)."""
        self.executor.static_shapes = True

    def set_p2p_tensor_dtype(self, dtype: Any) -> None:
        """Accepted for compatibility with the original DualPipe; dtypes are discovered."""

    # --------------------------------------------------------------- helpers
    def _schedule(self, num_chunks: int) -> Schedule:
        if self._fixed is not None:
            if num_chunks not in (0, self._fixed.num_chunks):
                raise ScheduleError(
                    f"this pipeline runs a fixed schedule of {self._fixed.num_chunks} "
                    f"micro-batches; got num_chunks={num_chunks}"
                )
            return self._fixed
        if num_chunks not in self._schedules:
            self._schedules[num_chunks] = generate(self.schedule_name, self.num_ranks, num_chunks)
        return self._schedules[num_chunks]

    def _ends(self) -> tuple[int | None, int | None]:
        """(stream starting on this rank, stream ending on this rank)."""
        start = end = None
        for s, path in enumerate(self.layout.paths):
            if path[0][0] == self.rank:
                start = s
            if path[-1][0] == self.rank:
                end = s
        return start, end

    def _partner(self) -> int:
        return self.num_ranks - 1 - self.rank

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros(0, device=self.transport.device)
        return torch.cat([t.detach().reshape(-1).to(self.transport.device) for t in tensors])

    def _exchange(self, flat: torch.Tensor) -> torch.Tensor:
        peer = self._partner()
        return self.transport.exchange(flat, peer, 0, f"mirrored stage data from rank {peer}")

    def _mirror_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Parameters of (module 0, module 1); module 0 of this rank mirrors module 1 of
        the partner."""
        return list(self.module_list[0].parameters()), list(self.module_list[1].parameters())

    def _swap_with_partner(
        self, tensors: list[torch.Tensor], n0: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Swap flattened ``tensors`` (module 0's first, ``n0`` values) with the partner.

        Returns ``(mine0, mine1, theirs0, theirs1)`` where ``theirs0`` is the partner's copy
        of this rank's module 0 (the partner's module 1) and ``theirs1`` of module 1."""
        flat = self._flat(tensors)
        other = self._exchange(flat)
        n1 = flat.numel() - n0  # the partner sends its module 0 (= my module 1) first
        return flat[:n0], flat[n0:], other[n1:], other[:n1]

    @staticmethod
    def _pieces(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """``flat`` cut back into tensors shaped like ``params`` (on their devices)."""
        out, offset = [], 0
        for p in params:
            out.append(flat[offset : offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()
        return out

    def _mirror_weights(self, sync: bool) -> None:
        params0, params1 = self._mirror_params()
        n0 = sum(p.numel() for p in params0)
        mine0, mine1, theirs0, theirs1 = self._swap_with_partner(params0 + params1, n0)
        if theirs0.numel() != n0:
            raise ValueError(
                f"rank {self.rank}: the two copies of a DualPipe stage have different "
                f"parameter counts (ranks {self.rank} and {self._partner()})"
            )
        if sync:
            if self.rank > self._partner():
                with torch.no_grad():
                    for params, theirs in ((params0, theirs0), (params1, theirs1)):
                        for p, piece in zip(params, self._pieces(theirs, params), strict=True):
                            p.copy_(piece)
            return
        if not (torch.equal(theirs0, mine0) and torch.equal(theirs1, mine1)):
            raise ValueError(
                f"rank {self.rank}: the two copies of a DualPipe stage differ between ranks "
                f"{self.rank} and {self._partner()}; build them from the same weights or pass "
                "mirrored_weights='sync'"
            )

    def sync_grads(self) -> None:
        """DualPipe: sum the gradients of the two copies of every stage (both copies end
        with the same, summed gradient). Called after each training step unless
        ``sync_mirrored_grads=False``."""
        if not self.mirrored:
            return
        params0, params1 = self._mirror_params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params0 + params1]
        n0 = sum(p.numel() for p in params0)
        mine0, mine1, theirs0, theirs1 = self._swap_with_partner(grads, n0)
        for params, total in ((params0, mine0 + theirs0), (params1, mine1 + theirs1)):
            for p, piece in zip(params, self._pieces(total, params), strict=True):
                p.grad = piece.clone()

    # --------------------------------------------------------------- step
    def step(
        self,
        *inputs: torch.Tensor,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor] = (),
        return_outputs: bool = False,
        record: bool = False,
        broadcast_loss: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """Run one step: forward and backward of every micro-batch (or forward only
        under ``torch.no_grad()``).

        Inputs are given on the ranks where a stream starts and labels where it ends
        (DualPipe: rank 0 and rank N-1, each with half the batch; others: rank 0 / the
        last rank). Returns ``(loss, outputs)``: where a stream ends, ``loss`` holds the
        per-micro-batch losses (shape ``[C]``) and, with ``return_outputs``, ``outputs``
        the concatenated outputs; ``None`` elsewhere. Gradients equal those of the sum (or,
        with ``loss_reduction="mean"``, the mean) of the per-micro-batch losses.
        ``record=True`` keeps a measured timeline in :attr:`last_record` (see
        :meth:`gather_timeline`). ``broadcast_loss=True`` (collective) returns every
        micro-batch's loss of the step (all streams, stream 0's first, as float32) on every
        rank.
        """
        try:
            schedule, data = self._prepare(inputs, num_chunks, criterion, labels, return_outputs)
        except (ValueError, ScheduleError) as exc:
            # tell the other ranks at once instead of letting them wait for a timeout
            self.transport.post_error(f"rank {self.rank}: invalid step arguments: {exc}")
            raise
        result = self.executor.run(schedule, data, record=record)
        self.last_record = self.executor.record
        if data.training and self.sync_mirrored_grads:
            self.sync_grads()
        end = self._ends()[1]
        loss = torch.stack(result.losses) if result.losses else None
        if broadcast_loss:
            loss = share_losses(loss, end, schedule.chunks_per_stream,
                                self.layout.num_streams, self.group, self.transport.device)
        if end is None:
            return loss, None
        outputs: Any = None
        if return_outputs:
            outputs = concat_chunks(result.outputs, self.batch_dim)
            if len(outputs) == 1:
                outputs = outputs[0]
        return loss, outputs

    def _prepare(
        self,
        inputs: tuple[torch.Tensor, ...],
        num_chunks: int,
        criterion: Callable[..., torch.Tensor] | None,
        labels: Sequence[torch.Tensor],
        return_outputs: bool,
    ) -> tuple[Schedule, StepData]:
        """Check this rank's step arguments (no communication) and split them."""
        training = torch.is_grad_enabled()
        schedule = self._schedule(num_chunks)  # raises ScheduleError on bad counts
        chunks = schedule.chunks_per_stream
        start, end = self._ends()
        labels = tuple(labels)
        if start is None and inputs:
            raise ValueError(f"rank {self.rank} takes no inputs in {self.schedule_name}")
        if start is not None and not inputs:
            raise ValueError(f"rank {self.rank} needs the inputs of the stream that starts there")
        if training and end is not None and criterion is None:
            raise ValueError(
                f"rank {self.rank} computes the loss: training (grad enabled) needs a criterion "
                "here; use torch.no_grad() for inference"
            )
        if end is None and labels:
            raise ValueError(f"rank {self.rank} takes no labels in {self.schedule_name}")
        if end is not None and criterion is not None and not labels:
            raise ValueError(f"rank {self.rank} needs the labels of the stream that ends there")
        data = StepData(
            inputs=split_batch(inputs, chunks, self.batch_dim, "inputs") if inputs else None,
            labels=split_batch(labels, chunks, self.batch_dim, "labels") if labels else None,
            criterion=(
                reduced_criterion(criterion, self.loss_reduction, schedule.num_chunks)
                if criterion is not None
                else None
            ),
            return_outputs=return_outputs,
            training=training,
        )
        if data.labels is None and end is not None:
            data.labels = [()] * chunks
        return schedule, data

    def gather_timeline(self, dst: int | None = 0) -> MeasuredTimeline | None:
        """Collective: the measured timeline of the last ``step(..., record=True)`` of
        every rank, returned on pipeline rank ``dst`` (None elsewhere; every rank with
        ``dst=None``). Draw it with :meth:`MeasuredTimeline.save_png` and
        :meth:`MeasuredTimeline.save_trace`."""
        if self.last_record is None:
            raise RuntimeError("no recorded step: call step(..., record=True) first")
        schedule = self.executor.schedule
        return gather_timeline(self.last_record, schedule, self.rank, self.group, dst)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same as :meth:`step`."""
        return self.step(*args, **kwargs)


class _NamedPipeline(Pipeline):
    """A :class:`Pipeline` whose schedule is fixed by the class; positional arguments
    follow the original DualPipe: ``(modules, batch_dim, process_group, rank_mapping)``."""

    SCHEDULE = ""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            modules,
            self.SCHEDULE,
            batch_dim=batch_dim,
            process_group=process_group,
            rank_mapping=rank_mapping,
            **kwargs,
        )


class DualPipe(_NamedPipeline):
    """Bidirectional DualPipe. Rank r passes ``(stage r, stage N-1-r)``; N even.

    Positional arguments follow the original: ``DualPipe(modules, batch_dim,
    process_group, rank_mapping)``; the rest are :class:`Pipeline`'s keywords.
    """

    SCHEDULE = "dualpipe"


class DualPipeV(_NamedPipeline):
    """V-shaped DualPipeV. Rank r passes ``(stage r, stage 2N-1-r)``.

    Positional arguments follow the original: ``DualPipeV(modules, batch_dim,
    process_group, rank_mapping)``; the rest are :class:`Pipeline`'s keywords.
    """

    SCHEDULE = "dualpipev"
