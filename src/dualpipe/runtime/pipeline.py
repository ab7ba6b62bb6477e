"""User-facing pipelines: :class:`DualPipe`, :class:`DualPipeV` and the generic
:class:`Pipeline` that runs any named schedule (``1f1b``, ``zb1p``, ``gpipe``...)."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PipelineError, ScheduleError
from ..pairing import pair_steps
from ..partcosts import PartCosts
from ..schedules.generators import generate
from ..schedules.layout import dualpipe_layout
from ..schedules.registry import layout_for
from ..schedules.schedule import Schedule
from ..schedules.validate import validate
from ..transport.guarded import all_reduce
from ..transport.process_group import Transport
from ..transport.protocol import PipelineIdentity, handshake
from .declared import Declared, declared
from .executor import Executor, StepData, StepRecord
from .extension import Extension, PipelineInfo, extensions_for
from .losses import LOSS_REDUCTIONS, count_labels, reduced_criterion, share_losses
from .microbatch import concat_chunks, scatter_microbatches
from .mirrored import MirroredStages
from .timeline import MeasuredTimeline, gather_timeline

__all__ = ["Pipeline", "DualPipe", "DualPipeV", "PipelineError"]

def _module_device(modules: Sequence[nn.Module]) -> torch.device:
    devices = {
        t.device for m in modules for t in itertools.chain(m.parameters(), m.buffers())
    }
    if len(devices) > 1:
        raise ValueError(
            f"all modules of a rank must be on one device, found {sorted(map(str, devices))}"
        )
    return devices.pop() if devices else torch.device("cpu")


def _stage_modules(modules: nn.Module | Iterable[nn.Module], expected: int) -> list[nn.Module]:
    """The stage modules a user passed: any iterable of modules (``(a, b)``, a list,
    ``nn.Sequential(a, b)``, ``nn.ModuleList``), or one module where one is expected
    (an ``nn.Sequential`` is then that stage itself)."""
    if isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList):
        if expected == 1 or not isinstance(modules, nn.Sequential):
            return [modules]
    stages = list(modules)
    for i, m in enumerate(stages):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
    return stages


def _ddp_classes() -> tuple[type, ...]:
    """The module classes of DDP: ``DistributedDataParallel`` and the DDP-based composable
    ``torch.distributed._composable.replicate`` (not FSDP2's ``replicate``)."""
    from torch.nn.parallel import DistributedDataParallel

    classes: list[type] = [DistributedDataParallel]
    try:
        from torch.distributed._composable.replicate import DDP as ComposableDDP
    except ImportError:  # pragma: no cover - a torch without it
        pass
    else:
        classes.append(ComposableDDP)
    return tuple(classes)


def _refuse_ddp(stages: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` if a stage is, or contains, a DDP module: DDP reduces gradients
    in each backward and expects each forward to be followed by its backward, but a
    schedule runs several forwards of a stage before their backwards, so its gradients
    would be silently wrong."""
    ddp = _ddp_classes()
    for i, stage in enumerate(stages):
        for name, sub in stage.named_modules():
            if isinstance(sub, ddp):
                where = f"modules[{i}]" + (f" (its submodule {name!r})" if name else "")
                raise ValueError(
                    f"{where} is wrapped by DDP ({type(sub).__name__}), which cannot run "
                    "several forwards of a stage before their backwards, as a pipeline "
                    "schedule does: its gradients would be wrong. Pass the stages unwrapped "
                    "and get data parallelism from FSDP2 (torch.distributed.fsdp.fully_shard, "
                    "or FSDP2's replicate) or dualpipe.data_parallel.GradientSync"
                )


def _pipeline_to_group(rank_mapping: Sequence[int] | None, size: int) -> list[int]:
    """Invert the original's ``rank_mapping`` (group rank -> pipeline rank): the group
    rank of each pipeline rank."""
    if rank_mapping is None:
        return list(range(size))
    mapping = [int(r) for r in rank_mapping]
    if sorted(mapping) != list(range(size)):
        raise ValueError(
            f"rank_mapping must be a permutation of 0..{size - 1} (rank_mapping[group rank] = "
            f"pipeline rank), got {mapping}"
        )
    to_group = [0] * size
    for group_rank, pipeline_rank in enumerate(mapping):
        to_group[pipeline_rank] = group_rank
    return to_group


def _accept_module_list_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load checkpoints written before the stages were named ``module`` (``module_list.*``)."""
    old = prefix + "module_list."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "module." + key[len(old) :]] = state_dict.pop(key)


def _release(transport: Transport, extensions: Sequence[Extension]) -> None:
    """What closing a pipeline does (also run when it is garbage-collected)."""
    try:
        for ext in extensions:
            ext.close()
    finally:
        transport.close()


class Pipeline(nn.Module):
    """Runs a named schedule over the ranks of a process group.

    Args:
        modules: the stage modules this rank holds, as any iterable of modules (a tuple, a
            list, ``nn.Sequential(stage_a, stage_b)``), in the order of
            ``layout_for(name, N).rank_stages[r]``: one for ``1f1b``/``zb1p``/``gpipe``
            (the module itself may be passed), two for ``dualpipe`` — stages r and N-1-r —,
            for the V schedules ``dualpipev``/``zbv``/``v-half``/``v-min`` — stages r and
            2N-1-r — and for ``interleaved-1f1b`` — r and r+N. They are kept as
            :attr:`module` (an ``nn.ModuleList``), so state-dict keys are ``module.0.*``,
            ``module.1.*`` as in the original. Stages wrapped by DDP
            (``DistributedDataParallel`` or the DDP-based composable ``replicate``) are
            refused: use FSDP2 or :class:`~dualpipe.data_parallel.GradientSync`.
        schedule: a registered schedule name (see ``dualpipe.schedules.schedule_names()``),
            or a :class:`~dualpipe.schedules.Schedule` of your own (for example parsed
            with ``Schedule.from_text`` or ``from_torch_csv``): it is validated first, and
            every step then runs exactly its ``num_chunks`` micro-batches.
        batch_dim: dimension along which inputs and labels are split into micro-batches.
        process_group: the pipeline's process group (default: the world).
        rank_mapping: as in the original, ``rank_mapping[g]`` is the pipeline rank of the
            process with rank ``g`` in ``process_group`` (default: identity); it must be a
            permutation. (Earlier versions of this library read it the other way round, as
            the group rank of each pipeline rank.)
        timeout: seconds a rank waits for a message before the step fails; a failure on
            another rank is noticed within a fraction of a second.
        split_backward: defer weight-gradient work of input-only backwards to the ``W``
            actions (automatic for ordinary autograd stages). False runs full backwards.
        sync_mirrored_grads: DualPipe only: after each training step, sum the gradients
            of the two copies of every stage so both hold the true gradient (the original
            leaves this to the user; pass False to keep doing it yourself).
        mirrored_weights: DualPipe only: ``"check"`` (default) raises if the two copies of
            a stage differ at construction, ``"sync"`` copies the lower rank's weights to
            the higher rank, ``"ignore"`` skips the comparison of values. The copies'
            structure and ``requires_grad`` must agree in every mode.
        static_shapes: promise that every step has the same boundary shapes. Shapes are
            still discovered (on the first step); afterwards no metadata message is sent.
            Default (``None``): on if the original's module-level
            :func:`~dualpipe.set_p2p_tensor_shapes` was called before construction (its
            shapes, and :func:`~dualpipe.set_p2p_tensor_dtype`'s dtype, are then checked
            on the first step), otherwise off: a small header travels once per boundary
            per step (never per micro-batch), so shapes may change between steps.
        loss_reduction: ``"sum"`` (default, the original's): gradients of the sum of the
            micro-batch losses; ``"mean"``: of their mean over all micro-batches of the step
            (what one process computing the mean of equally sized micro-batch losses
            gets); ``"token_mean"``: the criterion returns each micro-batch's *sum* of token
            losses (e.g. ``cross_entropy(..., reduction="sum")``) and the gradients are those
            of the step's token mean: the sum over every micro-batch and direction divided
            by the step's count of labels other than ``ignore_index`` (in the first label
            tensor), over the replicas of ``data_group`` too when it is given (sum their
            gradients then, e.g. ``GradientSync(average=False)``). The returned
            per-micro-batch losses are the criterion's values in every mode;
            :attr:`last_token_count` holds the count.
        ignore_index: the label value ``"token_mean"`` does not count (default -100).
        data_group: ``"token_mean"`` only: the data-parallel group whose replicas' counts
            are added (an all-reduce among the ranks that hold labels, once per step).
        extensions: plug-ins of your own (:class:`~dualpipe.runtime.extension.Extension`),
            run after those the registered plug-ins provide (the overlap engine for stages
            written as parts, ...).
        pairs: also overlap two forwards (warm-up) or two backwards (cool-down) of a rank
            as one pair wherever that makes the simulated step faster
            (:func:`dualpipe.pairing.pair_steps`; named schedules only, a schedule you pass
            runs as written). Default (``None``): on when a plug-in on any rank runs such
            pairs faster (the overlap engine, for stages written as parts).
        part_costs: the per-part costs ``pairs`` decides by (default
            :data:`dualpipe.pairing.NOMINAL_PARTS`), e.g. measured with ``dualpipe pair``.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module],
        schedule: str | Schedule = "dualpipev",
        *,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        timeout: float = 120.0,
        split_backward: bool = True,
        sync_mirrored_grads: bool = True,
        mirrored_weights: str = "check",
        static_shapes: bool | None = None,
        loss_reduction: str = "sum",
        ignore_index: int = -100,
        data_group: dist.ProcessGroup | None = None,
        extensions: Sequence[Extension] = (),
        pairs: bool | None = None,
        part_costs: PartCosts | None = None,
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        if data_group is not None and loss_reduction != "token_mean":
            raise ValueError("data_group is used by loss_reduction='token_mean' only")
        self.ignore_index = ignore_index
        self.data_group = data_group
        self.last_token_count: int | None = None
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group first"
            )
        self.group = process_group
        size = dist.get_world_size(process_group)
        group_rank = dist.get_rank(process_group)
        to_group = _pipeline_to_group(rank_mapping, size)
        self.num_ranks = size
        self.rank = to_group.index(group_rank)
        self._fixed: Schedule | None = None
        self._pairs = pairs
        self._part_costs = part_costs
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
            self.layout = layout_for(self.schedule_name, size)  # the registry checks name and ranks
        expected = len(self.layout.rank_stages[self.rank])
        stages = _stage_modules(modules, expected)
        if len(stages) != expected:
            raise ValueError(
                f"schedule {self.schedule_name} needs {expected} module(s) per rank, "
                f"got {len(stages)}"
            )
        _refuse_ddp(stages)
        # the original's attribute name, so state_dict keys are ``module.0.*``, ``module.1.*``
        self.module = nn.ModuleList(stages)
        self.register_load_state_dict_pre_hook(_accept_module_list_keys)
        self.device = _module_device(stages)
        self.batch_dim = batch_dim
        self.timeout = timeout
        self.transport = Transport(process_group, to_group, self.rank, self.device, timeout)
        declaration = declared()
        if static_shapes is None:
            static_shapes = declaration.shapes is not None
        self.executor = Executor(
            self.rank, stages, self.transport, split_backward, static_shapes=static_shapes
        )
        if declaration != Declared():
            self.executor.declared = declaration
        self.sync_mirrored_grads = sync_mirrored_grads
        self._schedules: dict[int, Schedule] = {}
        self._step_number = 0
        self.last_record: StepRecord | None = None
        # plug-ins (those the registered factories give, then the user's own), built before
        # the handshake: whether one refused is compared there, so a refusal on any rank
        # fails every rank's construction at once (the refusing rank's with its own error)
        self.extensions: list[Extension] = []
        info = PipelineInfo(
            self.rank, size, self.schedule_name, self.layout, tuple(stages),
            tuple(self.layout.rank_stages[self.rank]), process_group, self.device,
            split_backward, self,
        )
        refusal: Exception | None = None
        try:
            self.extensions.extend(extensions_for(info, extensions))
        except Exception as exc:
            refusal = exc
        self._finalizer = weakref.finalize(self, _release, self.transport, self.extensions)
        try:
            self.identity = self._handshake(
                group_rank,
                {
                    "schedule": self._fixed.to_text() if self._fixed else self.schedule_name,
                    "layout": (self.layout.paths, self.layout.stages, self.layout.rank_stages),
                    "rank_mapping": to_group,
                    "static_shapes": static_shapes,
                    "split_backward": split_backward,
                    "sync_mirrored_grads": sync_mirrored_grads,
                    "mirrored_weights": mirrored_weights,
                    "batch_dim": batch_dim,
                    "loss_reduction": loss_reduction,
                    "ignore_index": ignore_index,
                    "extensions": "ok" if refusal is None else f"refused: {refusal}",
                    "pairs": pairs,
                    "part_costs": part_costs,
                },
                {"pairs": any(ext.pairs for ext in self.extensions)},
            )
        except PipelineError:
            self.close()
            if refusal is None:
                raise
            raise refusal from None
        if refusal is not None:  # refused on every rank
            self.close()
            raise refusal
        self.executor.extend(self.extensions)
        # DualPipe's layout holds every stage on two ranks (r and N-1-r)
        self.mirrored: MirroredStages | None = None
        if size % 2 == 0 and self.layout == dualpipe_layout(size):
            self.mirrored = MirroredStages(
                stages, self.layout.rank_stages[self.rank], self.rank, size - 1 - self.rank,
                self.transport,
            )
            self.mirrored.check(mirrored_weights)

    def _handshake(self, group_rank: int, config: dict[str, Any],
                   votes: dict[str, bool]) -> PipelineIdentity:
        """Agree with the other ranks on who this pipeline is and on its configuration;
        settle what the ranks' ``votes`` decide (e.g. whether to pair steps)."""
        pg = self.group if self.group is not None else dist.distributed_c10d._get_default_group()
        ranks = dist.get_process_group_ranks(pg)
        store = self.transport.store
        if store is None:  # no store to meet in: nothing to compare, one pipeline per group
            identity, tally = PipelineIdentity(pg.group_name, tuple(ranks), 0), votes
        else:
            identity, tally = handshake(store, pg.group_name, ranks, group_rank, config,
                                        self.timeout, votes)
        if self._pairs is None:
            self._pairs = tally.get("pairs", False)
        self.transport.key = identity.key
        self.transport.pipeline = identity.number
        return identity

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release what the pipeline holds: its threads and its reference to the
        process group (which stays yours to destroy). Idempotent; also done when the
        pipeline is garbage-collected, and at the end of a ``with`` block."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not self._finalizer.alive

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- compat
    def set_p2p_tensor_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """Like the module-level :func:`~dualpipe.set_p2p_tensor_shapes`, for this pipeline
        only (call it on every rank, before the first step): turns on ``static_shapes``
        and checks them the next time a step discovers its shapes."""
        fixed = tuple(tuple(int(n) for n in shape) for shape in shapes)
        old = self.executor.declared or Declared()
        self.executor.declared = Declared(fixed, old.dtype)
        self.executor.static_shapes = True

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """Like the module-level :func:`~dualpipe.set_p2p_tensor_dtype`, for this pipeline
        only: the dtype is checked the next time a step discovers its shapes."""
        old = self.executor.declared or Declared()
        self.executor.declared = Declared(old.shapes, dtype)

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
            schedule = generate(self.schedule_name, self.num_ranks, num_chunks)
            if self._pairs:
                schedule = pair_steps(schedule, self._part_costs)
            self._schedules[num_chunks] = schedule
        return self._schedules[num_chunks]

    def _ends(self) -> tuple[int | None, int | None]:
        """(stream starting on this rank, stream ending on this rank)."""
        starts = self.layout.streams_starting_on(self.rank)
        ends = self.layout.streams_ending_on(self.rank)
        return (starts[0] if starts else None), (ends[0] if ends else None)

    def sync_grads(self) -> None:
        """DualPipe: give both copies of every stage the sum of their gradients (only
        parameters that require grad and got a gradient on at least one copy; existing
        ``.grad`` tensors are accumulated into in place). Called after each training step
        unless ``sync_mirrored_grads=False``; a no-op for other schedules."""
        if self.mirrored is not None:
            self.mirrored.sum_grads()

    # --------------------------------------------------------------- step
    def step(
        self,
        *inputs: torch.Tensor | None,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor | None] | None = (),
        return_outputs: bool = False,
        record: bool | str = False,
        broadcast_loss: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """Run one step: forward and backward of every micro-batch (or forward only
        under ``torch.no_grad()``).

        Inputs are given on the ranks where a stream starts and labels where it ends
        (DualPipe: rank 0 and rank N-1, each with half the batch; others: rank 0 / the
        last rank); other ranks pass none, or ``None`` as in the original
        (``step(None, num_chunks=..., criterion=..., labels=(None,))``). The criterion
        is called as ``criterion(*outputs, *labels)`` and may take no labels.

        Returns ``(loss, outputs)``: where a stream ends, ``loss`` holds the
        per-micro-batch losses (shape ``[C]``) and, with ``return_outputs``, ``outputs``
        the last stage's outputs concatenated along ``batch_dim`` (a 0-dim output, such as
        an auxiliary loss, stacked per micro-batch: shape ``[C]``); ``None`` elsewhere.
        Gradients equal those of the sum (or, with ``loss_reduction="mean"``, the mean) of
        the per-micro-batch losses.
        ``record=True`` keeps a measured timeline in :attr:`last_record` (see
        :meth:`gather_timeline`), with the memory held after every action on CUDA (the
        allocator's statistics); ``record="memory"`` samples the memory on CPU too
        (every storage the step creates followed until freed: a Python call per
        operation, so that step's times are inflated on CPU). ``broadcast_loss=True``
        (collective) returns every micro-batch's loss of the step (all streams, stream 0's
        first, as float32) on every rank.
        """
        if self.closed:
            raise PipelineError("this pipeline is closed")
        self._step_number += 1
        try:
            if record not in (False, True, "memory"):
                raise ValueError(f"record must be False, True or 'memory', got {record!r}")
            schedule, data = self._prepare(inputs, num_chunks, criterion, labels, return_outputs)
        except (ValueError, ScheduleError) as exc:
            # tell the other ranks at once instead of letting them wait for a timeout
            self.executor.refuse(self._step_number, exc, "invalid step arguments")
            raise
        if self.loss_reduction == "token_mean" and data.training:
            try:
                tokens = self._count_tokens(data)
            except (PipelineError, ValueError) as exc:
                self.executor.refuse(self._step_number, exc, "counting the step's labels")
                raise
            if data.criterion is not None:
                data.criterion = reduced_criterion(data.criterion, "token_mean",
                                                   schedule.num_chunks, tokens)
        mirrored = self.mirrored if data.training and self.sync_mirrored_grads else None
        if mirrored is not None:
            mirrored.set_aside()  # sum this step's gradients only, then accumulate
        try:
            result = self.executor.run(schedule, data, self._step_number, record=record)
            self.last_record = self.executor.last_record
            if mirrored is not None:
                try:
                    mirrored.sum_grads()
                except Exception as exc:
                    self.executor.abandon(exc)  # a failed pipeline stays failed
                    raise
        except BaseException:
            if mirrored is not None:
                mirrored.put_back()
            raise
        end = self._ends()[1]
        loss = torch.stack(result.losses) if result.losses else None
        if broadcast_loss:
            loss = share_losses(loss, end, schedule.chunks_per_stream,
                                self.layout.num_streams, self.group, self.transport.device,
                                self.transport)
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
        inputs: tuple[torch.Tensor | None, ...],
        num_chunks: int,
        criterion: Callable[..., torch.Tensor] | None,
        labels: Sequence[torch.Tensor | None] | None,
        return_outputs: bool,
    ) -> tuple[Schedule, StepData]:
        """Check this rank's step arguments (no communication) and split them.

        As in the original, ``None`` entries stand for "nothing": a rank where no stream
        starts (ends) may pass ``None`` inputs (labels), e.g. ``step(None, ...,
        labels=(None,))``; where a stream starts (ends), a ``None`` entry is handed to the
        first stage (the criterion) as ``None`` for every micro-batch."""
        training = torch.is_grad_enabled()
        schedule = self._schedule(num_chunks)  # raises ScheduleError on bad counts
        chunks = schedule.chunks_per_stream
        start, end = self._ends()
        labels = tuple(labels) if labels is not None else ()
        has_inputs = any(t is not None for t in inputs)
        if start is None and has_inputs:
            raise ValueError(f"rank {self.rank} takes no inputs in {self.schedule_name}")
        if start is not None and not has_inputs:
            raise ValueError(f"rank {self.rank} needs the inputs of the stream that starts there")
        if training and end is not None and criterion is None:
            raise ValueError(
                f"rank {self.rank} computes the loss: training (grad enabled) needs a criterion "
                "here; use torch.no_grad() for inference"
            )
        if end is None and any(t is not None for t in labels):
            raise ValueError(f"rank {self.rank} takes no labels in {self.schedule_name}")
        data = StepData(
            inputs=(scatter_microbatches(inputs, chunks, self.batch_dim, "inputs")
                    if has_inputs else None),
            labels=scatter_microbatches(labels, chunks, self.batch_dim, "labels")
            if end is not None
            else None,
            criterion=(
                reduced_criterion(criterion, self.loss_reduction, schedule.num_chunks)
                if criterion is not None and self.loss_reduction != "token_mean"
                else criterion
            ),
            return_outputs=return_outputs,
            training=training,
        )
        return schedule, data

    def _count_tokens(self, data: StepData) -> int:
        """The step's count of valid labels: this rank's, plus the other stream ends'
        (DualPipe's two ends swap theirs through the store), plus the data-parallel
        replicas' (an all-reduce over ``data_group`` among the ranks with labels)."""
        ends = sorted({self.layout.paths[s][-1][0] for s in range(self.layout.num_streams)})
        if self.rank not in ends:
            return 0
        mine = count_labels(data.labels, self.ignore_index)
        total = mine
        others = [r for r in ends if r != self.rank]
        if others:
            notes = self.transport.swap_notes(
                f"tokens/{self._step_number}", str(mine).encode(), others,
                "the other stream end's label count")
            total += sum(int(v) for v in notes.values())
            # the other end read this rank's previous count before it could send anything
            # of that step, so before this step began here: free it
            self.transport.forget_note(f"tokens/{self._step_number - 1}")
        if self.data_group is not None:
            buf = torch.tensor([float(total)], dtype=torch.float64, device=self.device)
            # waited for with the failure check: a replica that failed never joins
            all_reduce(buf, self.data_group, self.transport,
                       "the all-reduce of the step's label count over data_group")
            total = int(buf.item())
        self.last_token_count = total
        return total

    def gather_timeline(self, dst: int | None = 0) -> MeasuredTimeline | None:
        """Collective: the measured timeline of the last ``step(..., record=True)`` of
        every rank, returned on pipeline rank ``dst`` (None elsewhere; every rank with
        ``dst=None``). Draw it with :meth:`MeasuredTimeline.save_png` and
        :meth:`MeasuredTimeline.save_trace`."""
        if self.last_record is None:
            raise RuntimeError("no recorded step: call step(..., record=True) first")
        assert self.executor.last_plan is not None
        schedule = self.executor.last_plan.schedule
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
        modules: nn.Module | Iterable[nn.Module],
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
