"""Benchmark: where a pipeline step's time goes, per OS thread, ours vs torch's runtime.

Run ``python benchmarks/bench_profile.py`` (``--help`` for the options). For every rank
count it runs DualPipeV on the same stages (:mod:`bench_stages`; zero-cost by default:
F = B = W = 0 ms, 64-byte activations, so what is left is the runtimes' own cost) with

* ``torch``: ``torch.distributed.pipelining.ScheduleDualPipeV`` (:mod:`bench_workers`),
* ``ours dynamic``: :class:`dualpipe.runtime.pipeline.Pipeline`, ``static_shapes=False``
  (every message preceded by a shape header),
* ``ours static``: the same with ``static_shapes=True`` (no headers after the first step),

side by side in one run, each configuration on fresh processes in a fresh gloo process
group on 127.0.0.1 (:mod:`bench_launch`: bounded, a failure is an error row). Every rank
runs ``--warmup`` untimed steps, a barrier, then ``--steps`` steps back to back, and
reads, before and after those timed steps only, for each of its OS threads
(``/proc/self/task/<tid>``):

* the CPU time it ran (``schedstat``, first field, ns),
* its voluntary context switches (it blocked: a wait, a lock, a socket) and its
  involuntary ones (it was preempted: another thread wanted the core), from ``status``.

Threads are named by Python (``threading.enumerate()``, matched on ``native_id``) or
else by the kernel (``comm``) and grouped: ``MainThread``; ``gloo_tcp_loop`` (gloo's
socket event loop); ``pt_gloo_runloop`` (the process group's async work threads);
our ``dualpipe-failure-watch`` (one per pipeline); ``dualpipe-send-to-*`` and
``dualpipe-recv-from-*`` (one per peer and direction: for messages of 256 KiB or
more; in older trees, for every message); ``other``. Per runtime and rank count it
prints the step time (the slowest rank's timed window / steps), the time per compute
action of the busiest rank, and per thread group the CPU ms, voluntary and involuntary
switches per step (mean over ranks, and the largest rank's CPU). A thread that ended
inside the window is not counted; one that started inside it counts from its start.

``--overlap`` measures instead what the overlap engine's waits cost: DualPipeV over
parted MoE-style stages (:class:`bench_overlap.SleepMoEStage`, PP = 2 x EP = 2, 4
processes), on the same processes in rounds of ``--steps`` steps per mode (so a change
of the machine's load touches every mode alike): the engine's waiter as it was (polling
each communication with naps of 20-200 us, every poll asking the store for failures:
``check_error(fresh=True)``), with the cheap check (the failure watch's finding) but
still polling, and as it is now (the cheap check, blocking on the communication's
futures between checks). The modes are selected by
``dualpipe.overlap.plugin._FRESH_CHECKS`` and ``Waiter._block``, flags for this
benchmark only (:data:`OVERLAP_MODES`). Per rank and step it prints the main thread's
CPU, the CPU and wall time spent inside the waiter's waits (filler weight work left
out), every thread's CPU, the main thread's voluntary and involuntary switches, the
store requests of the main thread and of the other threads (the store wrapped in a
counter) and the failure checks made (calls of the transport's ``check_error``), then
each mode against the first, per round.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import bench_launch
import bench_stages
import bench_workers
import torch.distributed as dist
from bench_pipelines import _load, _short_error, _table, run_header

GROUPS = ("MainThread", "gloo_tcp_loop", "pt_gloo_runloop", "dualpipe-failure-watch",
          "dualpipe-send-to-*", "dualpipe-recv-from-*", "other")
"""Thread groups, in table order."""

RUNTIMES: dict[str, dict[str, Any]] = {
    "torch": {"impl": "torch", "schedule": "DualPipeV"},
    "ours dynamic": {"impl": "ours", "schedule": "dualpipev", "static_shapes": False},
    "ours static": {"impl": "ours", "schedule": "dualpipev", "static_shapes": True},
}
"""Row label -> the runtime's part of a :func:`bench_workers.sleep_runner` config."""


# ----------------------------------------------------------------------------- threads


@dataclass(frozen=True)
class ThreadSample:
    """One OS thread's counters at one moment."""

    name: str
    cpu_ns: int
    voluntary: int
    involuntary: int


