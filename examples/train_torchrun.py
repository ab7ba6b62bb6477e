"""Train a small GPT with DualPipeV (or another schedule) under ``torchrun``.

A starting point to copy for your own model and cluster. One process per pipeline
rank; on CPU the ranks talk over gloo, with CUDA over NCCL with each process on the
GPU given by its ``LOCAL_RANK``.

One machine, 4 processes::

    torchrun --nproc-per-node 4 examples/train_torchrun.py
    torchrun --nproc-per-node 4 examples/train_torchrun.py --schedule dualpipe --steps 200

Two machines with 8 GPUs each (16 ranks; run on both, with ``--node-rank 0`` on HOST
and ``--node-rank 1`` on the other)::

    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \\
        --nproc-per-node 8 examples/train_torchrun.py

How the pieces fit (see the numbered comments below):

1. ``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_process_group``
   reads them (``env://``).
2. The model is cut into stages: DualPipeV on N ranks takes 2N stages and rank r
   holds stages r and 2N-1-r; DualPipe takes N stages and rank r holds stages r and
   N-1-r (every stage lives on two ranks); 1F1B, ZB1P and GPipe take one stage per
   rank. ``layout_for(schedule, N).rank_stages[rank]`` says which.
3. Every rank builds its stages from the same seed (for DualPipe both copies of a
   stage must start equal; the pipeline checks it).
4. ``pipe.step`` takes the inputs on the rank where a stream starts and the labels
   where it ends (DualPipeV: both on rank 0; DualPipe: half the batch enters at
   rank 0 and half at rank N-1); it returns the per-micro-batch losses there.
   Gradients are those of the sum of the micro-batch losses; for DualPipe the two
   copies of each stage get the summed gradient, so identical optimizers keep them
   identical.
5. Each rank steps an ordinary optimizer over its own stages' parameters.

Replace :func:`dualpipe.demo.model.gpt_stages` and the copy task
(:mod:`dualpipe.demo.task`) with your model's stages and your data.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dualpipe import Pipeline
from dualpipe.demo.model import GPTConfig, gpt_stages
from dualpipe.demo.task import IGNORE, CopyTask, lm_loss
from dualpipe.schedules.layout import Layout
from dualpipe.schedules.registry import layout_for


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", default="dualpipev",
                   choices=["dualpipev", "dualpipe", "1f1b", "zb1p", "gpipe"])
    p.add_argument("--chunks", type=int, default=None,
                   help="micro-batches per step (default: 2 x world size)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save", type=Path, default=None,
                   help="folder for the trained stages (stage<k>.pt, written by their holder)")
    return p.parse_args()


def setup() -> tuple[int, int, torch.device]:
    """1. Join the job started by torchrun; pick this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def ends(layout: Layout, rank: int) -> tuple[int | None, int | None]:
    """(stream whose inputs enter at ``rank``, stream whose labels/loss live at ``rank``)."""
    start = next(iter(layout.streams_starting_on(rank)), None)
    end = next(iter(layout.streams_ending_on(rank)), None)
    return start, end


def main() -> None:
    args = parse_args()
    rank, world, device = setup()
    chunks = args.chunks if args.chunks is not None else 2 * world

    # 2.-3. This rank's stages, built from the same seed on every rank.
    layout = layout_for(args.schedule, world)
    task = CopyTask()
    config = GPTConfig(vocab_size=task.vocab_size, seq_len=task.seq_len,
                       n_layer=max(6, layout.num_stages - 2))
    # (Every rank builds the whole small model here and keeps its stages; for a big
    # model, build only the stages in layout.rank_stages[rank].)
    stages = gpt_stages(config, layout.num_stages, seed=args.seed)
    my_ids = layout.rank_stages[rank]
    mine = [stages[k].to(device) for k in my_ids]
    del stages
    # DualPipeV(mine) and DualPipe(mine) are the same as naming the schedule here.
    pipe = Pipeline(mine, args.schedule)
    params = [p for m in mine for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start, end = ends(layout, rank)
    print(f"[rank {rank}/{world}] {args.schedule}: stages {list(my_ids)} on {device}"
          + (", inputs here" if start is not None else "")
          + (", loss here" if end is not None else ""), flush=True)

    def batch(step: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """This rank's inputs and labels of a step. Every rank makes the same batch from
        (seed, step); a stream gets its share (DualPipe: first half down, second up)."""
        tokens, targets = task.batch(chunks * args.micro_batch, args.seed, step)
        tokens = tokens.chunk(layout.num_streams)
        targets = targets.chunk(layout.num_streams)
        inputs = (tokens[start].to(device),) if start is not None else ()
        labels = (targets[end].to(device),) if end is not None else ()
        return inputs, labels

    # 4.-5. Train.
    t0 = time.perf_counter()
    for step in range(args.steps):
        inputs, labels = batch(step)
        optimizer.zero_grad(set_to_none=True)
        losses, _ = pipe.step(*inputs, num_chunks=chunks, criterion=lm_loss, labels=labels)
        optimizer.step()
        if losses is not None and (step % args.log_every == 0 or step == args.steps - 1):
            elapsed = time.perf_counter() - t0
            print(f"[rank {rank}] step {step + 1}/{args.steps}  loss {losses.mean().item():.4f}"
                  f"  ({elapsed / (step + 1) * 1000:.0f} ms/step)", flush=True)

    # Inference: forward only under no_grad; outputs come back where the stream ends.
    inputs, labels = batch(args.steps)
    with torch.no_grad():
        losses, logits = pipe.step(*inputs, num_chunks=chunks, criterion=lm_loss,
                                   labels=labels, return_outputs=True)
    if losses is not None:
        assert isinstance(logits, torch.Tensor)
        counted = labels[0] != IGNORE
        correct = (logits.argmax(-1) == labels[0])[counted].float().mean().item()
        print(f"[rank {rank}] held-out loss {losses.mean().item():.4f}, "
              f"copied tokens right: {100 * correct:.1f}%", flush=True)

    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        for k, module in zip(my_ids, mine, strict=True):
            if rank == min(r for r, ids in enumerate(layout.rank_stages) if k in ids):
                torch.save(module.state_dict(), args.save / f"stage{k}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
