"""One-GPU check of dualpipe: exactness, the device paths, memory and costs on CUDA.

Run it on a machine with one CUDA device (under 4 minutes on an H100)::

    python benchmarks/gpu_check.py                 # needs CUDA; exit 2 without it
    python benchmarks/gpu_check.py --quick         # smaller models, fewer repeats
    python benchmarks/gpu_check.py --cpu-dry-run   # the same code on CPU + gloo, tiny sizes

It prints what each section finds, then one summary table and, as its last line, a JSON
object with every number (``"ok"``: whether every check passed). Pictures (PNG) go to
``$OUT`` when that variable is set, else to ``--out``. Exit code: 0 every check passed,
1 some check failed, 2 no CUDA device (and no ``--cpu-dry-run``).

Sections (``docs/gpu.md`` says what each covers and what it does not):

1. exactness: DualPipeV and ZBV on one rank (both stages on the device) against the same
   GPT run plainly, fp32 and bf16 autocast; the split backward's I and W against a plain
   backward per layer kind (Linear, attention, MoE experts, LayerNorm, RMSNorm);
2. device paths: the pipeline's own messages on a one-rank NCCL group (none: every stage
   boundary is a local hand-off), its NCCL collectives (losses shared, timeline gathered),
   and a parted MoE stage whose all-to-alls run on NCCL with device-side waits, with a
   profiler (CUPTI) timeline of the kernels on each stream;
3. memory: the allocator's peak per step against the simulator's peak activations;
4. costs: F, B, I, W and F&B of a transformer block (hidden 2048, sequence 2048, bf16)
   timed with CUDA events and fed to the simulator: the seed's table for those costs and
   the auto-scheduler's best.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dualpipe import Costs, Pipeline, generate, simulate
from dualpipe.autograd import backward_full, backward_input
from dualpipe.autoschedule import search
from dualpipe.demo.model import (
    GPT,
    Block,
    CausalSelfAttention,
    GPTConfig,
    build_gpt,
    split_gpt,
)
from dualpipe.demo.moe import MoEConfig, MoEFFN, MoEStage, moe_stages, to_intervals
from dualpipe.demo.moe_train import union_length as union
from dualpipe.demo.task import lm_loss
from dualpipe.overlap import InFlight
from dualpipe.schedules.actions import Overlap
from dualpipe.testing import free_port
from dualpipe.viz import compare_table, format_compare_table

NO_CUDA_EXIT = 2
FP32_BOUND = 1e-5
"""Relative norm of a gradient's difference from the plain run's, fp32."""
BF16_BOUND = 1e-2
"""The same under bf16 autocast. bf16 keeps 8 significant bits (unit roundoff 2**-8 =
3.9e-3): each micro-batch's weight gradient is computed in bf16 and rounded to bf16
before it is added to the fp32 ``.grad``. The pipeline and the plain run compute those
contributions with the same kernels on the same shapes, so they should differ only by the
fp32 order of adding micro-batches (~1e-7, printed); the bound allows about 2.5 bf16
roundings of difference per contribution, in case the device picks different kernels for
the split (I, W) and the plain backward, and is still far below what a lost or doubled
micro-batch would give (>= 1/num_chunks)."""
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev", "zbv")
"""The rows of the costs table (the seed's four and ZBV), plus the auto-scheduler's."""


# ------------------------------------------------------------------------------ setup
@dataclass(frozen=True)
class Sizes:
    """Every size the check uses (one set for CUDA, a smaller one for ``--quick``, a tiny
    one for the CPU dry run)."""

    gpt: GPTConfig
    micro_batch: int
    chunks: int
    moe: GPTConfig
    moe_micro_batch: int
    moe_chunks: int
    memory: GPTConfig
    memory_micro_batch: int
    memory_chunks: int
    memory_steps: int
    block_dim: int
    block_seq: int
    block_heads: int
    block_batch: int
    repeats: int
    warmup: int
    table_stages: int = 8
    table_chunks: int = 20


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    """The sizes for this run: realistic widths on CUDA, tiny ones on CPU."""
    if device.type == "cpu":
        tiny = GPTConfig(vocab_size=16, seq_len=8, dim=16, n_head=2, n_layer=2)
        return Sizes(gpt=tiny, micro_batch=2, chunks=4, moe=tiny, moe_micro_batch=2,
                     moe_chunks=4, memory=tiny, memory_micro_batch=2, memory_chunks=4,
                     memory_steps=3, block_dim=32, block_seq=16, block_heads=2,
                     block_batch=1, repeats=3, warmup=1)
    gpt = GPTConfig(vocab_size=128, seq_len=128, dim=256, n_head=4, n_layer=4)
    moe = GPTConfig(vocab_size=128, seq_len=128, dim=256, n_head=4, n_layer=2)
    memory = GPTConfig(vocab_size=512, seq_len=512, dim=512, n_head=8, n_layer=4)
    return Sizes(gpt=gpt, micro_batch=4, chunks=8, moe=moe, moe_micro_batch=4,
                 moe_chunks=4 if quick else 8, memory=memory, memory_micro_batch=4,
                 memory_chunks=8, memory_steps=3 if quick else 4, block_dim=2048,
                 block_seq=2048, block_heads=16, block_batch=1 if quick else 2,
                 repeats=5 if quick else 20, warmup=2 if quick else 5)


@dataclass
class Check:
    """One row of the summary table. ``ok``: True passed, False failed, None information
    only (nothing to pass or fail, or not measurable on this device)."""

    section: str
    name: str
    ok: bool | None
    value: str
    bound: str = ""


@dataclass
class Report:
    """Everything the run found: the table's rows and the JSON's sections."""

    device: str
    dry_run: bool
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    pictures: list[str] = field(default_factory=list)

    def add(self, section: str, name: str, ok: bool | None, value: str, bound: str = "") -> None:
        self.checks.append(Check(section, name, ok, value, bound))
        status = {True: "PASS", False: "FAIL", None: "info"}[ok]
        print(f"  [{status}] {name}: {value}" + (f" (bound {bound})" if bound else ""),
              flush=True)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)


def init_group(device: torch.device) -> str:
    """A one-process group: NCCL on CUDA (after ``set_device``), gloo on CPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    return backend


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed milliseconds of a function: CUDA events on the current stream on CUDA
    (read after a synchronize), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        synchronize(self.device)
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return float(start.elapsed_time(end)), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


def relative_error(got: Tensor | None, want: Tensor | None) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero or both missing; inf
    when only one is missing)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def token_batch(vocab: int, size: int, seq: int, seed: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Random token ids and next-token targets, made on the CPU (same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (size, seq + 1), generator=gen)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device, or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def patch(obj: object, name: str, fn: Callable[..., Any]) -> None:
    """Replace the method ``name`` of the instance ``obj`` by ``fn`` (instrumentation)."""
    setattr(obj, name, fn)


def count_issued(pipe: Pipeline) -> list[int]:
    """Count the point-to-point operations the pipeline's transport posts (one element
    list, incremented per send or receive)."""
    count = [0]
    issue = pipe.transport.issue

    def counted(tensors: list[Tensor], peer: int, tag: int, send: bool) -> Any:
        count[0] += len(tensors)
        return issue(tensors, peer, tag, send)

    patch(pipe.transport, "issue", counted)
    return count


# ------------------------------------------------------------------- 1. exactness
def gpt_grad_pairs(model: GPT, stages: Sequence[nn.Module]) -> list[tuple[str, Tensor, Tensor]]:
    """(name, pipeline parameter, reference parameter) for every parameter of the model:
    the stages hold copies of the model's pieces in order."""
    ref = [(n, p) for piece in model.pieces() for n, p in piece.named_parameters()]
    mine = [p for s in stages for p in s.parameters()]
    if len(ref) != len(mine):
        raise RuntimeError(f"stages hold {len(mine)} parameters, the model {len(ref)}")
    return [(n, a, b) for (n, b), a in zip(ref, mine, strict=True)]


def check_gpt(report: Report, device: torch.device, sizes: Sizes, schedule: str,
              precision: str, extras: bool) -> None:
    """One training step of the GPT on one rank against the plain model, micro-batch by
    micro-batch: losses ``torch.equal``, gradients to rounding. With ``extras`` also the
    messages the pipeline posts, its NCCL/gloo collectives and a measured timeline."""
    cfg = sizes.gpt
    model = build_gpt(cfg, seed=1).to(device)
    stages = split_gpt(model, 2)  # deep copies, same device
    chunks = sizes.chunks
    ids, targets = token_batch(cfg.vocab_size, chunks * sizes.micro_batch, cfg.seq_len, 7,
                               device)
    name = f"{schedule} {precision}"
    with Pipeline(stages, schedule, timeout=120.0) as pipe:
        issued = count_issued(pipe)
        with precision_context(device, precision):
            losses, _ = pipe.step(ids, num_chunks=chunks, criterion=lm_loss,
                                  labels=(targets,), record=extras, broadcast_loss=extras)
        assert losses is not None  # with broadcast_loss: shared over the group, float32
        planned = len(pipe.executor.last_plan.ops) if pipe.executor.last_plan else -1
        timeline = pipe.gather_timeline() if extras else None
    ref_losses = []
    for x, y in zip(ids.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
        with precision_context(device, precision):
            loss = lm_loss(model(x), y)
        loss.backward()
        ref_losses.append(loss.detach())
    want = torch.stack(ref_losses)
    equal = losses.dtype == want.dtype and torch.equal(losses, want)
    errors = {n: relative_error(a.grad, b.grad) for n, a, b in gpt_grad_pairs(model, stages)}
    worst = max(errors, key=lambda n: errors[n])
    bound = FP32_BOUND if precision == "fp32" else BF16_BOUND
    via = f", shared by broadcast_loss over {dist.get_backend()}" if extras else ""
    report.add("exactness", f"{name}: losses torch.equal", equal,
               f"{chunks} micro-batches{via}, max |diff| "
               f"{(losses.double() - want.double()).abs().max().item():.1e}")
    report.add("exactness", f"{name}: gradients", errors[worst] <= bound,
               f"max rel {errors[worst]:.2e} ({worst})", f"{bound:g}")
    report.data.setdefault("exactness", {})[name] = {
        "losses_equal": equal, "max_rel_grad": errors[worst], "worst": worst, "bound": bound,
    }
    if extras:
        report.add("device paths", "pipeline messages on one rank", issued[0] == planned == 0,
                   f"{issued[0]} posted, {planned} planned: a one-rank pipeline hands every "
                   "stage boundary over locally; point-to-point needs 2 devices")
        report.data["messages"] = {"posted": issued[0], "planned": planned,
                                   "backend": dist.get_backend()}
        assert timeline is not None
        actions = [len(row) for row in timeline.steps]
        expected = [len(row) for row in generate(schedule, 1, chunks).steps]
        report.add("device paths", f"timeline gathered over the group ({dist.get_backend()})",
                   actions == expected, f"{actions[0]} steps recorded of {expected[0]} "
                   f"scheduled, step {timeline.makespan:.1f} ms")
        save_picture(report, "pipeline_timeline.png", timeline.save_png)


class _LocalExperts(nn.Module):
    """The MoE layer with every expert on this process (router, experts, combine)."""

    def __init__(self, ffn: MoEFFN) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, z: Tensor) -> Tensor:
        return self.ffn.local_forward(z)


def layer_kinds(device: torch.device, dim: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """One module per layer kind, with the shape of its input."""
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=16, seq_len=16, dim=dim, n_head=4, n_layer=1)
    moe = MoEConfig(cfg, num_experts=4, top_k=2, ep=1)
    kinds: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "Linear": (nn.Linear(dim, 3 * dim), (2, 16, dim)),
        "attention": (CausalSelfAttention(cfg), (2, 16, dim)),
        "MoE experts": (_LocalExperts(MoEFFN(moe, None)), (32, dim)),
        "LayerNorm": (nn.LayerNorm(dim), (2, 16, dim)),
        "transformer block": (Block(cfg), (2, 16, dim)),
    }
    if hasattr(nn, "RMSNorm"):
        kinds["RMSNorm"] = (nn.RMSNorm(dim), (2, 16, dim))
    for module, _ in kinds.values():
        module.to(device)
        for p in module.parameters():  # non-trivial norm weights
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    return kinds


