"""Data parallelism around pipelines (DP x PP): one all-reduce per gradient bucket sums
each stage's gradient over its data-parallel replicas and DualPipe's two copies at once."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime.pipeline import Pipeline
from .stages import is_mirrored, local_stages, unique_parameters
from .transport.guarded import all_reduce, check_group

__all__ = ["GradientSync"]


class GradientSync:
    """Sums (or averages) gradients over the data-parallel replicas of a pipeline.

    Every process of the job runs one pipeline rank of one data-parallel replica (for
    example the rows of a ``DeviceMesh`` of shape ``(dp, pp)``; see ``docs/guide.md``). The
    ranks that hold the same stages (the same pipeline rank in every replica, and with
    DualPipe also the mirrored rank N-1-r, which holds the same two stages) form one
    process group, and :meth:`sync` all-reduces their gradients in buckets: for DualPipe
    this one collective is both the mirrored-copy sum and the data-parallel reduction.

    Build the pipeline with ``sync_mirrored_grads=False`` (DualPipe) so the copies are not
    summed twice. The constructor is collective over the world (it creates the groups).

    The all-reduces are waited for with the pipeline's failure check: a failure anywhere
    in the job (one failure domain, ``docs/runtime.md``) ends :meth:`sync` within about a
    second with :class:`~dualpipe.errors.RemoteFailure` naming the failed rank, even while
    it waits for a replica that will never join. An all-reduce left in flight that way
    makes the group unusable (the error says so): build a new ``GradientSync`` (new
    groups). A pipeline rebuilt after a failure needs a new ``GradientSync`` too, or
    ``sync.pipe = new_pipeline`` when no collective was left in flight.

    Args:
        pipe: this process's pipeline.
        average: divide by the number of data-parallel replicas (the gradient of the mean
            over replicas); False keeps the sum. DualPipe's two copies are always summed.
        bucket_bytes: gradients are flattened into buckets of about this size.
    """

    def __init__(
        self, pipe: Pipeline, *, average: bool = True, bucket_bytes: int = 25 * 2**20
    ) -> None:
        if is_mirrored(pipe) and pipe.sync_mirrored_grads:
            raise ValueError(
                "GradientSync sums DualPipe's mirrored copies itself: build the pipeline with "
                "sync_mirrored_grads=False"
            )
        self.pipe = pipe
        self.average = average
        self.bucket_bytes = bucket_bytes
        stages = local_stages(pipe)
        self.params = unique_parameters(m for _, m in stages)
        key = tuple(k for k, _ in stages)
        # [fsdp] stages wrapped in FSDP2 reduce their own gradients: refused on every rank
        wrapped = bool(getattr(pipe, "extensions", None)) and any(
            type(e).__name__ == "FSDPExtension" for e in pipe.extensions)
        gathered: list[tuple[int, tuple[int, ...], bool]] = [(0, (), False)] * \
            dist.get_world_size()
        dist.all_gather_object(gathered, (pipe.num_ranks, key, wrapped))
        if any(w for _, _, w in gathered):
            raise ValueError(
                "the pipeline's stages are wrapped in FSDP2 (fully_shard/replicate), which "
                "reduces their gradients over the data-parallel ranks itself; do not use "
                "GradientSync on top (the gradients would be reduced twice)"
            )
        everyone = [(n, k) for n, k, _ in gathered]
        sizes = {n for n, _ in everyone}
        if len(sizes) != 1:
            raise ValueError(f"every process must run a pipeline of one size, got {sorted(sizes)}")
        members: dict[tuple[int, ...], list[int]] = {}
        for rank, (_, k) in enumerate(everyone):
            members.setdefault(k, []).append(rank)
        copies = 2 if is_mirrored(pipe) else 1
        self.replicas = dist.get_world_size() // pipe.num_ranks
        for k, ranks in members.items():
            if len(ranks) != copies * self.replicas:
                raise ValueError(
                    f"stages {list(k)} are held by processes {ranks}; expected "
                    f"{copies * self.replicas} ({self.replicas} replicas x {copies} copies): "
                    "every process must be one rank of one identical pipeline"
                )
        self.group: dist.ProcessGroup | None = None
        for k in sorted(members):  # every process creates every group, in the same order
            group = dist.new_group(members[k])
            if k == key:
                self.group = group
        self.ranks = members[key]

    def sync(self) -> None:
        """All-reduce the gradients of this rank's stages over the processes holding the
        same stages (a missing gradient counts as zero and is then set)."""
        # (each all-reduce refuses to start if this pipeline failed: partial gradients)
        check_group(self.group, self.pipe.transport)  # once per sync: the store's record
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in self.params:
            if bucket and p.dtype != bucket[0].dtype:  # one dtype per bucket
                self._reduce(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                self._reduce(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce(bucket)

    def _reduce(self, params: list[torch.nn.Parameter]) -> None:
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        all_reduce(flat, self.group, self.pipe.transport,
                   f"GradientSync's all-reduce of {len(params)} gradient(s)", host=False,
                   post=True, checked=True)
        if self.average and self.replicas > 1:
            flat /= self.replicas
        offset = 0
        for p in params:
            piece = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)

    __call__ = sync
