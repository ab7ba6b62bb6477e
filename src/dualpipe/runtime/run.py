"""The state of one step on one rank (:class:`StepRun`) and the primitives kernels build
actions from."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..errors import PipelineError
from ..schedules.actions import Action, Overlap
from ..transport.base import BaseTransport
from ..transport.protocol import Stamp
from ..transport.wire import TensorMeta, encode_header
from .mailbox import Mailbox
from .plan import ActionPlan, ExecutionPlan, HandOff, PlannedStep, Route
from .record import StepRecord
from .shapes import BoundaryShapes

__all__ = ["StepData", "StepResult", "StepRun", "DeferredWork"]


class DeferredWork(Protocol):
    """Weight-gradient work an input-only backward leaves for its ``W``."""

    def run(self) -> None:
        """Do the work (once)."""


_NO_GRAD_LOSS = (
    "the loss of micro-batch {chunk} does not require grad (it has no grad_fn), so no "
    "gradient can reach the model; one process would fail in loss.backward() too. The "
    "criterion or a stage cut the graph (.detach(), .item(), torch.no_grad()), or "
    "reentrant activation checkpointing wraps stages whose inputs need no gradient (token "
    "ids): use use_reentrant=False there"
)


@dataclass
class StepData:
    """This rank's part of a step's data.

    Attributes:
        inputs: per micro-batch, the inputs of the stream that starts on this rank
            (``None`` entries are passed to the first stage as they are).
        labels: per micro-batch, the labels of the stream that ends on this rank.
        criterion: ``criterion(*outputs, *labels) -> scalar loss``.
        return_outputs: keep the last stage's outputs.
        training: run backwards (False: forward-only inference).
    """

    inputs: list[tuple[torch.Tensor | None, ...]] | None
    labels: list[tuple[torch.Tensor | None, ...]] | None
    criterion: Callable[..., torch.Tensor] | None
    return_outputs: bool
    training: bool


@dataclass
class StepResult:
    """What a step leaves on this rank: per-micro-batch losses and outputs of the
    stream that ends here (empty elsewhere)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def as_tensors(out: Any) -> tuple[torch.Tensor, ...]:
    """A stage's return value as a tuple of tensors (or a clear error)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise PipelineError(
        f"a stage must return a tensor or a tuple of tensors, got {type(out).__name__}"
    )


class StepRun:
    """Everything one step holds on one rank, and the primitives kernels use.

    Lifetime: one step. It holds the stage inputs and output roots kept for the
    backward (``saved``), the deferred weight work of input-only backwards
    (``deferred``), local hand-offs between the rank's own stages, the losses and
    outputs, the mailbox, the record and the plug-ins' per-step state (``extras``); all
    of it is dropped with the run.

    Attributes:
        plan: this rank's execution plan of the step's schedule.
        data: the step's inputs, labels and flags.
        modules: the rank's modules (indexed by ``ActionPlan.module``).
        split: input-only backwards defer the weight work (False: full backwards).
        keep_outputs: keep stage outputs (not just their graph edges) for the backward
            (stages with ``overlapped_forward_backward`` receive them).
        mailbox: the step's sends and receives.
        record: the measured timeline, when asked for.
        label: what is running now (errors name it); the executor sets it per step, a
            pair kernel narrows it to the half it runs.
        extras: per-step state of plug-ins, under a name of their own.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        data: StepData,
        modules: Sequence[nn.Module],
        transport: BaseTransport,
        shapes: BoundaryShapes,
        split: bool,
        keep_outputs: bool,
        stamp: Stamp,
        record: StepRecord | None,
    ) -> None:
        self.plan = plan
        self.data = data
        self.modules = modules
        self.transport = transport
        self.shapes = shapes
        self.split = split
        self.keep_outputs = keep_outputs
        self.record = record
        self.mailbox = Mailbox(plan, transport, shapes, stamp, record)
        self.saved: dict[tuple[int, int], tuple[list[Any], list[torch.Tensor]]] = {}
        self.deferred: dict[tuple[int, int], DeferredWork | None] = {}
        self.local: dict[HandOff, list[torch.Tensor]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.label: Action | Overlap | None = None
        self.extras: dict[str, Any] = {}
        self.warned: set[int] = set()  # modules warned about in this step

    # ------------------------------------------------------------ running
    def receive(self, step: PlannedStep) -> None:
        """Post the receives due before ``step`` and wait for every message it needs."""
        self.mailbox.post(step)
        for a in step.actions:
            for msg in a.recvs:
                self.mailbox.complete(msg)

    def result(self) -> StepResult:
        """The losses and outputs, in micro-batch order; checks no W was forgotten."""
        leftover = [k for k, v in self.deferred.items() if v is not None]
        if leftover:
            raise PipelineError(
                f"rank {self.plan.rank}: weight gradients never run for {leftover}"
            )
        return StepResult(
            [self.losses[k] for k in sorted(self.losses)],
            [self.outputs[k] for k in sorted(self.outputs)],
        )

    # ------------------------------------------------------------ primitives
    def module(self, a: ActionPlan) -> nn.Module:
        """The module ``a`` runs."""
        return self.modules[a.module]

    def labels(self, a: ActionPlan) -> tuple[torch.Tensor | None, ...]:
        """The labels of ``a``'s micro-batch (at the end of a stream)."""
        labels = self.data.labels
        assert labels is not None
        return labels[a.action.chunk]

    def forward_inputs(self, a: ActionPlan) -> tuple[torch.Tensor | None, ...]:
        """The inputs of forward ``a``: step data (where ``None`` entries are passed on
        as they are), a local hand-off or a message."""
        training = self.data.training
        if a.source is Route.DATA:
            assert self.data.inputs is not None
            return self.data.inputs[a.action.chunk]
        if a.source is Route.LOCAL:
            assert a.source_key is not None
            outs = self.local.pop(a.source_key)
            return tuple(t.detach().requires_grad_(training and t.requires_grad) for t in outs)
        msg = a.payload_recv
        assert msg is not None
        bufs = self.mailbox.take(msg)
        if training:
            metas = self.shapes.received[(msg.stream, msg.position)]
            for t, m in zip(bufs, metas, strict=True):
                if m.requires_grad:
                    t.requires_grad_(True)
        return tuple(bufs)

    def finish_forward(
        self,
        a: ActionPlan,
        inputs: Sequence[torch.Tensor | None],
        out: Any,
        loss: torch.Tensor | None,
    ) -> None:
        """Keep what forward ``a``'s backward needs and pass its outputs on (or compute
        the loss at the end of the stream). ``loss`` is given when the stage computed it."""
        outputs = as_tensors(out)
        chunk = a.action.chunk
        leaves = (
            [t for t in inputs if t is not None and t.requires_grad and t.grad_fn is None]
            if a.position
            else []
        )
        training = self.data.training
        if a.sink is Route.LOSS:
            if loss is None and self.data.criterion is not None:
                loss = self.data.criterion(*outputs, *self.labels(a))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise PipelineError("criterion must return a scalar tensor")
            if loss is not None:
                self.losses[chunk] = loss.detach()
            if self.data.return_outputs:
                self.outputs[chunk] = tuple(t.detach() for t in outputs)
            if training:
                assert loss is not None
                if not loss.requires_grad:
                    raise PipelineError(_NO_GRAD_LOSS.format(chunk=chunk))
                self.saved[(a.action.phase, chunk)] = ([loss], leaves)
            return
        if training:
            roots: list[Any] = [t for t in outputs if t.requires_grad]
            if not roots:
                self._check_output_grad(a)
            if not self.keep_outputs:
                # keep only the outputs' places in the graph: a sent activation is freed as
                # soon as its send completes, not at its backward
                roots = [get_gradient_edge(t) for t in roots]
            self.saved[(a.action.phase, chunk)] = (roots, leaves)
        if a.sink is Route.LOCAL:
            assert a.sink_key is not None
            self.local[a.sink_key] = list(outputs)
            return
        metas = [TensorMeta.of(t) for t in outputs]
        if not training:
            metas = [TensorMeta(m.shape, m.dtype, False) for m in metas]
        self.shapes.note_sent((a.stream, a.position), metas, chunk)
        self.send(a, list(outputs), metas)

    def _check_output_grad(self, a: ActionPlan) -> None:
        """Warn (once per stage and step) when forward ``a``'s outputs carry no gradient
        although its stage has parameters that require grad: those parameters can get no
        gradient from this micro-batch. Not an error: one process computes exactly the
        same (torch leaves them without gradient too), and detaching a stage's output is a
        legitimate way to stop gradients; freezing the parameters silences the warning."""
        if a.module in self.warned:
            return
        self.warned.add(a.module)
        if any(p.requires_grad for p in self.modules[a.module].parameters()):
            stage = self.plan.schedule.layout.rank_stages[self.plan.rank][a.module]
            warnings.warn(
                f"dualpipe: the outputs of stage {stage} (rank {self.plan.rank}, "
                f"{a.action}) carry no gradient although it has parameters that require "
                "grad, so they get none (as on one process). Reentrant activation "
                "checkpointing around a stage whose inputs need no gradient (token ids) "
                "does this: use use_reentrant=False there; or, if intended, freeze them "
                "(requires_grad_(False)).",
                UserWarning,
                stacklevel=2,
            )

    def output_grads(self, a: ActionPlan) -> list[torch.Tensor | None]:
        """Gradients of backward ``a``'s stage outputs (``[None]`` for a loss)."""
        if a.source is Route.LOSS:
            return [None]
        if a.source is Route.LOCAL:
            assert a.source_key is not None
            return list(self.local.pop(a.source_key))
        msg = a.payload_recv
        assert msg is not None
        return list(self.mailbox.take(msg))

    def pop_saved(self, a: ActionPlan) -> tuple[list[Any], list[torch.Tensor]]:
        """``(output roots, input leaves)`` kept by ``a``'s forward, handed over once."""
        return self.saved.pop((a.action.phase, a.action.chunk))

    def finish_backward(
        self, a: ActionPlan, leaves: list[torch.Tensor], in_grads: Sequence[torch.Tensor | None]
    ) -> None:
        """Pass backward ``a``'s input gradients on (zeros where an input got none)."""
        if a.sink is Route.NONE:
            return
        grads = [
            g if g is not None else torch.zeros_like(leaf)
            for leaf, g in zip(leaves, in_grads, strict=True)
        ]
        if a.sink is Route.LOCAL:
            assert a.sink_key is not None
            self.local[a.sink_key] = grads
        else:
            self.send(a, grads, None)

    def send(self, a: ActionPlan, tensors: list[torch.Tensor],
             metas: list[TensorMeta] | None) -> None:
        """Post ``a``'s messages (the header from ``metas`` first, when planned)."""
        device = self.transport.device
        for msg in a.sends:
            if msg.header:
                assert metas is not None
                self.mailbox.send(msg, [encode_header(metas, device)])
            else:
                self.mailbox.send(msg, [t.detach().contiguous() for t in tensors])
