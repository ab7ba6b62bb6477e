"""The executor in one process: every rank on a thread, messages through the in-process
transport. Results equal the single-process model; failures reach every rank."""

from __future__ import annotations

import copy

import pytest
import torch

from dualpipe.errors import PipelineError
from dualpipe.runtime.executor import Executor, StepData
from dualpipe.runtime.kernels import DEFAULT_KERNELS
from dualpipe.runtime.microbatch import scatter_microbatches
from dualpipe.schedules.generators import generate
from dualpipe.transport.local import LocalNetwork, LocalTransport

from .models import build_stages, criterion, make_batch
from .workers import _reference


def _step(name: str, ranks: int, chunks: int, kind: str, training: bool,
          network: LocalNetwork | None = None, **executor_kw):
    """Run one step of ``name`` in-process; returns (per-rank results, reference, modules,
    network)."""
    schedule = generate(name, ranks, chunks)
    layout = schedule.layout
    per_stream = schedule.chunks_per_stream
    stages = build_stages(kind, layout.num_stages, seed=1)
    ref = copy.deepcopy(stages)
    inputs, labels = make_batch(kind, 2 * per_stream * layout.num_streams, seed=2)
    size = 2 * per_stream
    data = [
        (tuple(t[s * size : (s + 1) * size] for t in inputs), labels[s * size : (s + 1) * size])
        for s in range(layout.num_streams)
    ]
    mods = {r: [copy.deepcopy(stages[k]) for k in layout.rank_stages[r]] for r in range(ranks)}
    network = network if network is not None else LocalNetwork(ranks, timeout=5.0)

    def rank_fn(rank: int, transport: LocalTransport):
        starts, ends = layout.streams_starting_on(rank), layout.streams_ending_on(rank)
        step = StepData(
            inputs=(scatter_microbatches(data[starts[0]][0], per_stream, 0, "inputs")
                    if starts else None),
            labels=(scatter_microbatches((data[ends[0]][1],), per_stream, 0, "labels")
                    if ends else None),
            criterion=criterion,
            return_outputs=True,
            training=training,
        )
        executor = Executor(rank, mods[rank], transport, **executor_kw)
        with torch.set_grad_enabled(training):
            return executor.run(schedule, step)

    results = network.run(rank_fn)
    with torch.set_grad_enabled(training):
        reference = _reference(ref, data, per_stream, train=training)
    return results, reference, (mods, ref, layout), network


@pytest.mark.parametrize(
    "name,ranks,chunks",
    [("dualpipev", 1, 2), ("dualpipev", 2, 5), ("dualpipev", 3, 6), ("dualpipe", 2, 4),
     ("dualpipe", 4, 8), ("1f1b", 3, 4), ("zb1p", 3, 5), ("gpipe", 2, 3)],
)
@pytest.mark.parametrize("kind", ["mlp", "two"])
def test_in_process_step_matches_single_process(name: str, ranks: int, chunks: int,
                                                 kind: str) -> None:
    results, (ref_losses, ref_outs), (mods, ref, layout), network = _step(
        name, ranks, chunks, kind, training=True
    )
    for rank, result in enumerate(results):
        ends = layout.streams_ending_on(rank)
        if ends:
            assert torch.equal(torch.stack(result.losses), torch.stack(ref_losses[ends[0]]))
            assert torch.equal(torch.cat([o[0] for o in result.outputs]),
                               torch.cat(ref_outs[ends[0]]))
        else:
            assert result.losses == [] and result.outputs == []
    # a stage held on two ranks (DualPipe) has half of its gradient on each copy
    for k, stage in enumerate(ref):
        copies = [mods[r][layout.rank_stages[r].index(k)] for r in range(ranks)
                  if k in layout.rank_stages[r]]
        for i, q in enumerate(stage.parameters()):
            total = sum(list(c.parameters())[i].grad for c in copies)
            torch.testing.assert_close(total, q.grad, rtol=1e-5, atol=1e-6)
    assert network.unmatched == 0


def test_in_process_inference() -> None:
    results, (_, ref_outs), (_, _, layout), network = _step("dualpipe", 2, 4, "mlp",
                                                            training=False)
    for rank, result in enumerate(results):
        (end,) = layout.streams_ending_on(rank)
        assert torch.equal(torch.cat([o[0] for o in result.outputs]), torch.cat(ref_outs[end]))
    assert network.unmatched == 0


def test_failure_reaches_every_rank() -> None:
    calls = []

    def exploding_forward(run, a) -> None:  # noqa: ANN001
        calls.append(run.plan.rank)
        if run.plan.rank == 1 and a.action.chunk == 1:
            raise RuntimeError("boom")
        DEFAULT_KERNELS.forward(run, a)

    network = LocalNetwork(3, timeout=5.0)
    with pytest.raises(PipelineError, match="rank 1 failed in F0.1 .*boom"):
        _step("1f1b", 3, 4, "mlp", training=True, network=network,
              kernels=DEFAULT_KERNELS.replace(forward=exploding_forward))
    assert 1 in calls
    # the failed step was drained: every message posted on one side was matched
    assert network.unmatched == 0 and network.error is not None


def test_handler_table_decides_what_runs() -> None:
    """A replaced pair handler is called for every overlapped pair, and only for them."""
    seen = []

    def pair(kernels, run, fwd, bwd) -> None:  # noqa: ANN001
        seen.append((run.plan.rank, f"{fwd.action}+{bwd.action}"))
        DEFAULT_KERNELS.pair(kernels, run, fwd, bwd)

    results, (ref_losses, _), _, _ = _step("dualpipev", 2, 6, "mlp", training=True,
                                           kernels=DEFAULT_KERNELS.replace(pair=pair))
    schedule = generate("dualpipev", 2, 6)
    expected = sorted((r, str(s)) for r in range(2) for s in schedule.steps[r] if "+" in str(s))
    assert sorted(seen) == expected and expected
    assert torch.equal(torch.stack(results[0].losses), torch.stack(ref_losses[0]))
