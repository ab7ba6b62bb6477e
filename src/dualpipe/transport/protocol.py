"""The message protocol: which pipeline and step a message belongs to, the agreement checks
made at construction and at the start of every step."""

from __future__ import annotations

import base64
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PipelineError

__all__ = ["PipelineIdentity", "handshake", "wire_tag", "Stamp", "STAMP_SEQ", "EXCHANGE_SEQ",
           "MAX_SEQ", "disagreement"]

_PIPELINE_BITS, _STEP_BITS, _SEQ_BITS = 8, 8, 15
MAX_SEQ = (1 << _SEQ_BITS) - 3
"""Largest message number of a step between two ranks."""
STAMP_SEQ = -1
"""Message number of the step's stamp (before every planned message)."""
EXCHANGE_SEQ = MAX_SEQ + 1
"""Message number of the mirrored-stage exchange after a step."""


def wire_tag(pipeline: int, step: int, seq: int) -> int:
    """The tag of message ``seq`` of ``step`` in ``pipeline`` (a non-negative int32)."""
    if not STAMP_SEQ <= seq <= EXCHANGE_SEQ:
        raise PipelineError(f"message number {seq} out of range (at most {MAX_SEQ} per step)")
    return (
        (pipeline % (1 << _PIPELINE_BITS)) << (_STEP_BITS + _SEQ_BITS)
        | (step % (1 << _STEP_BITS)) << _SEQ_BITS
        | (seq + 1)
    )


@dataclass(frozen=True)
class PipelineIdentity:
    """Who a pipeline is, as every one of its ranks knows it.

    Attributes:
        group: the process group's name (the same on all its ranks).
        ranks: global ranks of the process group, in group order.
        number: how many pipelines were built on this group before this one.
    """

    group: str
    ranks: tuple[int, ...]
    number: int

    @property
    def key(self) -> str:
        """Prefix of this pipeline's keys in the store."""
        return f"dualpipe/{self.group}/{'-'.join(map(str, self.ranks))}/{self.number}"


def disagreement(by_rank: Mapping[int, Mapping[str, Any]], what: str) -> str | None:
    """The first field on which the ranks' values differ, as an error message naming the
    field, the values and the ranks; None when they agree."""
    first = next(iter(by_rank.values()))
    for name in first:
        seen: dict[str, list[int]] = {}
        for rank, values in sorted(by_rank.items()):
            seen.setdefault(repr(values.get(name)), []).append(rank)
        if len(seen) > 1:
            parts = "; ".join(f"{value} on rank{'s' if len(rs) > 1 else ''} "
                              f"{', '.join(map(str, rs))}" for value, rs in seen.items())
            return f"{what}: the ranks disagree on {name}: {parts}"
    return None


def handshake(
    store: dist.Store,
    group: str,
    ranks: Sequence[int],
    pipeline_rank: int,
    config: Mapping[str, Any],
    timeout: float,
    votes: Mapping[str, bool] | None = None,
) -> tuple[PipelineIdentity, dict[str, bool]]:
    """Agree on the pipeline's identity and compare ``config`` across its ranks.

    Every rank of the group calls it once per pipeline it builds. Raises one clear
    :class:`PipelineError` on every rank when the configurations differ (naming the
    field, the values and the ranks) or when a rank does not build the pipeline
    within ``timeout`` seconds. ``votes`` may differ between ranks: the result says, per
    key, whether any rank voted for it (the same on every rank)."""
    base = PipelineIdentity(group, tuple(ranks), 0).key.rsplit("/", 1)[0]
    arrival = store.add(f"{base}/built", 1) - 1
    number = arrival // len(ranks)
    identity = PipelineIdentity(group, tuple(ranks), number)
    store.set(f"{identity.key}/config/{pipeline_rank}",
              base64.b64encode(pickle.dumps((dict(config), dict(votes or {})))).decode())
    keys = [f"{identity.key}/config/{r}" for r in range(len(ranks))]
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            raise PipelineError(
                f"pipeline rank(s) {missing} did not build pipeline {identity.key} within "
                f"{timeout:.1f} s (every rank of the group must build the same pipelines, "
                "in the same order)"
            )
        time.sleep(0.01)
    sent = [pickle.loads(base64.b64decode(store.get(k))) for k in keys]
    configs = [c for c, _ in sent]
    message = disagreement(dict(enumerate(configs)), f"pipeline construction ({identity.key})")
    if message is not None:
        raise PipelineError(message)
    tally: dict[str, bool] = {}
    for _, vote in sent:
        for key, value in vote.items():
            tally[key] = tally.get(key, False) or bool(value)
    return identity, tally


@dataclass(frozen=True)
class Stamp:
    """What the first message of a step from one rank to another states."""

    pipeline: int
    step: int
    num_chunks: int
    training: bool
    static_shapes: bool

    _MAGIC = 0x5D1A

    def encode(self, device: torch.device) -> torch.Tensor:
        """As a small int64 tensor."""
        words = [self._MAGIC] + [int(getattr(self, f.name)) for f in fields(self)]
        return torch.tensor(words, dtype=torch.int64, device=device)

    @classmethod
    def buffer(cls, device: torch.device) -> torch.Tensor:
        """A receive buffer for one stamp."""
        return torch.empty(1 + len(fields(cls)), dtype=torch.int64, device=device)

    def check(self, received: torch.Tensor, src: int, dst: int) -> None:
        """Raise naming the first field where the stamp from ``src`` differs from this
        rank's (``dst``)."""
        words = received.tolist()
        if words[0] != self._MAGIC:
            raise PipelineError(f"rank {dst} received a message that is not a step stamp "
                                f"from rank {src}: protocol violation")
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        theirs = {f.name: type(getattr(self, f.name))(w)
                  for f, w in zip(fields(self), words[1:], strict=True)}
        message = disagreement({src: theirs, dst: mine}, f"step {self.step}")
        if message is not None:
            raise PipelineError(message)