def check_split(report: Report, device: torch.device, dim: int) -> None:
    """Per layer kind: ``backward_input`` (I) then ``WeightGradWork.run`` (W) against one
    plain backward: input and weight gradients to rounding, and I leaves every
    parameter's ``.grad`` untouched (its weight work is deferred to W)."""
    rows = {}
    for kind, (module, shape) in layer_kinds(device, dim).items():
        split = copy.deepcopy(module)
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(shape, generator=gen).to(device)
        x_plain = x.clone().requires_grad_()
        out = module(x_plain)
        grad = torch.randn(out.shape, generator=gen).to(device)
        out.backward(grad)
        x_split = x.clone().requires_grad_()
        (gx,), work = backward_input([split(x_split)], [grad], [x_split])
        touched = sum(p.grad is not None for p in split.parameters())
        work.run()
        errors = [relative_error(gx, x_plain.grad)]
        errors += [relative_error(a.grad, b.grad)
                   for a, b in zip(split.parameters(), module.parameters(), strict=True)]
        params = sum(1 for _ in module.parameters())
        worst = max(errors)
        bit_equal = gx is not None and x_plain.grad is not None and torch.equal(gx, x_plain.grad)
        ok = gx is not None and worst <= FP32_BOUND and touched == 0
        report.add("exactness", f"split I/W vs plain backward: {kind}", ok,
                   f"max rel {worst:.2e}, input grad bit-equal {bit_equal}, "
                   f"{params - touched}/{params} weight grads deferred to W", f"{FP32_BOUND:g}")
        rows[kind] = {"max_rel": worst, "input_grad_bit_equal": bit_equal,
                      "touched_by_I": touched, "params": params}
    report.data["split"] = rows


