"""A complete pipeline-parallel training job under ``torchrun``: split, data parallelism,
clipping, metrics, distributed checkpoints and resuming.

One machine, 4 processes, pipeline only (DualPipeV over 4 ranks)::

    torchrun --nproc-per-node 4 examples/train_job.py --ckpt out/job

Resume from the newest checkpoint in that folder (any pipeline size or schedule)::

    torchrun --nproc-per-node 2 examples/train_job.py --ckpt out/job --resume

2 data-parallel replicas x 2 pipeline ranks over a ``DeviceMesh``::

    torchrun --nproc-per-node 4 examples/train_job.py --dp 2 --schedule dualpipe

The same replicas sharded with FSDP2 instead (``fully_shard`` on every stage), and with
the blocks' MLPs tensor-parallel over 2 more processes per replica (8 in all)::

    torchrun --nproc-per-node 4 examples/train_job.py --dp 2 --fsdp
    torchrun --nproc-per-node 8 examples/train_job.py --dp 2 --fsdp --tp 2

What it uses (see ``docs/guide.md``):

* ``dualpipe.split.split_model`` cuts the model's layers (embedding, blocks, head) into
  the schedule's stages, balanced by parameter count (or, with ``--balance time``, by
  layer times measured on rank 0), and returns this rank's.
* ``Pipeline(..., loss_reduction="mean")``: gradients of the batch's mean loss.
* ``dualpipe.data_parallel.GradientSync`` (with ``--dp``): one all-reduce per bucket sums
  each stage's gradients over its replicas (and DualPipe's two copies) and averages.
* ``--fsdp``: each stage (and each of its blocks) wrapped in FSDP2's ``fully_shard`` over
  the replicas instead; the pipeline reduce-scatters each stage's gradients once per step.
* ``--tp N``: the blocks' MLPs split over N processes with ``ColwiseParallel`` /
  ``RowwiseParallel`` (the mesh becomes ``(dp, pp, tp)``).
* ``dualpipe.clip.clip_grad_norm_``: the global gradient norm over every stage.
* ``step(..., record=True, broadcast_loss=True)`` on logging steps, then
  ``dualpipe.metrics.step_metrics``: loss, step time, bubble and tokens/s on every rank.
* ``dualpipe.checkpoint.save`` / ``load``: DCP checkpoints keyed by layer, every
  ``--ckpt-every`` steps, loadable into another pipeline size.
* ``--timeline PREFIX``: the last logged step drawn as ``PREFIX.png`` and ``PREFIX.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dualpipe import Pipeline, checkpoint
from dualpipe.clip import clip_grad_norm_
from dualpipe.data_parallel import GradientSync
from dualpipe.demo.model import GPTConfig, build_gpt
from dualpipe.demo.task import CopyTask, lm_loss
from dualpipe.metrics import step_metrics
from dualpipe.schedules.registry import layout_for
from dualpipe.split import measure_layer_times, split_model
from dualpipe.stages import unique_parameters


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", default="dualpipev",
                   choices=["dualpipev", "dualpipe", "1f1b", "zb1p", "gpipe"])
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--fsdp", action="store_true",
                   help="shard each stage over the replicas with FSDP2 (fully_shard)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the MLPs")
    p.add_argument("--chunks", type=int, default=None,
                   help="micro-batches per step (default: max(8, 2 x pipeline ranks))")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks")
    p.add_argument("--balance", choices=["params", "time"], default="params",
                   help="balance stages by parameter count or by measured layer times")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder")
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="start from the newest checkpoint")
    p.add_argument("--timeline", type=Path, default=None,
                   help="draw the last logged step to PREFIX.png and PREFIX.json")
    return p.parse_args()


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (``step_<k>`` with DCP's ``.metadata`` written last)."""
    done = [d for d in folder.glob("step_*") if (d / ".metadata").exists()]
    return max(done, key=lambda d: int(d.name.split("_")[1]), default=None)


