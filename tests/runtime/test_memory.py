"""Peak activation memory per rank equals the simulator's peak (PP+1 micro-batch stages for
DualPipe and DualPipeV), measured as activation tensors held by autograd; sent activations
are not kept for the backward."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .memory_workers import WIDTH, measure_peak, record_without_memory, recorded_memory

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


@pytest.mark.parametrize(
    "schedule,world,chunks", [("dualpipev", 2, 4), ("zbv", 2, 8), ("auto", 2, 8)]
)
def test_recorded_memory_stays_within_the_simulated_peak(
    schedule: str, world: int, chunks: int
) -> None:
    """A step recorded with ``record="memory"`` (3 x (Linear, GELU) stages) samples what
    each rank holds after every action (saved activations and deferred weight-gradient
    state; message buffers left out): every rank's peak is at most the simulator's
    ``peak_memory`` with the state per deferred W measured on the stage (1 activation:
    each Linear's input and output gradient) plus half an activation; nothing but the
    losses is left at the end; the step metrics report the same peaks."""
    results = run_distributed(recorded_memory, world, schedule, chunks, timeout=120)
    for rank, res in enumerate(results):
        assert res["samples"] == res["steps"] + 1, (rank, res)
        assert res["w_memory"] == 1.0
        assert 0 < res["peak"] <= res["sim"] + 0.5, (rank, res)
        assert res["after"] < 0.01, (rank, res)  # the losses (scalars) only
        assert res["metrics_peak"] == [r["peak"] for r in results]


def test_record_true_on_cpu_takes_no_memory_samples_and_bad_values_are_refused() -> None:
    for steps, samples, error in run_distributed(record_without_memory, 2, timeout=60):
        assert steps > 0 and samples == 0
        assert "record must be False, True or 'memory'" in error
