"""Splitting a batch into micro-batches and putting results back together."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["scatter_microbatches", "concat_chunks"]


def scatter_microbatches(
    tensors: Sequence[torch.Tensor | None], num_chunks: int, batch_dim: int, what: str
) -> list[tuple[torch.Tensor | None, ...]]:
    """Split every tensor into ``num_chunks`` equal slices along ``batch_dim``; a ``None``
    entry stays ``None`` in every micro-batch.

    Returns one tuple per micro-batch. Raises ``ValueError`` naming ``what``
    (``inputs``/``labels``) when a tensor does not split evenly.
    """
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
        if t.dim() <= batch_dim:
            raise ValueError(
                f"{what}[{i}] has {t.dim()} dims; batch_dim={batch_dim} is out of range"
            )
        size = t.shape[batch_dim]
        if size % num_chunks or size == 0:
            raise ValueError(
                f"{what}[{i}] has {size} samples along batch_dim={batch_dim}, which does not "
                f"split into {num_chunks} equal micro-batches"
            )
    pieces = [
        t.tensor_split(num_chunks, dim=batch_dim) if t is not None else (None,) * num_chunks
        for t in tensors
    ]
    return [tuple(p[k] for p in pieces) for k in range(num_chunks)]


def concat_chunks(
    chunks: Sequence[Sequence[torch.Tensor]], batch_dim: int
) -> tuple[torch.Tensor, ...]:
    """Put per-micro-batch outputs back together: each output concatenated along
    ``batch_dim``, except 0-dim outputs (a scalar per micro-batch, such as an auxiliary loss
    travelling with the activations), which are stacked into shape ``[C]``, one value per
    micro-batch in order.

    Raises ``ValueError`` naming the output when one has dimensions but none at
    ``batch_dim``.
    """
    if not chunks:
        return ()
    out = []
    for i in range(len(chunks[0])):
        pieces = [c[i] for c in chunks]
        dims = pieces[0].dim()
        if dims == 0:
            out.append(torch.stack(pieces))
            continue
        if dims <= batch_dim:
            raise ValueError(
                f"output {i} has {dims} dim(s), so it cannot be concatenated along "
                f"batch_dim={batch_dim}; return_outputs needs outputs with that dimension "
                "(or 0-dim ones, which are stacked per micro-batch)"
            )
        out.append(torch.cat(pieces, dim=batch_dim))
    return tuple(out)