def parallelize_mlps(stages: list[Any], mesh: Any) -> None:
    """``--tp``: every block's MLP column-wise then row-wise over the mesh's "tp" dim."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for stage in stages:
        for layer in stage:
            if isinstance(getattr(layer, "mlp", None), torch.nn.Sequential):
                parallelize_module(layer.mlp, mesh["tp"],
                                   {"0": ColwiseParallel(), "2": RowwiseParallel()})


def shard_stages(stages: list[Any], mesh: Any) -> None:
    """``--fsdp``: one FSDP2 group per layer, then the stage (every parameter in a group)."""
    from torch.distributed.fsdp import fully_shard

    for stage in stages:
        for layer in stage:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(stage, mesh=mesh["dp"])


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world % (args.dp * args.tp):
        raise SystemExit(f"--dp {args.dp} x --tp {args.tp} does not divide {world} processes")
    pp = world // (args.dp * args.tp)
    # the pipeline runs along the mesh's "pp" dimension, data parallelism along "dp"
    # (and tensor parallelism along "tp")
    if args.tp > 1:
        mesh = init_device_mesh(device.type, (args.dp, pp, args.tp),
                                mesh_dim_names=("dp", "pp", "tp"))
    else:
        mesh = init_device_mesh(device.type, (args.dp, pp), mesh_dim_names=("dp", "pp"))
    pp_group, dp_group = mesh.get_group("pp"), mesh.get_group("dp")
    replica = mesh.get_local_rank("dp")
    chunks = args.chunks if args.chunks is not None else max(8, 2 * pp)

    # The model as a list of layers (the same on every rank), cut into the stages.
    task = CopyTask()
    config = GPTConfig(vocab_size=task.vocab_size, seq_len=task.seq_len, n_layer=args.layers)
    layers = build_gpt(config, seed=args.seed).pieces()  # embed, blocks..., head
    costs: str | list[float] = "params"
    if args.balance == "time":  # measured on one process, the same costs everywhere
        measured: list[Any] = [None]
        if dist.get_rank() == 0:
            sample = task.batch(args.micro_batch, args.seed, 0)[0].to(device)
            measured = [measure_layer_times([m.to(device) for m in layers], sample)]
        dist.broadcast_object_list(measured, src=0)
        costs = [float(c) for c in measured[0]]
    mine = [m.to(device) for m in split_model(layers, args.schedule, costs=costs,
                                              group=pp_group)]
    del layers
    if args.tp > 1:
        parallelize_mlps(mine, mesh)
    if args.fsdp:
        shard_stages(mine, mesh)
    gradient_sync = args.dp > 1 and not args.fsdp
    pipe = Pipeline(mine, args.schedule, process_group=pp_group, loss_reduction="mean",
                    sync_mirrored_grads=not gradient_sync)  # GradientSync sums the copies
    sync = GradientSync(pipe) if gradient_sync else None
    optimizer = torch.optim.AdamW(unique_parameters(mine), lr=args.lr, weight_decay=0.01)
    # Dropout (none in this model) would need a different stream per stage and replica:
    torch.manual_seed(args.seed * 1_000_003 + replica * 1009 + mine[0].stage)

    first = 0
    if args.resume and args.ckpt is not None:
        found = newest_checkpoint(args.ckpt)
        if found is not None:
            first = int(checkpoint.load(found, pipe, optimizer, extra={"step": 0})["step"])
            if dist.get_rank() == 0:
                print(f"resumed from {found} at step {first}", flush=True)

    layout = layout_for(args.schedule, pp)
    start = next((s for s, path in enumerate(layout.paths) if path[0][0] == pipe.rank), None)
    end = next((s for s, path in enumerate(layout.paths) if path[-1][0] == pipe.rank), None)
    batch = chunks * args.micro_batch  # per replica
    tokens_per_step = batch * args.dp * config.seq_len
    if dist.get_rank() == 0:
        print(f"{args.schedule}: {args.dp} replica(s) x {pp} pipeline ranks x {args.tp} "
              f"tensor-parallel{' (FSDP2)' if args.fsdp else ''}, {chunks} "
              f"micro-batches of {args.micro_batch}; stages on rank 0: "
              f"{[(m.stage, list(m.layer_ids)) for m in mine]}", flush=True)

    for step in range(first, args.steps):
        tokens, targets = task.batch(batch * args.dp, args.seed, step)
        tokens, targets = tokens.chunk(args.dp)[replica], targets.chunk(args.dp)[replica]
        per_stream = tokens.chunk(layout.num_streams), targets.chunk(layout.num_streams)
        inputs = (per_stream[0][start].to(device),) if start is not None else ()
        labels = (per_stream[1][end].to(device),) if end is not None else ()
        log = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        t0 = time.perf_counter()
        losses, _ = pipe.step(*inputs, num_chunks=chunks, criterion=lm_loss, labels=labels,
                              record=log, broadcast_loss=log)
        if sync is not None:
            sync()
        # one global norm: every parameter once (DTensor shards of --fsdp/--tp included)
        norm = clip_grad_norm_(pipe, args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall = time.perf_counter() - t0
        if log:
            assert losses is not None  # every rank has them with broadcast_loss
            loss = losses.mean().to(device)
            dist.all_reduce(loss, group=dp_group)
            metrics = step_metrics(pipe, tokens=tokens_per_step)
            if dist.get_rank() == 0:
                print(f"step {step + 1}/{args.steps}  loss {loss.item() / args.dp:.4f}  "
                      f"grad norm {f'{norm.item():.3f}' if norm is not None else 'n/a'}  "
                      f"step {metrics.step_ms:.1f} ms "
                      f"(with sync/clip/optimizer {wall * 1000:.1f} ms)  "
                      f"bubble {100 * metrics.bubble:.1f}%  "
                      f"{metrics.tokens_per_s:,.0f} tokens/s", flush=True)
            if args.timeline is not None:
                timeline = pipe.gather_timeline()  # collective; on pipeline rank 0
                if timeline is not None and replica == 0:
                    args.timeline.parent.mkdir(parents=True, exist_ok=True)
                    timeline.save_png(args.timeline.with_suffix(".png"))
                    timeline.save_trace(args.timeline.with_suffix(".json"))
        if args.ckpt is not None and (step + 1) % args.ckpt_every == 0:
            checkpoint.save(args.ckpt / f"step_{step + 1}", pipe, optimizer,
                            extra={"step": step + 1})
            if dist.get_rank() == 0:
                print(f"saved {args.ckpt / f'step_{step + 1}'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
