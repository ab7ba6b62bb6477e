"""``python -m dualpipe demo --model moe`` and ``--model hf-moe``: the MoE GPT, or a
HuggingFace Qwen3-MoE, on 2 pipeline x 2 expert-parallel processes with DualPipeV and the
overlap engine; prints and writes what it measured."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DistributedRunError
from ..testing import run_distributed
from ..viz.pair import render_pair_png, render_pair_text
from .moe_train import PIPELINE_RANKS, MoEOptions, MoERankResult, moe_config, train_moe_rank
from .task import CopyTask

__all__ = ["run_moe", "run_hf_moe"]

PROG = "dualpipe demo --model moe"


@dataclass(frozen=True)
class _Demo:
    """What differs between the expert-parallel demos: names, the header, the training
    function of one process, the chance level of the loss."""

    model: str
    header: str
    train: Callable[[int, int, MoEOptions], MoERankResult]
    chance_loss: float
    title: str


def run_moe(opts: MoEOptions, ranks: int, out: Path, timeout: float | None) -> int:
    """Train on ``ranks`` processes; 0 done, 1 failed (training or gradient check)."""
    config = moe_config(ranks // PIPELINE_RANKS)
    task = CopyTask(vocab_size=config.gpt.vocab_size)
    header = (f"{PROG}: {config.gpt.n_layer}-block GPT, FFNs of {config.num_experts} experts "
              f"(top-{config.top_k}) over {config.ep} expert-parallel ranks; DualPipeV on "
              f"{PIPELINE_RANKS} pipeline ranks ({ranks} processes, DeviceMesh "
              f"{PIPELINE_RANKS} x {config.ep}), {opts.chunks} micro-batches x "
              f"{opts.micro_batch} sequences per expert rank, {opts.steps} steps")
    demo = _Demo("moe", header, train_moe_rank, task.chance_loss,
                 "one measured F&B pair of the MoE GPT, parts interleaved")
    return _train_and_report(demo, opts, ranks, out, timeout)


def run_hf_moe(opts: MoEOptions, ranks: int, out: Path, timeout: float | None) -> int:
    """The HuggingFace Qwen3-MoE on ``ranks`` processes, even steps with the overlap
    engine and odd steps without; 0 done, 1 failed (training or gradient check)."""
    from .hf_moe import hf_moe_config, train_hf_moe_rank

    cfg = hf_moe_config()
    task = CopyTask(vocab_size=cfg.vocab_size)
    ep = ranks // PIPELINE_RANKS
    header = (f"dualpipe demo --model hf-moe: HuggingFace Qwen3MoeForCausalLM (random init, "
              f"{cfg.num_hidden_layers} decoder layers, hidden {cfg.hidden_size}, "
              f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}) with its experts over "
              f"{ep} expert-parallel ranks (dualpipe.models.hf_ep); DualPipeV on "
              f"{PIPELINE_RANKS} pipeline ranks ({ranks} processes, DeviceMesh "
              f"{PIPELINE_RANKS} x {ep}), {opts.chunks} micro-batches x {opts.micro_batch} "
              f"sequences per expert rank, {opts.steps} steps (even steps with the overlap "
              f"engine, odd steps without)")
    demo = _Demo("hf-moe", header, train_hf_moe_rank, task.chance_loss,
                 "one measured F&B pair of HF's Qwen3-MoE, parts interleaved")
    return _train_and_report(demo, opts, ranks, out, timeout)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _train_and_report(demo: _Demo, opts: MoEOptions, ranks: int, out: Path,
                      timeout: float | None) -> int:
    """Run ``demo.train`` on ``ranks`` processes, print and write what it measured."""
    started = time.perf_counter()
    prog = f"dualpipe demo --model {demo.model}"
    print(demo.header, flush=True)
    limit = timeout if timeout is not None else 120.0 + 3.0 * opts.steps
    try:
        results = run_distributed(demo.train, ranks, opts, timeout=limit)
    except DistributedRunError as exc:
        print(f"{prog}: error: training failed:\n{exc}", file=sys.stderr)
        return 1
    r = results[0]
    check = r.grad_check
    assert check is not None
    if check.ok:
        detail = r.check_detail or (f"max abs diff {check.max_abs_diff:.2e}, losses "
                                    "bit-equal")
        print(f"gradient check vs single process: OK ({detail})")
    else:
        print("gradient check vs single process: FAILED\n  " + "\n  ".join(check.messages[:10]))
    print(f"loss: {r.losses[0]:.3f} (step 1) -> {r.losses[-1]:.4f} (step {len(r.losses)}); "
          f"guessing scores {demo.chance_loss:.3f}")
    if r.plain_ms:
        # the first step of each kind warms up: left out where there are more
        on, off = r.step_ms[1:] or r.step_ms, r.plain_ms[1:] or r.plain_ms
        print(f"step time: median {_median(on):.1f} ms with the overlap engine, "
              f"{_median(off):.1f} ms without (the same stages as ordinary modules, "
              f"all-to-alls blocking; {len(on)} and {len(off)} steps)")
    else:
        print(f"step time: median {_median(r.step_ms):.1f} ms")
    hidden = r.comm_ms - r.waited_ms
    print(f"recorded step, process 0: an all-to-all was in flight {r.comm_ms:.1f} ms, the "
          f"process waited for one {r.waited_ms:.1f} ms: {hidden:.1f} ms of communication "
          f"ran under computation; {r.pairs_interleaved} pairs interleaved")
    written = []
    prefix = demo.model.replace("-", "_")
    if r.pair:
        print("one measured F&B pair (ms; F = forward parts, B = backward parts, > = "
              "all-to-all in flight):")
        print(render_pair_text(r.pair))
        pair_png = out / f"{prefix}_pair.png"
        render_pair_png(r.pair, pair_png, time_unit="ms", title=demo.title)
        written.append(pair_png)
    summary = {
        "model": demo.model, "processes": ranks, "grad_check": {"ok": check.ok,
                                                                "max_abs_diff": check.max_abs_diff,
                                                                "messages": check.messages},
        "check_detail": r.check_detail, "losses": r.losses, "step_ms": r.step_ms,
        "plain_step_ms": r.plain_ms, "comm_ms": r.comm_ms,
        "waited_ms": r.waited_ms, "pairs_interleaved": r.pairs_interleaved,
        "pair": [iv.__dict__ for iv in r.pair],
        "wall_s": time.perf_counter() - started,
    }
    summary_json = out / f"{prefix}_summary.json"
    summary_json.write_text(json.dumps(summary, indent=1) + "\n")
    written.append(summary_json)
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"wall time: {summary['wall_s']:.1f} s")
    return 0 if check.ok else 1