def _status_field(status: str, key: str) -> int:
    match = re.search(rf"^{key}:\s*(\d+)", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/task/*/status has no {key}")
    return int(match.group(1))


def sample_threads() -> dict[int, ThreadSample]:
    """Counters of every thread of this process, by thread id (threads that end while
    being read are skipped)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[int, ThreadSample] = {}
    for entry in os.listdir("/proc/self/task"):
        tid, base = int(entry), f"/proc/self/task/{entry}"
        try:
            with open(f"{base}/schedstat") as fh:
                cpu_ns = int(fh.read().split()[0])
            with open(f"{base}/status") as fh:
                status = fh.read()
            with open(f"{base}/comm") as fh:
                comm = fh.read().strip()
        except FileNotFoundError:
            continue
        out[tid] = ThreadSample(names.get(tid, comm), cpu_ns,
                                _status_field(status, "voluntary_ctxt_switches"),
                                _status_field(status, "nonvoluntary_ctxt_switches"))
    return out


def thread_group(name: str) -> str:
    """The group of :data:`GROUPS` a thread name belongs to."""
    if name in GROUPS:
        return name
    for prefix in ("dualpipe-send-to-", "dualpipe-recv-from-"):
        if name.startswith(prefix):
            return prefix + "*"
    return "other"


def group_deltas(before: dict[int, ThreadSample], after: dict[int, ThreadSample]
                 ) -> dict[str, dict[str, float]]:
    """Per thread group: ``threads``, ``cpu_ms``, ``voluntary``, ``involuntary`` spent
    between the two samples (threads alive at ``after``)."""
    out = {g: {"threads": 0.0, "cpu_ms": 0.0, "voluntary": 0.0, "involuntary": 0.0}
           for g in GROUPS}
    for tid, end in after.items():
        start = before.get(tid, ThreadSample(end.name, 0, 0, 0))
        row = out[thread_group(end.name)]
        row["threads"] += 1
        row["cpu_ms"] += (end.cpu_ns - start.cpu_ns) / 1e6
        row["voluntary"] += end.voluntary - start.voluntary
        row["involuntary"] += end.involuntary - start.involuntary
    return out


# ----------------------------------------------------------------------------- ranks


def profile_worker(rank: int, ranks: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: build the pipeline (:func:`bench_workers.sleep_runner`), run
    ``cfg["warmup"]`` steps, then sample every thread around ``cfg["steps"]`` steps run
    back to back. Returns the window's seconds, this rank's compute actions and the
    per-group deltas of :func:`group_deltas`."""
    runner = bench_workers.sleep_runner(rank, ranks, cfg)
    try:
        for _ in range(cfg["warmup"]):
            for m in runner.modules:
                m.zero_grad(set_to_none=True)
            runner.step()
        dist.barrier()
        before = sample_threads()
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            for m in runner.modules:
                m.zero_grad(set_to_none=True)
            runner.step()
        seconds = time.perf_counter() - t0
        after = sample_threads()
        dist.barrier()
    finally:
        if runner.close is not None:
            runner.close()
    return {"seconds": seconds, "actions": runner.actions,
            "groups": group_deltas(before, after)}


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One runtime on one rank count."""

    label: str
    ranks: int
    steps: int
    step_ms: float | None = None
    actions: int | None = None
    groups: list[dict[str, dict[str, float]]] = field(default_factory=list)
    error: str | None = None

    @property
    def per_action_ms(self) -> float | None:
        """Step time / compute actions of the busiest rank."""
        return self.step_ms / self.actions if self.step_ms and self.actions else None

    def per_step(self, group: str, key: str) -> list[float]:
        """``key`` of ``group`` per timed step, one value per rank."""
        return [g[group][key] / self.steps for g in self.groups]

    def total_per_step(self, key: str) -> float:
        """``key`` summed over all thread groups, per step, mean over ranks."""
        return statistics.mean(sum(g[k][key] for k in GROUPS) / self.steps
                               for g in self.groups)


def run_config(label: str, ranks: int, args: argparse.Namespace) -> Result:
    """Run ``label``'s runtime on ``ranks`` fresh ranks; errors become the result's error."""
    result = Result(label, ranks, args.steps)
    cfg = dict(RUNTIMES[label], chunks=args.chunks, f=args.f, b=args.b, w=args.w,
               numel=args.numel, warmup=args.warmup, steps=args.steps, timeout=args.timeout)
    # generous: every action of a step serialised, plus 5 ms of runtime per action
    step_ms = 4 * args.chunks * (args.f + args.b + args.w) + 10 * args.chunks * ranks
    budget = 60.0 + 5.0 * ranks + 4.0 * (args.warmup + args.steps) * step_ms / 1000.0
    try:
        per_rank = bench_launch.launch(profile_worker, ranks, cfg, timeout=budget)
    except Exception as exc:  # noqa: BLE001 - reported as an error row
        result.error = _short_error(exc)
        return result
    result.step_ms = max(r["seconds"] for r in per_rank) * 1000.0 / args.steps
    result.actions = max(r["actions"] for r in per_rank)
    result.groups = [r["groups"] for r in per_rank]
    return result


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(results: list[Result], markdown: bool) -> str:
    """One row per runtime and rank count."""
    headers = ["ranks", "runtime", "ms/step", "actions/rank", "ms/action", "cpu ms/step",
               "vol cs/step", "invol cs/step", "ours/torch"]
    torch_ms = {r.ranks: r.step_ms for r in results if r.label == "torch" and r.step_ms}
    rows = []
    for r in results:
        if r.error:
            rows.append([str(r.ranks), r.label, "ERROR"] + ["-"] * (len(headers) - 3))
            continue
        ratio = torch_ms.get(r.ranks)
        rows.append([
            str(r.ranks), r.label, _f(r.step_ms, ".2f"), str(r.actions),
            _f(r.per_action_ms, ".3f"), f"{r.total_per_step('cpu_ms'):.2f}",
            f"{r.total_per_step('voluntary'):.0f}", f"{r.total_per_step('involuntary'):.0f}",
            "-" if ratio is None or r.step_ms is None or r.label == "torch"
            else f"{r.step_ms / ratio:.3f}",
        ])
    return _table(headers, rows, markdown)


def thread_table(result: Result, markdown: bool) -> str:
    """One row per thread group: per step, mean over ranks (and the largest rank's CPU)."""
    headers = ["thread group", "threads/rank", "cpu ms/step", "max rank", "cpu us/action",
               "vol cs/step", "invol cs/step"]
    rows = []
    for group in GROUPS:
        threads = [g[group]["threads"] for g in result.groups]
        if not any(threads):
            continue
        cpu = result.per_step(group, "cpu_ms")
        per_action = (statistics.mean(cpu) * 1000.0 / result.actions if result.actions
                      else None)
        rows.append([group, f"{statistics.mean(threads):g}", f"{statistics.mean(cpu):.2f}",
                     f"{max(cpu):.2f}", _f(per_action, ".1f"),
                     f"{statistics.mean(result.per_step(group, 'voluntary')):.1f}",
                     f"{statistics.mean(result.per_step(group, 'involuntary')):.1f}"])
    total = result.total_per_step("cpu_ms")
    rows.append(["all", "-", f"{total:.2f}", "-",
                 _f(total * 1000.0 / result.actions if result.actions else None, ".1f"),
                 f"{result.total_per_step('voluntary'):.1f}",
                 f"{result.total_per_step('involuntary'):.1f}"])
    return _table(headers, rows, markdown)


def render(results: list[Result], header: list[str], markdown: bool) -> str:
    """Header, the summary and one thread table per runtime and rank count."""
    def title(text: str) -> str:
        return f"### {text}" if markdown else f"== {text} =="

    parts = [*header, "", title("Summary"), "", summary_table(results, markdown), ""]
    for r in results:
        head = f"{r.label}, {r.ranks} ranks"
        if r.error:
            parts += [title(head), "", f"ERROR {r.error}", ""]
            continue
        parts += [title(f"{head}: {r.step_ms:.2f} ms/step, {r.per_action_ms:.3f} ms/action"),
                  "", thread_table(r, markdown), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- --overlap

OVERLAP_MODES: dict[str, tuple[bool, bool]] = {
    "before: store asked per poll": (True, False),
    "cheap check, polling": (False, False),
    "after: cheap check, blocking": (False, True),
}
"""Row label -> (``dualpipe.overlap.plugin._FRESH_CHECKS``: the waiter's check asks the
store at every poll, as before the failure watch made it cheap; ``Waiter._block``: the
waiter blocks on the communication's futures instead of polling it with naps). The first
mode is the waiter before issue 21, the last the default now."""


class CountingStore:
    """Wraps the process group's store: counts the requests made through it, those of
    the main thread and those of other threads (the failure watch) apart."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.main = 0
        self.other = 0
        self._main = threading.main_thread().ident

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._main:
                self.main += 1
            else:
                self.other += 1
            return attr(*args, **kwargs)

        return counted


def _time_waiter() -> dict[str, float]:
    """Make every :meth:`Waiter.wait <dualpipe.overlap.engine.Waiter.wait>` of this
    process add its thread CPU time (``time.thread_time``: polls, failure checks, store
    requests; the filler work it runs meanwhile, weight gradients, left out) and its
    wall time to the returned dict's ``cpu`` and ``wall`` (seconds)."""
    from dualpipe.overlap.engine import Waiter

    spent = {"cpu": 0.0, "wall": 0.0}
    original = Waiter.wait

    def wait(self: Waiter, pending: Any, what: str, filler: Any = None) -> Any:
        inner = [0.0]

        def timed_filler() -> bool:
            start = time.thread_time()
            try:
                return bool(filler())
            finally:
                inner[0] += time.thread_time() - start

        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return original(self, pending, what, None if filler is None else timed_filler)
        finally:
            spent["cpu"] += time.thread_time() - cpu - inner[0]
            spent["wall"] += time.perf_counter() - wall

    Waiter.wait = wait  # type: ignore[method-assign]
    return spent


def overlap_worker(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One of 4 processes (2 pipeline x 2 expert-parallel ranks): DualPipeV over
    :class:`bench_overlap.SleepMoEStage` stages (parted: the overlap engine runs them).
    After ``cfg["warmup"]`` steps, ``cfg["repeats"]`` rounds, each running
    ``cfg["steps"]`` steps in every mode of :data:`OVERLAP_MODES` in turn, on the same
    processes and pipeline (the modes' flags are read at every action and wait). For
    each round and mode: the store requests (through :class:`CountingStore`), the failure
    checks (calls of the transport's ``check_error``: the waiter's, the transport's own
    waits'), the waiter's CPU and wall time, and every thread's counters."""
    import bench_overlap
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe.overlap import plugin
    from dualpipe.overlap.engine import Waiter
    from dualpipe.runtime.pipeline import Pipeline
    from dualpipe.schedules.registry import layout_for

    del world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank = rank // 2
    stages = bench_overlap._stages(cfg, ep)
    mine: list[Any] = [stages[k] for k in layout_for("dualpipev", 2).rank_stages[pp_rank]]
    pipe = Pipeline(mine, "dualpipev", process_group=pp, timeout=cfg["timeout"])
    transport = pipe.transport
    store = CountingStore(transport.store)
    transport.store = store  # type: ignore[assignment]
    checks = [0]
    check_error = transport.check_error

    def counted_check(fresh: bool = False) -> None:
        checks[0] += 1
        check_error(fresh=fresh)

    transport.check_error = counted_check  # type: ignore[method-assign]
    waiting = _time_waiter()
    chunks = cfg["chunks"]
    x = bench_overlap._batch(cfg, chunks * cfg["rows"])
    y = bench_overlap._batch(cfg, chunks * cfg["rows"])

    def step() -> None:
        for m in mine:
            m.zero_grad(set_to_none=True)
        if pp_rank == 0:
            pipe.step(x, num_chunks=chunks, criterion=bench_stages.sleep_loss,
                      labels=(y,))
        else:
            pipe.step(num_chunks=chunks)

    out: list[dict[str, Any]] = []
    try:
        for _ in range(cfg["warmup"]):
            step()
        for _ in range(cfg["repeats"]):
            for label, (fresh, block) in OVERLAP_MODES.items():
                plugin._FRESH_CHECKS, Waiter._block = fresh, block
                dist.barrier()
                store.main = store.other = checks[0] = 0
                waiting["cpu"] = waiting["wall"] = 0.0
                before = sample_threads()
                t0 = time.perf_counter()
                for _ in range(cfg["steps"]):
                    step()
                seconds = time.perf_counter() - t0
                after = sample_threads()
                out.append({"label": label, "seconds": seconds,
                            "groups": group_deltas(before, after),
                            "store_main": store.main, "store_other": store.other,
                            "checks": checks[0], "waiter_cpu_ms": waiting["cpu"] * 1000.0,
                            "waiter_ms": waiting["wall"] * 1000.0})
        dist.barrier()
    finally:
        transport.store = store.store
        pipe.close()
    return out


@dataclass
class OverlapResult:
    """One mode in one round, on the 4 processes."""

    label: str
    round: int
    steps: int
    per_rank: list[dict[str, Any]] = field(default_factory=list)

    def row(self, r: dict[str, Any]) -> dict[str, float]:
        """Per step, for one rank's measurements."""
        main = r["groups"]["MainThread"]
        return {
            "ms": r["seconds"] * 1000.0 / self.steps,
            "main_cpu": main["cpu_ms"] / self.steps,
            "all_cpu": sum(g["cpu_ms"] for g in r["groups"].values()) / self.steps,
            "main_vol": main["voluntary"] / self.steps,
            "main_invol": main["involuntary"] / self.steps,
            "store_main": r["store_main"] / self.steps,
            "store_other": r["store_other"] / self.steps,
            "checks": r["checks"] / self.steps,
            "waiter_cpu": r["waiter_cpu_ms"] / self.steps,
            "waiter": r["waiter_ms"] / self.steps,
        }

    def mean(self, key: str) -> float:
        """``key`` of :meth:`row`, mean over ranks."""
        return statistics.mean(self.row(r)[key] for r in self.per_rank)


OVERLAP_COLUMNS = [("ms", "ms/step", ".1f"), ("main_cpu", "main cpu ms/step", ".2f"),
                   ("waiter_cpu", "waiter cpu ms/step", ".2f"),
                   ("waiter", "waiter wall ms/step", ".1f"),
                   ("all_cpu", "all threads cpu ms/step", ".2f"),
                   ("main_vol", "main vol cs/step", ".1f"),
                   ("main_invol", "main invol cs/step", ".1f"),
                   ("store_main", "store req/step main", ".1f"),
                   ("store_other", "store req/step other threads", ".1f"),
                   ("checks", "failure checks/step", ".0f")]
"""Key of :meth:`OverlapResult.row`, header, format."""


def run_overlap(args: argparse.Namespace) -> list[OverlapResult]:
    """Every round and mode on 4 fresh processes (one launch)."""
    cols = 256
    cfg = {"f": args.f, "b": args.b, "w": args.w, "topk": args.topk, "cols": cols,
           "rows": max(1, args.kib * 256 // cols), "chunks": args.chunks,
           "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
           "timeout": args.timeout}
    # generous: 4 processes on few cores, every part serialised, 40 ms per part of slack
    step_ms = args.chunks * 2 * (6 * (args.f + args.b + args.w) + 160.0)
    steps = args.warmup + args.steps * args.repeats * len(OVERLAP_MODES)
    per_rank = bench_launch.launch(overlap_worker, 4, cfg,
                                   timeout=90.0 + 4.0 * steps * step_ms / 1000.0)
    results = []
    for i, first in enumerate(per_rank[0]):
        results.append(OverlapResult(first["label"], i // len(OVERLAP_MODES) + 1, args.steps,
                                     [r[i] for r in per_rank]))
    return results


def overlap_table(results: list[OverlapResult], markdown: bool) -> str:
    """One row per round, mode and rank, and the mean over ranks."""
    headers = ["round", "mode", "rank", *(h for _, h, _ in OVERLAP_COLUMNS)]
    rows = []
    for res in results:
        for rank, r in enumerate(res.per_rank):
            row = res.row(r)
            rows.append([str(res.round), res.label, str(rank),
                         *(format(row[k], fmt) for k, _, fmt in OVERLAP_COLUMNS)])
        rows.append([str(res.round), res.label, "mean",
                     *(format(res.mean(k), fmt) for k, _, fmt in OVERLAP_COLUMNS)])
    return _table(headers, rows, markdown)


def overlap_ratios(results: list[OverlapResult]) -> list[str]:
    """Per round, each later mode against the first (before): the waiter's CPU, the main
    thread's CPU and store requests, the step time (means over ranks)."""
    lines = []
    n = len(OVERLAP_MODES)
    for i in range(0, len(results) - n + 1, n):
        before = results[i]
        for after in results[i + 1:i + n]:
            lines.append(
                f"round {before.round}, {after.label} / {before.label}: waiter CPU per step "
                f"{after.mean('waiter_cpu') / before.mean('waiter_cpu'):.2f} "
                f"({before.mean('waiter_cpu'):.2f} -> {after.mean('waiter_cpu'):.2f} ms), "
                f"main-thread CPU {after.mean('main_cpu') / before.mean('main_cpu'):.2f}, "
                f"main-thread store requests {before.mean('store_main'):.1f} -> "
                f"{after.mean('store_main'):.1f}, step time "
                f"{after.mean('ms') / before.mean('ms'):.2f}")
    return lines


def main_overlap(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--overlap``: the modes of the engine's waits, side by side on the same processes."""
    header = [
        *run_header("bench_profile.py", argv),
        f"DualPipeV over parted MoE-style stages (bench_overlap.SleepMoEStage: sleeping "
        f"compute F={args.f:g} B={args.b:g} W={args.w:g} ms per part, gloo all-to-alls of "
        f"{args.topk} x {args.kib} KiB), PP=2 x EP=2 on 4 processes, {args.chunks} "
        f"micro-batches; after {args.warmup} warm-up steps, {args.repeats} round(s) of "
        f"{args.steps} steps back to back in each of the {len(OVERLAP_MODES)} modes in "
        f"turn, on the same processes; per rank and step",
        f"at start: {_load()}",
    ]
    for line in header:
        print(line, flush=True)
    try:
        results = run_overlap(args)
    except Exception as exc:  # noqa: BLE001 - reported, exit status 1
        print(f"ERROR {_short_error(exc)}", flush=True)
        return 1
    header.append(f"at end: {_load()}")
    ratios = overlap_ratios(results)
    print("\n" + "\n".join([*header, "", overlap_table(results, False), "", *ratios]),
          flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write("\n".join([*(f"- {h}" for h in header), "",
                                overlap_table(results, True), "",
                                *(f"- {r}" for r in ratios)]) + "\n")
        print(f"markdown written to {args.markdown}", flush=True)
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Per-thread CPU and context switches of a DualPipeV step: "
                    "ours vs torch's ScheduleDualPipeV, side by side on local gloo ranks.",
    )
    p.add_argument("--ranks", default="2,4", help="rank counts (default 2,4)")
    p.add_argument("--chunks", type=int, default=20, help="micro-batches per step (default 20)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--static-shapes", choices=["both", "on", "off"], default="both",
                   help="ours: Pipeline(static_shapes=True) ('on'), False ('off') or "
                        "both rows (default)")
    p.add_argument("--only", choices=["ours", "torch"], help="run one runtime only")
    p.add_argument("--f", type=float, default=0.0, help="forward ms (default 0)")
    p.add_argument("--b", type=float, default=0.0, help="input-gradient ms (default 0)")
    p.add_argument("--w", type=float, default=0.0, help="weight-gradient ms (default 0)")
    p.add_argument("--numel", type=int, default=16,
                   help="fp32 elements per micro-batch activation (default 16: 64 bytes)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank waits for a message (default 60)")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    p.add_argument("--overlap", action="store_true",
                   help="instead: the overlap engine's waits as they were (polling, the "
                        "store asked at every poll), with the cheap failure check, and "
                        "blocking on the futures (now), side by side on PP=2 x EP=2 (4 "
                        "processes); uses --chunks, --steps, "
                        "--warmup, --f/--b/--w (per computation part), --kib, --topk, "
                        "--repeats")
    p.add_argument("--kib", type=int, default=64,
                   help="--overlap: activation per micro-batch, KiB of fp32 (default 64)")
    p.add_argument("--topk", type=int, default=4,
                   help="--overlap: all-to-all volume as a multiple of the activation "
                        "(default 4)")
    p.add_argument("--repeats", type=int, default=1,
                   help="--overlap: rounds of the modes in turn (default 1)")
    return p


def _labels(args: argparse.Namespace) -> list[str]:
    ours = {"both": ["ours dynamic", "ours static"], "on": ["ours static"],
            "off": ["ours dynamic"]}[args.static_shapes]
    labels = ([] if args.only == "ours" else ["torch"]) + ([] if args.only == "torch"
                                                           else ours)
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 if a configuration failed)."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1 (torch sets shapes up "
                         "in its first step)")
    if args.overlap:
        return main_overlap(args, argv)
    ranks_list = [int(r) for r in args.ranks.split(",") if r.strip()]
    header = [
        *run_header("bench_profile.py", argv),
        f"DualPipeV, {args.chunks} micro-batches, stages F={args.f:g} B={args.b:g} "
        f"W={args.w:g} ms, {4 * args.numel} B activations; {args.steps} timed steps back to "
        f"back after {args.warmup} warm-up; per step, mean over ranks",
        f"at start: {_load()}",
    ]
    for line in header:
        print(line, flush=True)
    results = []
    for ranks in ranks_list:
        for label in _labels(args):
            result = run_config(label, ranks, args)
            results.append(result)
            print(f"  ranks={ranks} {label}: " + (f"ERROR {result.error}" if result.error
                                                  else f"{result.step_ms:.2f} ms/step"),
                  flush=True)
    header.append(f"at end: {_load()}")
    print("\n" + render(results, header, markdown=False), flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(render(results, [f"- {h}" for h in header], markdown=True) + "\n")
        print(f"markdown written to {args.markdown}", flush=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
