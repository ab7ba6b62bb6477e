"""Peak activation memory per rank equals the simulator's peak (PP+1 micro-batch stages for
DualPipe and DualPipeV), measured as activation tensors held by autograd; sent activations
are not kept for the backward."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .memory_workers import WIDTH, measure_peak

ACTIVATION_BYTES = 2 * WIDTH * 4  # 2 samples of WIDTH fp32 values per micro-batch


@pytest.mark.parametrize(
    "schedule,world,chunks,pp_plus_one",
    [("dualpipev", 2, 8, 5), ("dualpipev", 3, 10, 7), ("dualpipe", 4, 12, 5), ("1f1b", 3, 6, None)],
)
def test_peak_activation_memory_matches_simulator(
    schedule: str, world: int, chunks: int, pp_plus_one: int | None
) -> None:
    results = run_distributed(measure_peak, world, schedule, chunks, timeout=120)
    for rank, (measured, simulated, left, held_outputs, in_flight) in enumerate(results):
        assert measured == simulated, (rank, measured, simulated)
        assert left == 0, (rank, left)
        assert held_outputs == 0, (rank, held_outputs)  # sent activations are released
        # a send in flight holds the output of a micro-batch whose forward ran here and
        # whose backward has not: never more than the live micro-batches' activations
        assert in_flight <= simulated * ACTIVATION_BYTES, (rank, in_flight)
        if pp_plus_one is not None:
            assert simulated == pp_plus_one
