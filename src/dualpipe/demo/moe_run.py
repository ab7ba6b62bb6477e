"""``python -m dualpipe demo --model moe``: the MoE GPT on 2 pipeline x 2 expert-parallel
processes with DualPipeV and the overlap engine; prints and writes what it measured."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import DistributedRunError
from ..testing import run_distributed
from ..viz.pair import render_pair_png, render_pair_text
from .moe_train import PIPELINE_RANKS, MoEOptions, moe_config, train_moe_rank
from .task import CopyTask

__all__ = ["run_moe"]

PROG = "dualpipe demo --model moe"


def run_moe(opts: MoEOptions, ranks: int, out: Path, timeout: float | None) -> int:
    """Train on ``ranks`` processes; 0 done, 1 failed (training or gradient check)."""
    started = time.perf_counter()
    config = moe_config(ranks // PIPELINE_RANKS)
    task = CopyTask(vocab_size=config.gpt.vocab_size)
    print(f"{PROG}: {config.gpt.n_layer}-block GPT, FFNs of {config.num_experts} experts "
          f"(top-{config.top_k}) over {config.ep} expert-parallel ranks; DualPipeV on "
          f"{PIPELINE_RANKS} pipeline ranks ({ranks} processes, DeviceMesh "
          f"{PIPELINE_RANKS} x {config.ep}), {opts.chunks} micro-batches x {opts.micro_batch} "
          f"sequences per expert rank, {opts.steps} steps", flush=True)
    limit = timeout if timeout is not None else 120.0 + 3.0 * opts.steps
    try:
        results = run_distributed(train_moe_rank, ranks, opts, timeout=limit)
    except DistributedRunError as exc:
        print(f"{PROG}: error: training failed:\n{exc}", file=sys.stderr)
        return 1
    r = results[0]
    check = r.grad_check
    assert check is not None
    if check.ok:
        print(f"gradient check vs single process: OK (max abs diff {check.max_abs_diff:.2e}, "
              f"losses bit-equal)")
    else:
        print("gradient check vs single process: FAILED\n  " + "\n  ".join(check.messages[:10]))
    print(f"loss: {r.losses[0]:.3f} (step 1) -> {r.losses[-1]:.4f} (step {len(r.losses)}); "
          f"guessing scores {task.chance_loss:.3f}")
    steps = sorted(r.step_ms)
    print(f"step time: median {steps[len(steps) // 2]:.1f} ms")
    hidden = r.comm_ms - r.waited_ms
    print(f"recorded step, process 0: an all-to-all was in flight {r.comm_ms:.1f} ms, the "
          f"process waited for one {r.waited_ms:.1f} ms: {hidden:.1f} ms of communication "
          f"ran under computation; {r.pairs_interleaved} pairs interleaved")
    written = []
    if r.pair:
        print("one measured F&B pair (ms; F = forward parts, B = backward parts, > = "
              "all-to-all in flight):")
        print(render_pair_text(r.pair))
        render_pair_png(r.pair, out / "moe_pair.png", time_unit="ms",
                        title="one measured F&B pair of the MoE GPT, parts interleaved")
        written.append(out / "moe_pair.png")
    summary = {
        "model": "moe", "processes": ranks, "grad_check": {"ok": check.ok,
                                                           "max_abs_diff": check.max_abs_diff,
                                                           "messages": check.messages},
        "losses": r.losses, "step_ms": r.step_ms, "comm_ms": r.comm_ms,
        "waited_ms": r.waited_ms, "pairs_interleaved": r.pairs_interleaved,
        "pair": [iv.__dict__ for iv in r.pair],
        "wall_s": time.perf_counter() - started,
    }
    (out / "moe_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    written.append(out / "moe_summary.json")
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"wall time: {summary['wall_s']:.1f} s")
    return 0 if check.ok else 1
