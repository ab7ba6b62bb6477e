"""Functions run on spawned ranks by the runtime tests (see dualpipe.testing)."""

from __future__ import annotations

import copy
import threading
import time

import torch
from torch import nn

from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules.registry import layout_for
from dualpipe.schedules.schedule import Schedule

from .models import build_stages, criterion, make_batch


def _reference(
    stages: list[nn.Module],
    streams: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]],
    chunks: int,
    train: bool,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Run every micro-batch through the whole model on one process, in stream order."""
    losses: list[list[torch.Tensor]] = []
    outputs: list[list[torch.Tensor]] = []
    for inputs, labels in streams:
        xs = [t.tensor_split(chunks) for t in inputs]
        ys = labels.tensor_split(chunks)
        ls, os_ = [], []
        for m in range(chunks):
            h: tuple[torch.Tensor, ...] = tuple(x[m] for x in xs)
            for stage in stages:
                out = stage(*h)
                h = out if isinstance(out, tuple) else (out,)
            loss = criterion(*h, ys[m])
            if train:
                loss.backward()
            ls.append(loss.detach())
            os_.append(h[0].detach())
        losses.append(ls)
        outputs.append(os_)
    return losses, outputs


def check_pipeline(
    rank: int,
    world: int,
    schedule: str | Schedule,
    kind: str,
    chunk_counts: list[int],
    split_backward: bool = True,
    rank_mapping: list[int] | None = None,
) -> list[str]:
    """Train and infer with the pipeline; compare with the single-process model.

    Losses and outputs must be bit-equal; gradients equal to rounding. Each chunk
    count also changes the batch size, so shapes change between steps. With
    ``rank_mapping``, process ``g`` acts as pipeline rank ``rank_mapping[g]``. A
    :class:`Schedule` runs as given (its own number of micro-batches)."""
    layout = schedule.layout if isinstance(schedule, Schedule) else layout_for(schedule, world)
    if rank_mapping is not None:
        rank = rank_mapping[rank]
    streams = layout.num_streams
    report = []
    for step, num_chunks in enumerate(chunk_counts):
        chunks = num_chunks // streams
        stages = build_stages(kind, layout.num_stages, seed=step)
        ref = copy.deepcopy(stages)
        mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[rank]]
        pipe = Pipeline(
            mine, schedule, timeout=60, split_backward=split_backward, rank_mapping=rank_mapping
        )
        per_stream = chunks * (2 + step % 2)
        inputs, labels = make_batch(kind, per_stream * streams, seed=step + 10)
        data = [
            (
                tuple(t[s * per_stream : (s + 1) * per_stream] for t in inputs),
                labels[s * per_stream : (s + 1) * per_stream],
            )
            for s in range(streams)
        ]
        start = layout.streams_starting_on(rank)
        end = layout.streams_ending_on(rank)
        my_inputs = data[start[0]][0] if start else ()
        my_labels = (data[end[0]][1],) if end else ()

        loss, outs = pipe.step(
            *my_inputs,
            num_chunks=num_chunks,
            criterion=criterion,
            labels=my_labels,
            return_outputs=True,
        )
        ref_losses, ref_outs = _reference(ref, data, chunks, train=True)
        if end:
            assert loss is not None and outs is not None
            outs = outs[0] if isinstance(outs, tuple) else outs
            expect = torch.stack(ref_losses[end[0]])
            assert torch.equal(loss, expect), (loss, expect)
            assert torch.equal(outs, torch.cat(ref_outs[end[0]])), "outputs differ"
        else:
            assert loss is None and outs is None
        for k, module in zip(layout.rank_stages[rank], mine, strict=True):
            for (name, p), q in zip(module.named_parameters(), ref[k].parameters(), strict=True):
                assert q.grad is not None, (k, name)
                assert p.grad is not None, f"stage {k} {name}: no gradient"
                torch.testing.assert_close(
                    p.grad,
                    q.grad,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, k=k, n=name: f"stage {k} {n}: {m}",
                )

        with torch.no_grad():
            loss2, outs2 = pipe.step(
                *my_inputs,
                num_chunks=num_chunks,
                criterion=criterion,
                labels=my_labels,
                return_outputs=True,
            )
            ref_losses2, ref_outs2 = _reference(
                mine_ref := copy.deepcopy(stages), data, chunks, train=False
            )
            del mine_ref
        if end:
            outs2 = outs2[0] if isinstance(outs2, tuple) else outs2
            assert torch.equal(outs2, torch.cat(ref_outs2[end[0]])), "inference outputs differ"
            assert torch.equal(loss2, torch.stack(ref_losses2[end[0]]))
        name = schedule.name if isinstance(schedule, Schedule) else schedule
        report.append(f"{name} ranks={world} chunks={num_chunks} ok")
    return report


def check_many(
    rank: int, world: int, cases: list[tuple[str | Schedule, str, list[int]]]
) -> list[str]:
    """Run :func:`check_pipeline` for several (schedule, model kind, chunk counts) cases."""
    out: list[str] = []
    for schedule, kind, chunk_counts in cases:
        out += check_pipeline(rank, world, schedule, kind, chunk_counts)
    return out


def check_static_shapes(rank: int, world: int) -> tuple[int, int, str]:
    """static_shapes: headers only on the first step, results still exact, and a shape
    change afterwards is a clear error. Returns (headers in step 1 plan, headers in
    step 2 plan, error message)."""
    from dualpipe.errors import PipelineError

    layout = layout_for("dualpipev", world)
    stages = build_stages("mlp", layout.num_stages, seed=5)
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[rank]]
    pipe = Pipeline(mine, "dualpipev", timeout=30, static_shapes=True)
    inputs, labels = make_batch("mlp", 8, seed=7)
    headers = []
    for _ in range(2):
        for p in pipe.parameters():
            p.grad = None
        ref = copy.deepcopy(stages)
        if rank == 0:
            loss, _ = pipe.step(
                *inputs, num_chunks=2 * world, criterion=criterion, labels=(labels,)
            )
            ref_losses, _ = _reference(ref, [(inputs, labels)], 2 * world, train=True)
            assert torch.equal(loss, torch.stack(ref_losses[0]))
        else:
            pipe.step(num_chunks=2 * world, criterion=criterion)
        plan = pipe.executor.last_plan
        assert plan is not None
        headers.append(sum(m.header for m in plan.messages))
    message = ""
    try:
        if rank == 0:
            bigger = make_batch("mlp", 16, seed=7)
            pipe.step(*bigger[0], num_chunks=2 * world, criterion=criterion, labels=(bigger[1],))
        else:
            pipe.step(num_chunks=2 * world, criterion=criterion)
    except PipelineError as exc:
        message = str(exc)
        time.sleep(1.0)  # rank 0 hosts the store: let the others read the error first
    return headers[0], headers[1], message


def check_mapped(rank: int, world: int) -> list[str]:
    """DualPipe and DualPipeV with the pipeline ranks in reverse process order."""
    mapping = list(reversed(range(world)))
    return check_pipeline(
        rank, world, "dualpipev", "mlp", [2 * world], rank_mapping=mapping
    ) + check_pipeline(rank, world, "dualpipe", "mlp", [2 * world], rank_mapping=mapping)


CUSTOM_TEXT = """\
rank 0: F0.0 F0.1 I0.0 F0.2 I0.1 W0.0 B0.2 W0.1
rank 1: F0.0 B0.0 F0.1 I0.1 F0.2 B0.2 W0.1
"""


def check_custom_schedule(rank: int, world: int) -> list[str]:
    """A hand-written schedule runs exactly; an unsound one and a wrong chunk count are
    refused with clear errors."""
    from dualpipe.errors import ScheduleError
    from dualpipe.schedules.layout import linear_layout
    from dualpipe.schedules.schedule import Schedule

    schedule = Schedule.from_text(CUSTOM_TEXT, linear_layout(2), name="mine")
    stages = build_stages("mlp", 2, seed=3)
    ref = copy.deepcopy(stages)
    pipe = Pipeline([copy.deepcopy(stages[rank])], schedule, timeout=30)
    inputs, labels = make_batch("mlp", 6, seed=4)
    if rank == 0:
        loss, _ = pipe.step(*inputs, num_chunks=3, criterion=criterion)
        assert loss is None
    else:
        loss, _ = pipe.step(num_chunks=3, criterion=criterion, labels=(labels,))
        ref_losses, _ = _reference(ref, [(inputs, labels)], 3, train=True)
        assert torch.equal(loss, torch.stack(ref_losses[0]))
    if rank == 1:
        for p, q in zip(pipe.parameters(), ref[1].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    messages = []
    try:
        pipe.step(*(inputs if rank == 0 else ()), num_chunks=4, criterion=criterion,
                  labels=(labels,) if rank == 1 else ())
    except ScheduleError as exc:
        messages.append(str(exc))
    broken = Schedule.from_text(CUSTOM_TEXT.replace("W0.0 ", ""), linear_layout(2))
    try:
        Pipeline([copy.deepcopy(stages[rank])], broken, timeout=30)
    except ScheduleError as exc:
        messages.append(str(exc))
    return messages


def check_large_sends(rank: int, world: int) -> list[str]:
    """Every send goes through gloo's per-peer large-send thread (threshold lowered to
    1 byte; 2 ranks): the results are the same, exactly."""
    from dualpipe.transport.process_group import Transport

    Transport.large_message = 1
    report = check_pipeline(rank, world, "dualpipev", "mlp", [4, 5])
    report += check_pipeline(rank, world, "dualpipe", "two", [4])
    threads = {t.name for t in threading.enumerate()}
    layout = layout_for("dualpipev", world)
    stages = build_stages("mlp", layout.num_stages)
    pipe = Pipeline([stages[k] for k in layout.rank_stages[rank]], "dualpipev", timeout=60)
    inputs, labels = make_batch("mlp", 4)
    pipe.step(*(inputs if layout.streams_starting_on(rank) else ()), num_chunks=4,
              criterion=criterion, labels=(labels,) if layout.streams_ending_on(rank) else ())
    threads |= {t.name for t in threading.enumerate()}
    pipe.close()
    peer = f"dualpipe-send-to-{1 - rank}"
    assert peer in threads  # the large sends' thread ran, and close() ended it
    assert peer not in {t.name for t in threading.enumerate()}
    return report
