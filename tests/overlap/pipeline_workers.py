"""Spawned-rank functions: DualPipeV / DualPipe on 2 pipeline ranks x 2 expert-parallel
ranks (4 processes, a DeviceMesh), stages written as parts, against one process."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dualpipe.runtime.extension import Extension
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.runtime.plan import PlannedStep
from dualpipe.schedules.actions import Op, Overlap, parse_step
from dualpipe.schedules.registry import generate, layout_for
from dualpipe.schedules.schedule import Schedule

from ..runtime.kernels_workers import OriginalHook
from .parted_models import DIM, MoEStage, expert_owner

TOKENS = 4  # per micro-batch and expert-parallel rank


def _data(ep_rank: int, chunks: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7 + ep_rank)
    return torch.randn(chunks * TOKENS, DIM, generator=g), torch.randn(chunks * TOKENS, DIM,
                                                                        generator=g)


def _criterion(out: Tensor, label: Tensor) -> Tensor:
    return F.mse_loss(out, label)


class HookedMoEStage(OriginalHook, MoEStage):
    """A parted stage whose class also defines the original's hook: the hook wins."""


def pipeline_cases(rank: int, world: int,
                   cases: list[tuple[str, int, str | None, bool, bool | None]]
                   ) -> list[tuple[int, list[str]]]:
    """:func:`moe_pipeline` for each ``(schedule, chunks, ckpt, train, pairs)``: how many
    interleaved pairs each training step showed, and the kinds of pair it ran."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    return [moe_pipeline(rank, mesh, *case) for case in cases]


def moe_pipeline(rank: int, mesh: DeviceMesh, schedule: str, chunks: int, ckpt: str | None,
                 train: bool, pairs: bool | None) -> tuple[int, list[str]]:
    """One step on the pipeline vs every expert-parallel shard on one process; the
    number of places where a part of one micro-batch ran between two parts of another
    in one pair (``B F B``, ``F F' F``, ``B B' B``), and the kinds of pair in the step."""
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank, ep_rank = rank // 2, rank % 2
    layout = layout_for(schedule, 2)
    torch.manual_seed(0)
    cls = HookedMoEStage if ckpt == "hook" else MoEStage
    stages = [cls(ep, ckpt=None if ckpt == "hook" else ckpt) for _ in range(layout.num_stages)]
    HookedMoEStage.calls = 0
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[pp_rank]]
    pipe = Pipeline(mine, schedule, process_group=pp, timeout=60, pairs=pairs)
    streams = layout.num_streams
    per = chunks // streams
    x, y = _data(ep_rank, chunks)
    start = [s for s, p in enumerate(layout.paths) if p[0][0] == pp_rank]
    end = [s for s, p in enumerate(layout.paths) if p[-1][0] == pp_rank]

    def rows(s: int) -> slice:
        return slice(s * per * TOKENS, (s + 1) * per * TOKENS)

    with torch.set_grad_enabled(train):
        loss, outs = pipe.step(
            *((x[rows(start[0])],) if start else ()),
            num_chunks=chunks,
            criterion=_criterion,
            labels=(y[rows(end[0])],) if end else (),
            return_outputs=True,
            record=train,
        )

    # one process: the same stages, every shard's micro-batches through local_forward
    def reference(shards: list[int]) -> tuple[list[list[Tensor]], list[torch.nn.Module]]:
        ref = copy.deepcopy(stages)
        losses: list[list[Tensor]] = []
        for shard in shards:
            xs, ys = _data(shard, chunks)
            per_stream = []
            for s in range(streams):
                for m in range(per):
                    r = slice((s * per + m) * TOKENS, (s * per + m + 1) * TOKENS)
                    h = xs[r]
                    for k in layout.stages[s]:
                        h = ref[k].local_forward(h)
                    lo = _criterion(h, ys[r])
                    if train:
                        lo.backward()
                    if shard == ep_rank and s == (end[0] if end else -1):
                        per_stream.append(lo.detach())
            if shard == ep_rank:
                losses.append(per_stream)
        return losses, ref

    own_losses, own = reference([ep_rank])
    if end:
        assert torch.equal(loss, torch.stack(own_losses[0])), (loss, own_losses)
    plan = pipe.executor.last_plan
    assert plan is not None
    kinds = sorted({s.kind.value for s in plan.schedule.steps[pp_rank] if isinstance(s, Overlap)})
    if not train:
        return 0, kinds
    _, every = reference([0, 1])
    for k, module in zip(layout.rank_stages[pp_rank], mine, strict=True):
        for name, p in module.named_parameters():
            owner = expert_owner(name, module.local)
            if owner is None:
                want = dict(own[k].named_parameters())[name].grad
            elif owner == ep_rank:
                want = dict(every[k].named_parameters())[name].grad
            else:
                assert p.grad is None or not p.grad.any(), name
                continue
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6, msg=name)
    parts = pipe.executor.last_record.parts if pipe.executor.last_record is not None else []
    # pairs interleaved: a forward part ran between two backward parts of one pair
    interleaved = 0
    labels = [e.label.rsplit(" ", 1)[0] for e in parts if e.kind == "compute"]
    for a, b, c in zip(labels, labels[1:], labels[2:], strict=False):
        if a == c != b and (a, b) in (("B part", "F part"), ("F part", "F' part"),
                                       ("B part", "B' part")):
            interleaved += 1
    if ckpt == "hook":  # every full-backward pair went to the hook, none interleaved
        pairs = sum(isinstance(s, Overlap) and s.second.op is Op.BACKWARD
                    for s in generate(schedule, 2, chunks).steps[pp_rank])
        assert HookedMoEStage.calls == pairs > 0 and interleaved == 0
        return -1, kinds
    return interleaved, kinds



def _failing_step(pipe: Pipeline, pp_rank: int, ep_rank: int) -> tuple[str, float]:
    """One DualPipeV step of 4 micro-batches expected to fail: the error this process
    got (``"no error"`` if none) and how long the step took."""
    import time

    from dualpipe.errors import PipelineError

    x, y = _data(ep_rank, 4)
    t0 = time.monotonic()
    try:
        pipe.step(*((x,) if pp_rank == 0 else ()), num_chunks=4, criterion=_criterion,
                  labels=(y,) if pp_rank == 0 else ())
        message = "no error"
    except PipelineError as exc:
        message = f"{type(exc).__name__}: {exc}"
    return message, time.monotonic() - t0


class _Exploding(MoEStage):
    """Raises in its first computation part on the process that ``boom`` names."""

    boom = -1

    def parts(self, x: Tensor):  # noqa: ANN201 - a parts generator
        if torch.distributed.get_rank() == self.boom:
            raise RuntimeError("boom in a part")
        return (yield from super().parts(x))


def failure_reaches_the_job(rank: int, world: int) -> tuple[str, float]:
    """2 pipelines x 2 expert-parallel ranks; process 2's part raises in the first step.
    Returns this process's error and how long its step took. The other pipeline's ranks
    wait in all-to-alls with the failed process: they must hear of it, not time out."""

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank, ep_rank = rank // 2, rank % 2
    layout = layout_for("dualpipev", 2)
    torch.manual_seed(0)
    _Exploding.boom = 2
    stages = [_Exploding(ep) for _ in range(layout.num_stages)]
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[pp_rank]]
    pipe = Pipeline(mine, "dualpipev", process_group=pp, timeout=60)
    message, elapsed = _failing_step(pipe, pp_rank, ep_rank)
    pipe.close()
    torch.distributed.barrier()  # process 0 hosts the store: it stays until all are done
    return message, elapsed


class _Boom(torch.autograd.Function):
    """Identity whose backward raises while :attr:`_ArmedStage.armed`."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        if _ArmedStage.armed:
            raise RuntimeError("boom in a pair's backward")
        return grad