# ------------------------------------------------------------------ 2. device paths
def instrument_all_to_alls(stages: Sequence[MoEStage]) -> list[InFlight]:
    """Collect the InFlight of every all-to-all the stages launch (forward and backward)."""
    seen: list[InFlight] = []
    for op in {id(m.a2a): m.a2a for s in stages for m in s.modules()
               if isinstance(m, MoEFFN)}.values():
        run = op._run

        def recorded(x: Tensor, ins: Any, outs: Any, _run: Any = run) -> InFlight:
            pending: InFlight = _run(x, ins, outs)
            seen.append(pending)
            return pending

        patch(op, "_run", recorded)
    return seen


def moe_reference(stages: Sequence[MoEStage], ids: Tensor, targets: Tensor,
                  chunks: int) -> Tensor:
    """Every micro-batch through the stages with all experts local, each loss
    backpropagated: the stacked losses."""
    losses = []
    for x, y in zip(ids.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
        for stage in stages:
            x = stage.local_forward(x)
        loss = lm_loss(x, y)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def check_moe(report: Report, device: torch.device, sizes: Sizes) -> None:
    """A parted MoE stage on a one-rank expert-parallel group: DualPipeV with the overlap
    engine, its all-to-alls on the group's backend (NCCL on CUDA, with device-side waits),
    exact against one process; then a profiled step for the timeline of each stream."""
    cfg = MoEConfig(sizes.moe, num_experts=4, top_k=2, ep=1)
    stages = [s.to(device) for s in moe_stages(cfg, 2, None, seed=3)]
    pristine = copy.deepcopy(stages)
    chunks = sizes.moe_chunks
    ids, targets = token_batch(cfg.gpt.vocab_size, chunks * sizes.moe_micro_batch,
                               cfg.gpt.seq_len, 9, device)
    launched = instrument_all_to_alls(stages)
    with Pipeline(stages, "dualpipev", timeout=120.0) as pipe:
        losses, _ = pipe.step(ids, num_chunks=chunks, criterion=lm_loss, labels=(targets,),
                              record=True)
        record = pipe.last_record
        assert losses is not None and record is not None
        want = moe_reference(pristine, ids, targets, chunks)
        errors = {f"stage {k} {n}": relative_error(p.grad, q.grad)
                  for k, (stage, ref) in enumerate(zip(stages, pristine, strict=True))
                  for (n, p), q in zip(stage.named_parameters(), ref.parameters(), strict=True)}
        worst = max(errors, key=lambda n: errors[n])
        report.add("device paths", "MoE parted stage: losses torch.equal",
                   torch.equal(losses, want), f"{chunks} micro-batches, DualPipeV, EP group "
                   f"of 1 on {dist.get_backend()}")
        report.add("device paths", "MoE parted stage: gradients", errors[worst] <= FP32_BOUND,
                   f"max rel {errors[worst]:.2e} ({worst})", f"{FP32_BOUND:g}")
        device_side = sum(p.device_side for p in launched)
        if device.type == "cuda":
            report.add("device paths", "all-to-alls waited for on the stream (device_side)",
                       bool(launched) and device_side == len(launched),
                       f"{device_side} of {len(launched)} all-to-alls")
        else:
            report.add("device paths", "all-to-alls launched (device_side: CUDA only)",
                       bool(launched) and device_side == 0,
                       f"{len(launched)} all-to-alls, host waits on gloo")
        pairs = pair_events(record)
        report.add("device paths", "F&B pairs interleaved by the engine", bool(pairs),
                   f"{len(pairs)} pairs with an all-to-all in flight")
        data: dict[str, Any] = {"losses_equal": bool(torch.equal(losses, want)),
                                "max_rel_grad": errors[worst], "all_to_alls": len(launched),
                                "device_side": device_side, "pairs_interleaved": len(pairs)}
        if pairs:
            save_pair_picture(report, pairs)
        for s in stages:
            s.zero_grad(set_to_none=True)
        data["streams"] = profiled_step(report, pipe, device, ids, targets, chunks)
    report.data["moe"] = data


def pair_events(record: Any) -> list[tuple[float, list[Any]]]:
    """The recorded F&B pairs that had an all-to-all in flight: (start, part events)."""
    out = []
    for step, t0, t1 in record.steps:
        if isinstance(step, Overlap):
            events = [e for e in record.parts if t0 <= e.start and e.end <= t1]
            if any(e.kind == "comm" for e in events):
                out.append((t0, events))
    return out


def save_pair_picture(report: Report, pairs: list[tuple[float, list[Any]]]) -> None:
    """The longest interleaved pair, drawn by the library's pair renderer (host times)."""
    from dualpipe.viz.pair import render_pair_png

    t0, events = max(pairs, key=lambda p: max(e.end for e in p[1]) - p[0])
    intervals = to_intervals(events, t0)
    save_picture(report, "moe_pair.png", lambda path: render_pair_png(
        intervals, path, time_unit="ms",
        title="one F&B pair of the MoE stage as the engine recorded it (host clock)"))


def profiled_step(report: Report, pipe: Pipeline, device: torch.device, ids: Tensor,
                  targets: Tensor, chunks: int) -> dict[str, Any]:
    """One more step under the profiler: on CUDA every kernel with its stream (NCCL's
    all-to-all kernels on NCCL's stream, the parts' kernels on the default stream); on
    CPU the host's matrix products and all-to-all calls. Draws them and measures how much
    communication ran while computation did."""
    from torch.profiler import ProfilerActivity, profile

    # on CUDA only the device's activity (kernels, copies): a short trace to read back
    activities = [ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]
    try:
        with profile(activities=activities) as prof:
            pipe.step(ids, num_chunks=chunks, criterion=lm_loss, labels=(targets,))
            synchronize(device)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
    except Exception as exc:  # noqa: BLE001 - the profiler (CUPTI) may be unavailable
        report.add("device paths", "profiled MoE step", None,
                   f"profiler unavailable: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    rows = trace_rows(trace.get("traceEvents", []), device.type == "cuda")
    comm = [(a, b) for row, name, a, b, is_comm in rows if is_comm]
    compute = [(a, b) for row, name, a, b, is_comm in rows if not is_comm]
    comm_ms, under_ms = union(comm), overlap(comm, compute)
    where = "kernels" if device.type == "cuda" else "host calls"
    report.add("device paths", f"profiled MoE step: communication under computation ({where})",
               None, f"{len(comm)} comm / {len(compute)} compute {where}; comm {comm_ms:.3f} ms, "
               f"{under_ms:.3f} ms of it while computation ran")
    if rows:
        save_picture(report, "moe_streams.png", lambda p: render_rows(
            rows, p, f"MoE step, {where} per {'stream' if device.type == 'cuda' else 'thread'}"
            " (profiler)"))
    return {"comm_events": len(comm), "compute_events": len(compute), "comm_ms": comm_ms,
            "comm_under_compute_ms": under_ms,
            "streams": sorted({row for row, *_ in rows})}


_HOST_COMPUTE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")
_HOST_COMM = ("all_to_all", "alltoall")


def trace_rows(events: list[dict[str, Any]], device_trace: bool
               ) -> list[tuple[str, str, float, float, bool]]:
    """(row, name, start ms, end ms, is communication) from a Chrome trace: on CUDA the
    kernels and copies, one row per stream (everything on a stream that runs an NCCL
    kernel is communication); on CPU the host's matrix products and all-to-all calls, one
    row per thread."""
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    comm_streams = {e.get("args", {}).get("stream") for e in timed
                    if e.get("cat") == "kernel" and "nccl" in str(e.get("name", "")).lower()}
    rows = []
    for e in timed:
        name = str(e.get("name", ""))
        if device_trace:
            if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
                continue
            stream = e.get("args", {}).get("stream", "?")
            is_comm = stream in comm_streams
            row = f"stream {stream}{' (NCCL)' if is_comm else ''}"
        else:
            if e.get("cat") != "cpu_op":
                continue
            is_comm = any(k in name.lower() for k in _HOST_COMM)
            if not is_comm and not name.startswith(_HOST_COMPUTE):
                continue
            row = f"thread {e.get('tid', '?')}"
        start = float(e["ts"]) / 1e3
        rows.append((row, name, start, start + float(e["dur"]) / 1e3, is_comm))
    if rows:
        origin = min(r[2] for r in rows)
        rows = [(r, n, a - origin, b - origin, c) for r, n, a, b, c in rows]
    return rows


def overlap(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Length of (union of ``a``) intersected with (union of ``b``)."""
    return union(a) + union(b) - union([*a, *b])


def zoom_window(rows: Sequence[tuple[str, str, float, float, bool]]
                ) -> tuple[float, float] | None:
    """A window around the communication event that overlaps computation the most (None
    without communication)."""
    comm = [(a, b) for _, _, a, b, is_comm in rows if is_comm]
    compute = [(a, b) for _, _, a, b, is_comm in rows if not is_comm]
    if not comm:
        return None
    a, b = max(comm, key=lambda span: overlap([span], compute))
    pad = 2 * (b - a) + 0.02
    return max(0.0, a - pad), b + pad


def render_rows(rows: Sequence[tuple[str, str, float, float, bool]], path: str,
                title: str) -> None:
    """Draw profiler rows: one line per stream/thread, communication orange, computation
    blue; the whole step above, a zoom on one communication below."""
    from matplotlib.figure import Figure

    names = sorted({r[0] for r in rows})
    end = max(r[3] for r in rows) or 1.0
    window = zoom_window(rows)
    panels = [(0.0, end)] + ([window] if window is not None else [])
    fig = Figure(figsize=(14.0, len(panels) * (1.0 + 0.6 * len(names))))
    for k, (lo, hi) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        for y, name in enumerate(names):
            for is_comm, color in ((False, "#4A8FD0"), (True, "#F0963C")):
                spans = [(a, max(b - a, (hi - lo) * 1e-4)) for row, _, a, b, c in rows
                         if row == name and c == is_comm and b >= lo and a <= hi]
                if spans:
                    ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=color)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.set_xlim(lo, hi)
        ax.set_title(title if k == 0 else "zoom: the communication that overlaps computation "
                     "the most", fontsize=9)
    ax.set_xlabel("time (ms)  -  orange: communication, blue: computation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------- 3. memory
def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for the backward of one forward of ``module`` on ``x``
    (distinct storages, parameters left out): one micro-batch's activations."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def check_memory(report: Report, device: torch.device, sizes: Sizes) -> None:
    """DualPipeV on one rank: the allocator's peak per step (reset before each) against
    the simulator's peak activations times one measured micro-batch's activations."""
    cfg = sizes.memory
    stages = split_gpt(build_gpt(cfg, seed=2), 2)
    for s in stages:
        s.to(device)
    chunks = sizes.memory_chunks
    ids, targets = token_batch(cfg.vocab_size, chunks * sizes.memory_micro_batch, cfg.seq_len,
                               13, device)
    x0 = ids.tensor_split(chunks)[0]
    per_stage = [saved_bytes(stages[0], x0)]
    with torch.no_grad():
        h = stages[0](x0)
    per_stage.append(saved_bytes(stages[1], h.requires_grad_()))
    del h
    unit = sum(per_stage) / len(per_stage)  # one stage's activations for one micro-batch
    sim = simulate(generate("dualpipev", 1, chunks), Costs())
    peak_units = sim.peak_activations[0]
    predicted = peak_units * unit
    data: dict[str, Any] = {"per_stage_bytes": per_stage, "peak_activations": peak_units,
                            "predicted_bytes": predicted, "steps": []}
    cuda = device.type == "cuda"
    with Pipeline(stages, "dualpipev", timeout=120.0) as pipe:
        for _ in range(sizes.memory_steps):
            for s in stages:  # keep .grad allocated after the first step: not activations
                s.zero_grad(set_to_none=False)
            synchronize(device)
            base = torch.cuda.memory_allocated(device) if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            losses, _ = pipe.step(ids, num_chunks=chunks, criterion=lm_loss,
                                  labels=(targets,))
            del losses
            synchronize(device)
            if cuda:
                data["steps"].append({
                    "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
                    "base_bytes": base,
                    "after_bytes": torch.cuda.memory_allocated(device),
                })
    data["unit_bytes"], data["chunks"] = unit, chunks
    memory_rows(report, data, cuda)
    report.data["memory"] = data


def memory_rows(report: Report, data: dict[str, Any], cuda: bool) -> None:
    """The memory section's rows from its measurements (``data["steps"]``: per step the
    allocator's peak over the step's start, the start, and what stayed allocated)."""
    mib = 2**20
    predicted = data["predicted_bytes"]
    report.add("memory", "simulated peak activations (DualPipeV, 1 rank)", None,
               f"{data['peak_activations']} stage-micro-batches x "
               f"{data['unit_bytes'] / mib:.2f} MiB = {predicted / mib:.1f} MiB "
               f"({data['chunks']} micro-batches)")
    if not cuda:
        report.add("memory", "allocator peak per step", None,
                   "CUDA only (torch.cuda.max_memory_allocated)")
        return
    steps = data["steps"]
    peaks = ", ".join(f"{s['peak_bytes'] / mib:.1f}" for s in steps)
    last = steps[-1]["peak_bytes"]
    data["ratio_last_to_simulated"] = last / predicted if predicted else None
    report.add("memory", "allocator peak per step vs simulated", None,
               f"steps {peaks} MiB; last / simulated = "
               f"{data['ratio_last_to_simulated'] or float('nan'):.2f}")
    # after the first step (which allocates .grad), a step must leave what it found
    later = [s["after_bytes"] for s in steps[1:]]
    grew = max(later) - min(later) if later else 0
    report.add("memory", "no growth from step to step", grew <= mib,
               f"allocated after steps 2..{len(steps)} varies by {grew / mib:.2f} MiB", "1 MiB")


# -------------------------------------------------------------------------- 4. costs
def block_costs(device: torch.device, sizes: Sizes) -> dict[str, float]:
    """Median F, B, I, W and F&B (ms) of one transformer block in bf16, micro-batch of
    ``block_batch`` sequences: F a forward; B a full backward; I an input-only backward,
    W its deferred weight work; F&B one micro-batch's forward then another's backward
    (what the runtime runs for an ordinary stage's pair)."""
    cfg = GPTConfig(vocab_size=16, seq_len=sizes.block_seq, dim=sizes.block_dim,
                    n_head=sizes.block_heads, n_layer=1)
    torch.manual_seed(17)
    block = Block(cfg).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(sizes.block_batch, sizes.block_seq, sizes.block_dim, device=device,
                    dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    timer = Timer(device)

    def forward() -> tuple[Tensor, Tensor]:
        xin = x.detach().requires_grad_()
        return xin, block(xin)

    def full(xin: Tensor, out: Tensor) -> Callable[[], Any]:
        return lambda: backward_full([out], [grad], [xin])

    def input_only(xin: Tensor, out: Tensor) -> Callable[[], Any]:
        return lambda: backward_input([out], [grad], [xin])

    def pair(x0: Tensor, out0: Tensor) -> Callable[[], Any]:
        def run() -> None:
            forward()
            backward_full([out0], [grad], [x0])

        return run

    times: dict[str, list[float]] = {k: [] for k in ("f", "b", "i", "w", "fb")}
    for rep in range(sizes.warmup + sizes.repeats):
        keep = rep >= sizes.warmup
        f_ms, (xin, out) = timer(forward)
        b_ms, _ = timer(full(xin, out))
        i_ms, (_, work) = timer(input_only(*forward()))
        w_ms, _ = timer(work.run)
        fb_ms, _ = timer(pair(*forward()))
        if keep:
            for k, v in zip(times, (f_ms, b_ms, i_ms, w_ms, fb_ms), strict=True):
                times[k].append(v)
        block.zero_grad(set_to_none=False)
    return {k: statistics.median(v) for k, v in times.items()}


def check_costs(report: Report, device: torch.device, sizes: Sizes) -> None:
    """Measured block costs through the simulator: the seed's table and the
    auto-scheduler's best for PP stages."""
    measured = block_costs(device, sizes)
    w = min(measured["w"], measured["b"])
    costs = Costs(f=measured["f"], b=measured["b"], w=w, fb=measured["fb"])
    shape = (f"hidden {sizes.block_dim}, sequence {sizes.block_seq}, batch {sizes.block_batch},"
             f" bf16, median of {sizes.repeats}")
    report.add("costs", "transformer block (ms)", None,
               f"F {measured['f']:.3f}, B {measured['b']:.3f}, I {measured['i']:.3f}, "
               f"W {measured['w']:.3f}, F&B {measured['fb']:.3f}; I + W - B = "
               f"{measured['i'] + measured['w'] - measured['b']:+.3f} ({shape})")
    pp, chunks = sizes.table_stages, sizes.table_chunks
    rows = compare_table(pp, chunks, costs, names=SCHEDULES)
    found = search(pp // 2, chunks, costs)
    auto = simulate(found.schedule, costs)
    rows.append({
        "method": "auto (best)", "schedule": "auto", "stages": pp, "devices": pp // 2,
        "num_chunks": chunks, "makespan": auto.makespan, "bubble": max(auto.bubble),
        "bubble_formula": None, "formula": "", "params_per_device": 2,
        "activations": max(auto.peak_activations), "memory": max(auto.peak_memory),
        "activations_formula": None,
        "activations_formula_text": "", "costs": rows[0]["costs"], "origin": found.origin,
    })
    print(format_compare_table(rows))
    print("simulated step (ms): " + ", ".join(f"{r['method']} {r['makespan']:.2f}" for r in rows))
    # the search runs on the V layout (PP/2 ranks): compare with its seeds there
    seeds = {r["method"]: r["makespan"] for r in rows if r["schedule"] in ("dualpipev", "zbv")}
    best = min(seeds.values())
    report.add("costs", "auto-scheduler vs DualPipeV and ZBV (same ranks)",
               auto.makespan <= best + 1e-9,
               f"{auto.makespan:.2f} ms vs {', '.join(f'{k} {v:.2f}' for k, v in seeds.items())}"
               f" ms ({found.origin})", "<= best of them")
    report.data["costs"] = {"measured_ms": measured, "shape": shape,
                            "table": [{k: v for k, v in r.items() if k != "skipped"}
                                      for r in rows]}


# --------------------------------------------------------------------------- output
def save_picture(report: Report, name: str, draw: Callable[[str], None]) -> None:
    """Draw a PNG into the output folder (skipped, with a note, without matplotlib)."""
    out = Path(report.data["out"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"  (matplotlib not installed: {name} not drawn)")
        return
    out.mkdir(parents=True, exist_ok=True)
    draw(str(out / name))
    report.pictures.append(str(out / name))


def format_summary(checks: Sequence[Check]) -> str:
    """The summary table (Markdown)."""
    header = ["section", "check", "result", "value", "bound"]
    body = [[c.section, c.name, {True: "PASS", False: "FAIL", None: "info"}[c.ok], c.value,
             c.bound] for c in checks]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in body)])


@contextlib.contextmanager
def section(report: Report, title: str) -> Iterator[None]:
    """Print the section's title; an exception in it becomes a failed check (the other
    sections still run)."""
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        traceback.print_exc()
        report.add(title.split(":")[0], f"{title}: ran to the end", False,
                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check dualpipe on one CUDA device: exactness, device paths (NCCL, "
        "device-side waits), memory and measured costs.")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the same code on CPU with gloo and tiny sizes (no CUDA)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--out", default="out/gpu_check",
                        help="folder for the pictures when $OUT is not set")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). This check needs "
              "one CUDA GPU; run it with --cpu-dry-run to try the same code on CPU.",
              file=sys.stderr)
        return NO_CUDA_EXIT
    started = time.perf_counter()
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        # fp32 means fp32: no TF32 in the products the exactness checks compare
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(1)
        name = "cpu (dry run)"
    sizes = sizes_for(device, args.quick)
    report = Report(device=name, dry_run=args.cpu_dry_run)
    report.data["out"] = os.environ.get("OUT") or args.out
    backend = init_group(device)
    print(f"gpu_check: {name}, torch {torch.__version__}, {backend} group of 1 process"
          f"{', quick' if args.quick else ''}", flush=True)
    try:
        for schedule in ("dualpipev", "zbv"):
            for precision in ("fp32", "bf16"):
                with section(report, f"exactness: GPT, {schedule} on one rank, {precision}"):
                    extras = schedule == "dualpipev" and precision == "fp32"
                    check_gpt(report, device, sizes, schedule, precision, extras)
        with section(report, "exactness: split backward per layer kind"):
            check_split(report, device, sizes.gpt.dim)
        with section(report, "device paths: parted MoE stage"):
            check_moe(report, device, sizes)
        with section(report, "memory: allocator peak vs simulator"):
            check_memory(report, device, sizes)
        with section(report, "costs: block times through the simulator"):
            check_costs(report, device, sizes)
    finally:
        dist.destroy_process_group()
    seconds = time.perf_counter() - started
    print("\n" + format_summary(report.checks))
    failed = [c.name for c in report.checks if c.ok is False]
    print(f"\n{'all checks passed' if not failed else f'{len(failed)} check(s) failed'}; "
          f"pictures: {', '.join(report.pictures) or 'none'}; {seconds:.1f} s")
    summary = {
        "ok": report.ok, "device": report.device, "dry_run": report.dry_run,
        "backend": backend, "torch": torch.__version__, "seconds": seconds,
        "checks": [asdict(c) for c in report.checks], "failed": failed,
        "pictures": report.pictures, **report.data,
    }
    print(json.dumps(summary, default=str), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
