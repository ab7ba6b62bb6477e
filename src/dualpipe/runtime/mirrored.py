"""DualPipe's mirrored stages: every stage lives on two ranks (r and N-1-r); the two copies
are checked at construction and their gradients summed after each training step.

Parameters that are DTensors (FSDP2, tensor parallelism) take part through their local
shards: both copies must hold the same shard (same mesh shape, placements and mesh
coordinate, checked at construction), and the sum of the local shards of their gradients
is the local shard of the summed gradient."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PipelineError
from ..transport.process_group import Transport
from ..transport.protocol import EXCHANGE_SEQ

__all__ = ["MirroredStages", "MIRRORED_WEIGHTS"]

MIRRORED_WEIGHTS = ("check", "sync", "ignore")
"""What construction does with the copies' weights: compare them, copy the lower rank's
to the higher rank, or leave them alone."""

try:  # [dtensor] torch >= 2.5; older versions have no public DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None  # type: ignore[assignment,misc]


def _local(t: torch.Tensor) -> torch.Tensor:
    """[dtensor] The local shard of a DTensor (the tensor itself otherwise), detached."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local().detach()
    return t.detach()


def _shard_key(t: torch.Tensor) -> str:
    """[dtensor] What must agree between two copies of a parameter for their local
    shards to line up: mesh shape, placements, this rank's mesh coordinate, local shape."""
    if _DTensor is not None and isinstance(t, _DTensor):
        mesh = t.device_mesh
        return (f"{tuple(mesh.shape)}|{tuple(str(p) for p in t.placements)}|"
                f"{mesh.get_coordinate()}|{tuple(t.to_local().shape)}")
    return "plain"


def _like(p: torch.Tensor, local: torch.Tensor) -> Any:
    """[dtensor] A gradient for ``p`` whose local part is ``local``."""
    if _DTensor is not None and isinstance(p, _DTensor):
        return _DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
    return local


_TAG = EXCHANGE_SEQ  # message number of the partner exchanges (after every planned message)


