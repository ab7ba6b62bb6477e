"""The validator: generated schedules are sound, corrupted ones are caught and named."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    SCHEDULES,
    Action,
    Op,
    Overlap,
    Schedule,
    Step,
    generate,
    layout_for,
    problems,
    spec,
    step_actions,
    validate,
)
from dualpipe.simulation import Costs, simulate

MAX_RANKS = 16
MAX_CHUNKS = 64


@st.composite
def sized(draw: st.DrawFn, names: tuple[str, ...] = tuple(SCHEDULES), min_ranks: int = 1):
    """(name, ranks, chunks) within each generator's constraints (from the registry)."""
    name = draw(st.sampled_from(names))
    entry = spec(name)
    k = entry.rank_multiple
    least = max(min_ranks, entry.min_ranks)
    ranks = k * draw(st.integers(-(-least // k), MAX_RANKS // k))
    c = entry.chunk_multiple
    chunks = c * draw(st.integers(1, MAX_CHUNKS // c))
    try:
        entry.check(ranks, chunks)
    except ScheduleError:
        assume(False)
    return name, ranks, chunks


def custom(name: str, ranks: int, text: str, chunks: int | None = None) -> Schedule:
    return Schedule.from_text(text, layout_for(name, ranks), chunks)


def replace_rows(schedule: Schedule, rows: dict[int, list[Step]]) -> Schedule:
    steps = tuple(tuple(rows.get(r, schedule.steps[r])) for r in range(schedule.num_ranks))
    return Schedule("custom", schedule.layout, schedule.chunks_per_stream, steps)


# ------------------------------------------------------------------------ sound schedules


@settings(max_examples=60, deadline=None)
@given(sized())
def test_generated_schedules_are_sound(case: tuple[str, int, int]) -> None:
    schedule = generate(*case)
    assert problems(schedule) == []
    validate(schedule)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_largest_sizes_are_sound(name: str) -> None:
    chunks = MAX_CHUNKS if name != "1f1b" else 3  # 1F1B also with fewer chunks than ranks
    assert problems(generate(name, MAX_RANKS, chunks)) == []


def test_custom_sound_schedule() -> None:
    # 1F1B-like on 2 ranks with split backwards, W's deferred to the end
    schedule = custom(
        "1f1b", 2, "rank 0: F0.0 F0.1 I0.0 I0.1 W0.1 W0.0\nrank 1: F0.0 I0.0 F0.1 B0.1 W0.0"
    )
    assert problems(schedule) == []


# ---------------------------------------------------------------- hand-made corruptions


def test_phase_missing_from_layout() -> None:
    schedule = custom("gpipe", 1, "rank 0: F0.0 F1.0 B0.0")
    assert problems(schedule) == ["rank 0 step 1 (F1.0): rank 0 has no phase 1 in this layout"]


def test_micro_batch_out_of_range() -> None:
    schedule = custom("gpipe", 1, "rank 0: F0.0 F0.1+B0.0 B0.1", chunks=1)
    assert problems(schedule) == [
        "rank 0 step 1 (F0.1+B0.0), part F0.1: micro-batch 1 out of range (chunks_per_stream = 1)",
        "rank 0 step 2 (B0.1): micro-batch 1 out of range (chunks_per_stream = 1)",
    ]


def test_no_micro_batches() -> None:
    schedule = Schedule("custom", layout_for("gpipe", 1), 0, ((),))
    assert problems(schedule) == ["chunks_per_stream must be >= 1, got 0"]


def test_missing_and_duplicate_actions() -> None:
    schedule = custom("1f1b", 2, "rank 0: F0.0 F0.1 B0.0 B0.1 B0.1\nrank 1: F0.0 B0.0 F0.1 F0.1")
    assert problems(schedule) == [
        "rank 0 step 4 (B0.1): backward of 0.1 runs again (first at step 3)",
        "rank 1 step 3 (F0.1): F0.1 runs again (first at step 2)",
        "rank 1: no backward (B0.1 or I0.1) ever runs "
        "(stream 0 position 1 micro-batch 1 (rank 1 phase 0))",
        "rank 0 step 3 (B0.1): deadlock, B0.1 waits for the backward of stream 0 position 1 "
        "micro-batch 1 (rank 1 phase 0), which never runs",
    ]


def test_backward_before_forward() -> None:
    schedule = custom("gpipe", 1, "rank 0: B0.0 F0.0")
    assert problems(schedule) == [
        "rank 0 step 0 (B0.0): backward of 0.0 runs before its forward (step 1)"
    ]


def test_weight_errors() -> None:
    schedule = custom(
        "gpipe",
        1,
        "rank 0: W0.0 F0.0 F0.1 F0.2 B0.0 W0.0 W0.2 I0.1 I0.2 W0.1 W0.1",
    )
    assert problems(schedule) == [
        "rank 0 step 0 (W0.0): W0.0 without an earlier I0.0",
        "rank 0 step 5 (W0.0): W for B0.0, a full backward that defers nothing",
        "rank 0 step 6 (W0.2): W0.2 runs before its I0.2 (step 8)",
        "rank 0 step 10 (W0.1): second W for I0.1 (already run at step 9)",
        "rank 0 step 8 (I0.2): weight gradient of I0.2 is never run (no later W)",
    ]


def test_weight_inside_a_pair_counts() -> None:
    # an I inside a pair defers its weight gradient like a single I
    schedule = custom("dualpipev", 1, "rank 0: F0.0 F1.0 F0.1+I1.0 F1.1+B0.0 B1.1 I0.1 W0.1")
    assert problems(schedule) == [
        "rank 0 step 2 (F0.1+I1.0): weight gradient of I1.0 is never run (no later W)"
    ]


def test_cycle_between_two_ranks() -> None:
    # rank 0 wants B0.0 back before sending F0.1; rank 1 wants F0.1 before running B0.0
    schedule = custom("1f1b", 2, "rank 0: F0.0 B0.0 F0.1 B0.1\nrank 1: F0.0 F0.1 B0.0 B0.1")
    assert problems(schedule) == [
        "rank 0 step 1 (B0.0): deadlock, B0.0 waits for the backward of stream 0 position 1 "
        "micro-batch 0 (rank 1 phase 0), run by rank 1 at step 2 (B0.0), which is itself "
        "blocked at step 1 (F0.1)",
        "rank 1 step 1 (F0.1): deadlock, F0.1 waits for the forward of stream 0 position 0 "
        "micro-batch 1 (rank 0 phase 0), run by rank 0 at step 2 (F0.1), which is itself "
        "blocked at step 1 (B0.0)",
        "deadlock cycle: rank 0 step 1 -> rank 1 step 1 -> rank 0 step 1",
    ]
    with pytest.raises(ScheduleError, match="cannot make progress"):
        simulate(schedule, Costs(f=0, b=0, w=0))


def test_same_rank_order_at_the_turn() -> None:
    # DualPipeV's turn: S_{N-1} and S_N are both on rank N-1, so F1 needs F0 first
    schedule = custom("dualpipev", 1, "rank 0: F1.0 F0.0 B1.0 B0.0")
    assert problems(schedule) == [
        "rank 0 step 0 (F1.0): deadlock, F1.0 waits for the forward of stream 0 position 0 "
        "micro-batch 0 (rank 0 phase 0), run later on this rank at step 1 (F0.0)"
    ]


def test_pair_of_one_micro_batch_at_one_position() -> None:
    schedule = custom("dualpipev", 1, "rank 0: F0.0 F1.0+B1.0 B0.0")
    assert problems(schedule) == [
        "rank 0 step 1 (F1.0+B1.0): a pair of the forward and backward of the same "
        "micro-batch at the same position cannot overlap"
    ]


def test_pairs_wait_for_both_inputs() -> None:
    # F0.1 of rank 1 is fine but the pair also needs B0.0 from rank 2, which needs
    # rank 1's F0.1 first: the pair blocks (as it would on a real runtime)
    schedule = custom(
        "1f1b",
        3,
        "rank 0: F0.0 F0.1 B0.0 B0.1\nrank 1: F0.0 F0.1+B0.0 B0.1\nrank 2: F0.0 F0.1 B0.0 B0.1",
    )
    found = problems(schedule)
    assert found[0] == (
        "rank 0 step 2 (B0.0): deadlock, B0.0 waits for the backward of stream 0 position 1 "
        "micro-batch 0 (rank 1 phase 0), run by rank 1 at step 1 (F0.1+B0.0), which is itself "
        "blocked at step 1 (F0.1+B0.0)"
    )
    assert found[1].startswith("rank 1 step 1 (F0.1+B0.0): deadlock, B0.0 waits for the backward")
    assert found[2] == (
        "rank 2 step 1 (F0.1): deadlock, F0.1 waits for the forward of stream 0 position 1 "
        "micro-batch 1 (rank 1 phase 0), run by rank 1 at step 1 (F0.1+B0.0), which is itself "
        "blocked at step 1 (F0.1+B0.0)"
    )
    assert found[3] == "deadlock cycle: rank 1 step 1 -> rank 2 step 1 -> rank 1 step 1"
    assert len(found) == 4


def test_validate_message() -> None:
    validate(generate("dualpipe", 4, 8))
    empty = Schedule("broken", layout_for("gpipe", 2), 5, ((), ()))
    assert len(problems(empty)) == 20  # a forward and a backward per rank and micro-batch
    with pytest.raises(ScheduleError) as info:
        validate(empty)
    text = str(info.value)
    assert text.startswith("schedule 'broken' is unsound (20 problems):")
    assert "rank 0: F0.0 never runs" in text
    assert text.endswith("... and 12 more")
    with pytest.raises(ScheduleError, match=r"\(1 problem\):\n  rank 0 step 0 \(B0.0\)"):
        validate(custom("gpipe", 1, "rank 0: B0.0 F0.0"))


# ---------------------------------------------------------- corruptions of real schedules


def expected_missing(rank: int, action: Action) -> str:
    p, m = action.phase, action.chunk
    if action.op is Op.FORWARD:
        return f"rank {rank}: F{p}.{m} never runs"
    if action.op.is_backward:
        return f"rank {rank}: no backward (B{p}.{m} or I{p}.{m}) ever runs"
    return f"weight gradient of I{p}.{m} is never run (no later W)"


@settings(max_examples=60, deadline=None)
@given(sized(), st.data())
def test_dropping_a_step_is_named(case: tuple[str, int, int], data: st.DataObject) -> None:
    schedule = generate(*case)
    rank = data.draw(st.integers(0, schedule.num_ranks - 1), label="rank")
    row = list(schedule.steps[rank])
    index = data.draw(st.integers(0, len(row) - 1), label="index")
    dropped = row.pop(index)
    found = problems(replace_rows(schedule, {rank: row}))
    for action in step_actions(dropped):
        want = expected_missing(rank, action)
        assert any(want in line for line in found), (want, found)
    with pytest.raises(ScheduleError):
        validate(replace_rows(schedule, {rank: row}))


def weighted(case: tuple[str, int, int]) -> bool:
    return case[0] in ("dualpipe", "dualpipev", "zb1p")


@settings(max_examples=60, deadline=None)
@given(sized(("dualpipe", "dualpipev", "zb1p")), st.data())
def test_duplicate_w_is_named(case: tuple[str, int, int], data: st.DataObject) -> None:
    schedule = generate(*case)
    rank = data.draw(st.integers(0, schedule.num_ranks - 1), label="rank")
    row = list(schedule.steps[rank])
    ws = [i for i, s in enumerate(row) if isinstance(s, Action) and s.op is Op.WEIGHT]
    assume(ws)
    first = data.draw(st.sampled_from(ws), label="w")
    at = data.draw(st.integers(first + 1, len(row)), label="copy at")
    w = row[first]
    row.insert(at, w)
    assert isinstance(w, Action)
    p, m = w.phase, w.chunk
    assert problems(replace_rows(schedule, {rank: row})) == [
        f"rank {rank} step {at} (W{p}.{m}): second W for I{p}.{m} (already run at step {first})"
    ]


@settings(max_examples=60, deadline=None)
@given(sized(("dualpipe", "dualpipev", "zb1p")), st.data())
def test_w_before_its_i_is_named(case: tuple[str, int, int], data: st.DataObject) -> None:
    schedule = generate(*case)
    rank = data.draw(st.integers(0, schedule.num_ranks - 1), label="rank")
    row = list(schedule.steps[rank])
    inputs = [(i, a) for i, s in enumerate(row) for a in step_actions(s) if a.op is Op.INPUT]
    assume(inputs)
    i, action = data.draw(st.sampled_from(inputs), label="I")
    w = Action(Op.WEIGHT, action.phase, action.chunk)
    j = row.index(w)
    assert j > i
    row.pop(j)
    row.insert(i, w)  # the I (single or in a pair) moves to step i + 1
    p, m = action.phase, action.chunk
    token = str(row[i + 1])
    assert problems(replace_rows(schedule, {rank: row})) == [
        f"rank {rank} step {i} (W{p}.{m}): W{p}.{m} runs before its I{p}.{m} (step {i + 1})",
        f"rank {rank} step {i + 1} ({token}): weight gradient of I{p}.{m} is never run "
        "(no later W)",
    ]


def consumer(schedule: Schedule, rank: int, action: Action) -> tuple[int, Action] | None:
    """Rank and action that receive what ``action`` sends, if it sends anything."""
    layout = schedule.layout
    if action.op is Op.FORWARD:
        peer = layout.next(rank, action.phase)
        op = Op.FORWARD
    elif action.op.is_backward:
        peer = layout.prev(rank, action.phase)
        op = Op.BACKWARD
    else:
        return None
    if peer is None or peer[0] == rank:
        return None
    return peer[0], Action(op, peer[1], action.chunk)


def find_step(schedule: Schedule, rank: int, want: Action) -> int:
    for i, step in enumerate(schedule.steps[rank]):
        for a in step_actions(step):
            same_kind = a.op is want.op or (a.op.is_backward and want.op.is_backward)
            if same_kind and (a.phase, a.chunk) == (want.phase, want.chunk):
                return i
    raise AssertionError(f"{want} not on rank {rank}")


def producers(schedule: Schedule, rank: int, step: Step) -> list[tuple[int, int]]:
    """(rank, step index) of every cross-rank input of ``step``."""
    layout = schedule.layout
    found = []
    for a in step_actions(step):
        if a.op is Op.FORWARD:
            peer = layout.prev(rank, a.phase)
            want = Action(Op.FORWARD, peer[1], a.chunk) if peer else None
        elif a.op.is_backward:
            peer = layout.next(rank, a.phase)
            want = Action(Op.BACKWARD, peer[1], a.chunk) if peer else None
        else:
            continue
        if peer is not None and want is not None and peer[0] != rank:
            found.append((peer[0], find_step(schedule, peer[0], want)))
    return found


@settings(max_examples=50, deadline=None)
@given(sized(min_ranks=2), st.data())
def test_swapping_dependent_steps_creates_a_named_cycle(
    case: tuple[str, int, int], data: st.DataObject
) -> None:
    """Swap a sending step X (rank a) with a later step Z of rank a that needs a
    result rank b makes at or after the step Y that receives X: Z -> ... -> Y -> X,
    and X now comes after Z on rank a, so there is a cycle."""
    schedule = generate(*case)
    edges = [
        (a, i, *dst)
        for a in range(schedule.num_ranks)
        for i, step in enumerate(schedule.steps[a])
        for act in step_actions(step)
        if (dst := consumer(schedule, a, act)) is not None
    ]
    start = data.draw(st.integers(0, len(edges) - 1), label="edge")
    for a, i, b, y in edges[start:] + edges[:start]:
        j = find_step(schedule, b, y)
        row = schedule.steps[a]
        k = next(
            (
                k
                for k in range(i + 1, len(row))
                if any(pr == b and ps >= j for pr, ps in producers(schedule, a, row[k]))
            ),
            None,
        )
        if k is not None:
            break
    else:
        raise AssertionError("no swappable pair found")
    swapped = list(row)
    swapped[i], swapped[k] = swapped[k], swapped[i]
    broken = replace_rows(schedule, {a: swapped})
    found = problems(broken)
    assert any(": deadlock, " in line for line in found), found
    blocked = [line for line in found if ": deadlock, " in line]
    assert all(line.startswith("rank ") and " step " in line for line in blocked)
    with pytest.raises(ScheduleError, match="cannot make progress"):
        simulate(broken, Costs(f=0, b=0, w=0))


@settings(max_examples=40, deadline=None)
@given(sized())
def test_validator_agrees_with_the_simulator(case: tuple[str, int, int]) -> None:
    """Reversing one rank's list breaks it. A reported deadlock makes the simulator
    stall; a stalled simulator means a reported deadlock, or a backward placed before
    its own forward (the simulator's loss step waits for that forward; the validator
    reports it under check (b))."""
    schedule = generate(*case)
    for rank in range(schedule.num_ranks):
        broken = replace_rows(schedule, {rank: list(reversed(schedule.steps[rank]))})
        found = problems(broken)
        deadlock = any(": deadlock, " in line for line in found)
        misordered = any("runs before its forward" in line for line in found)
        assert found
        try:
            simulate(broken, Costs(f=0, b=0, w=0))
            stuck = False
        except ScheduleError:
            stuck = True
        assert stuck or not deadlock
        assert deadlock or misordered or not stuck
        if rank == 1:
            break


def test_pairs_keep_their_order() -> None:
    # a pair is issued forward first; swapping its halves is not a valid token
    pair = generate("dualpipe", 2, 4).steps[0][4]
    assert isinstance(pair, Overlap) and str(pair) == "F1.1+B0.0"
    with pytest.raises(ValueError):
        Overlap(pair.second, pair.first)


NEW = ("zbv", "v-half", "v-min", "interleaved-1f1b")


@pytest.mark.parametrize("name", NEW + ("dualpipe", "dualpipev"))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_new_generators_and_few_micro_batches_are_sound(name: str, data: st.DataObject) -> None:
    """Every new generator, and DualPipe/DualPipeV with any number of micro-batches
    (fewer than 2N too), through the validator on the grid ranks <= 16, chunks <= 64."""
    _, ranks, chunks = data.draw(sized((name,)), label="size")
    assert problems(generate(name, ranks, chunks)) == []