class _ArmedStage(MoEStage):
    """Raises in its first forward part, or in its last part's backward, while armed."""

    armed = False

    def parts(self, x: Tensor):  # noqa: ANN201 - a parts generator
        if _ArmedStage.armed:
            raise RuntimeError("boom in a pair's forward")
        out = yield from super().parts(x)
        return _Boom.apply(out)


class _Arm(Extension):
    """Arms :class:`_ArmedStage` on this process just before the step ``label`` runs."""

    name = "arm"

    def __init__(self, label: str) -> None:
        self.label = label

    def before_action(self, step: PlannedStep) -> None:
        _ArmedStage.armed = str(step.label) == self.label


def _rank0_rewritten(old: str, new: str) -> Schedule:
    """DualPipeV on 2 ranks, 4 micro-batches, with ``old`` in rank 0's list written as
    ``new`` (a pair made by hand)."""
    base = generate("dualpipev", 2, 4)
    row0 = " ".join(str(s) for s in base.steps[0])
    assert old in row0, row0
    rows = (tuple(parse_step(t) for t in row0.replace(old, new).split()), base.steps[1])
    return Schedule("dualpipev", base.layout, base.chunks_per_stream, rows)


def failure_inside_a_pair(rank: int, world: int, kind: str) -> tuple[str, float, list[str]]:
    """A part raises inside a pair of two forwards (``kind="FF"``: process 2, in
    ``F1.0+F0.1``) or two backwards (``"BB"``: process 0, in ``B1.2+B0.1`` of a
    schedule written by hand, while every rank still has work in the step; ``"late"``:
    in ``I0.2+I0.3``, the step's last). Returns this process's error, how long its step
    took and the kinds of pair of its schedule."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank, ep_rank = rank // 2, rank % 2
    layout = layout_for("dualpipev", 2)
    torch.manual_seed(0)
    stages = [_ArmedStage(ep) for _ in range(layout.num_stages)]
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[pp_rank]]
    if kind == "FF":
        schedule: str | Schedule = "dualpipev"
        label = "F1.0+F0.1" if rank == 2 else "-"
    elif kind == "late":  # the last pair of the step, after pipeline rank 1 finished
        schedule = _rank0_rewritten("I0.2 W0.2 I0.3 W0.3", "I0.2+I0.3 W0.2 W0.3")
        label = "I0.2+I0.3" if rank == 0 else "-"
    else:
        schedule = _rank0_rewritten("B1.2 F1.3+B0.1 B1.3", "B1.2+B0.1 F1.3 B1.3")
        label = "B1.2+B0.1" if rank == 0 else "-"
    pipe = Pipeline(mine, schedule, process_group=pp, timeout=60, extensions=[_Arm(label)])
    message, elapsed = _failing_step(pipe, pp_rank, ep_rank)
    _ArmedStage.armed = False
    plan = pipe.executor.last_plan
    kinds = sorted({s.kind.value for s in plan.schedule.steps[pp_rank]
                    if isinstance(s, Overlap)}) if plan is not None else []
    pipe.close()
    torch.distributed.barrier()  # process 0 hosts the store: it stays until all are done
    return message, elapsed, kinds