class MirroredStages:
    """The parameters this rank shares with its partner rank ``N-1-rank``.

    Both ranks list their parameters in the same order (the stage with the lower id
    first), so every exchanged tensor lines up element by element. A parameter shared by
    the two stages (an embedding tied to the output head: stages 0 and N-1 are both on
    ranks 0 and N-1) is listed once, under its first name, so its partner's gradient is
    added once.

    Args:
        modules: this rank's two modules.
        stage_ids: the model stage each module computes.
        rank: this rank's pipeline rank; ``partner`` is the rank holding the other copies.
        transport: the pipeline's messaging (bounded waits, failures reported).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        stage_ids: Sequence[int],
        rank: int,
        partner: int,
        transport: Transport,
    ) -> None:
        self.rank = rank
        self.partner = partner
        self.transport = transport
        order = sorted(range(len(modules)), key=lambda i: stage_ids[i])
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for i in order:
            for name, p in modules[i].named_parameters():
                if id(p) in seen:  # tied to a parameter listed before: counted once
                    continue
                seen.add(id(p))
                self.names.append(f"module.{i}.{name} (stage {stage_ids[i]})")
                self.params.append(p)
        # which parameters the last exchange carried gradients for (agreed by both copies)
        self._carried: list[bool] = [p.requires_grad for p in self.params]
        # .grad tensors held before the current step (see set_aside)
        self._stash: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ messages
    def _swap(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return self.transport.exchange(
            tensor.to(self.transport.device), self.partner, _TAG,
            f"{what} from rank {self.partner} (the mirrored copies)",
        )

    def _ints(self, values: list[int], what: str) -> list[int]:
        mine = torch.tensor(values, dtype=torch.int64)
        return [int(v) for v in self._swap(mine, what).cpu().tolist()]

    def _flat(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        device = self.transport.device
        if not pieces:
            return torch.zeros(0, device=device)
        return torch.cat([_local(t).reshape(-1).to(device) for t in pieces])

    def _differ(self, what: str) -> ValueError:
        return ValueError(
            f"rank {self.rank}: the two copies of a DualPipe stage (ranks {self.rank} and "
            f"{self.partner}) {what}"
        )

    # ------------------------------------------------------------------ construction
    def check(self, weights: str) -> None:
        """Agree with the partner on the parameters' structure and ``requires_grad``,
        then compare (``"check"``), copy (``"sync"``) or skip (``"ignore"``) the weights.

        Raises ``ValueError`` on both ranks when the copies differ."""
        if weights not in MIRRORED_WEIGHTS:
            raise ValueError(f"mirrored_weights must be one of {MIRRORED_WEIGHTS}, got {weights!r}")
        mode = MIRRORED_WEIGHTS.index(weights)
        sizes = [len(self.params), sum(_local(p).numel() for p in self.params), mode]
        theirs = self._ints(sizes, "parameter counts")
        if theirs[:2] != sizes[:2]:
            raise self._differ(
                f"have different parameters: {sizes[0]} tensors / {sizes[1]} values here, "
                f"{theirs[0]} / {theirs[1]} there"
            )
        if theirs[2] != mode:
            raise self._differ(
                f"were built with different mirrored_weights: {weights!r} here, "
                f"{MIRRORED_WEIGHTS[theirs[2]]!r} there"
            )
        if not self.params:
            return  # nothing to compare (both copies agree: no parameters)
        meta: list[int] = []
        for p in self.params:
            meta += [_local(p).numel(), zlib.crc32(str(p.dtype).encode()), int(p.requires_grad),
                     zlib.crc32(_shard_key(p).encode())]
        other = self._ints(meta, "parameter shapes")
        for k, name in enumerate(self.names):
            mine_k, theirs_k = meta[4 * k : 4 * k + 4], other[4 * k : 4 * k + 4]
            if mine_k[3] != theirs_k[3]:
                raise self._differ(
                    f"hold different shards of parameter {name} ({_shard_key(self.params[k])} "
                    "here: mesh shape, placements, mesh coordinate, local shape); the two "
                    "ranks of a DualPipe pipeline must have the same data-parallel and "
                    "tensor-parallel coordinates (build the pipeline group from one row of "
                    "the device mesh)"
                )
            if mine_k[:2] != theirs_k[:2]:
                raise self._differ(f"differ in the size or dtype of parameter {name}")
            if mine_k[2] != theirs_k[2]:
                raise self._differ(
                    f"disagree on requires_grad of parameter {name}: {bool(mine_k[2])} on "
                    f"rank {self.rank}, {bool(theirs_k[2])} on rank {self.partner}; freeze "
                    "or unfreeze both copies"
                )
        self._carried = [p.requires_grad for p in self.params]
        if weights == "ignore":
            return
        mine = self._flat(list(self.params))
        other_w = self._swap(mine, "weights")
        if weights == "sync":
            if self.rank > self.partner:
                self._copy_into(other_w)
            return
        if not torch.equal(mine, other_w):
            raise self._differ(
                "have different weights; build them from the same weights or pass "
                "mirrored_weights='sync'"
            )

    def _copy_into(self, flat: torch.Tensor) -> None:
        pieces = self._cut(flat, list(range(len(self.params))))
        with torch.no_grad():
            for k, p in enumerate(self.params):
                local = _local(p)
                local.copy_(pieces[k].view_as(local))

    # ------------------------------------------------------------------ gradients
    def _cut(self, flat: torch.Tensor, which: list[int]) -> dict[int, torch.Tensor]:
        """``flat`` cut into the (flattened) values of parameters ``which``, in order."""
        out: dict[int, torch.Tensor] = {}
        offset = 0
        for k in which:
            numel = _local(self.params[k]).numel()
            out[k] = flat[offset : offset + numel]
            offset += numel
        return out

    def sum_grads(self) -> None:
        """Give both copies of every parameter the sum of their gradients.

        Only parameters that require grad and got a gradient on at least one copy take
        part (frozen or unused parameters keep ``.grad = None``). After
        :meth:`set_aside`, the sum of this step's gradients is accumulated in place into
        the ``.grad`` tensors held before the step. One message each way in the steady
        state (a parameter unfrozen since the last step costs one more)."""
        n = len(self.params)
        if n == 0:
            return
        wants = [p.requires_grad for p in self.params]
        has = [w and p.grad is not None for w, p in zip(wants, self.params, strict=True)]
        carried = self._carried
        device = self.transport.device
        sent = [k for k in range(n) if carried[k]]
        dtype = _promoted([self.params[k].dtype for k in sent])
        pieces = [torch.tensor([float(v) for v in wants + has], dtype=dtype, device=device)]
        for k in sent:
            grad = self.params[k].grad
            if has[k] and grad is not None:
                pieces.append(_local(grad).reshape(-1).to(device, dtype))
            else:
                pieces.append(torch.zeros(_local(self.params[k]).numel(), dtype=dtype,
                                          device=device))
        other = self._swap(torch.cat(pieces), "gradients")
        their_wants = [bool(v) for v in other[:n].tolist()]
        their_has = [bool(v) for v in other[n : 2 * n].tolist()]
        for k in range(n):
            if wants[k] != their_wants[k]:
                raise PipelineError(
                    f"rank {self.rank}: requires_grad of the mirrored parameter "
                    f"{self.names[k]} is {wants[k]} on rank {self.rank} but "
                    f"{their_wants[k]} on rank {self.partner}; change both copies"
                )
        theirs = self._cut(other[2 * n :], sent)
        late = [k for k in range(n) if wants[k] and not carried[k]]
        if late:  # unfrozen since the last exchange: both copies send these now
            extra: list[torch.Tensor] = []
            for k in late:
                grad = self.params[k].grad
                extra.append(grad if has[k] and grad is not None
                             else torch.zeros_like(_local(self.params[k])))
            got = self._swap(self._flat(extra), "gradients of unfrozen parameters")
            theirs.update(self._cut(got, late))
        self._carried = wants
        stash, self._stash = self._stash, {}
        for k, p in enumerate(self.params):
            if not wants[k]:
                continue
            total = p.grad  # this step's part: mine + theirs (the same sum on both copies)
            if their_has[k]:
                other_k = theirs[k].view_as(_local(p))
                if total is None:
                    total = _like(p, other_k.to(p.dtype).clone())
                else:
                    _local(total).add_(other_k.to(total.dtype))
            before = stash.get(k)
            if before is not None:
                if total is not None:
                    _local(before).add_(_local(total))
                total = before
            p.grad = total

    def set_aside(self) -> None:
        """Before a training step: move existing ``.grad`` tensors of parameters that
        require grad aside, so that :meth:`sum_grads` sums only this step's gradients and
        then accumulates the sum into them (in place: the same tensors come back)."""
        self._stash = {}
        for k, p in enumerate(self.params):
            if p.requires_grad and p.grad is not None:
                self._stash[k] = p.grad
                p.grad = None

    def put_back(self) -> None:
        """After a failed step: restore the ``.grad`` tensors :meth:`set_aside` moved
        (the failed step's partial gradients are dropped)."""
        stash, self._stash = self._stash, {}
        for k, grad in stash.items():
            self.params[k].grad = grad


def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """One dtype that holds every value of ``dtypes`` exactly (float32 if none)."""
    out = dtypes[0] if dtypes else torch.float32
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out
