"""A model of how the ranks of one step issue their operations (the rules of
:class:`dualpipe.runtime.mailbox.Mailbox`), run against NCCL's rule: every rank's
operations run strictly in the order it issued them, and an operation completes only
when its counterpart is first in the peer's queue too. No tensors, no threads: a
deterministic simulation that says whether the step runs to its end."""

from __future__ import annotations

from collections import deque

from dualpipe.runtime.plan import ExecutionPlan, Issue

__all__ = ["run_in_order"]


class _Rank:
    def __init__(self, plan: ExecutionPlan) -> None:
        self.plan = plan
        self.step = 0  # next step to run
        self.issued = 0  # operations of plan.ops issued
        self.due = 0
        self.ready: set[int] = set()  # sends whose action ran, not yet issued
        self.done: set[int] = set()  # completed operations
        self.stamps = {k for k, op in enumerate(plan.ops) if op.message is None}
        self.headers = {(op.message.src, op.message.stream, op.message.position): k
                        for k, op in enumerate(plan.ops)
                        if op.message is not None and op.message.header and not op.send}
        self.stamp_from = {plan.ops[k].peer: k for k in self.stamps if not plan.ops[k].send}
        self.ready.update(k for k in self.stamps if plan.ops[k].send)

    def can_issue(self, k: int, block: bool, upto: int) -> bool:
        """Whether operation ``k`` (next in order) can be issued now."""
        op = self.plan.ops[k]
        if op.send:
            return k in self.ready
        if k >= upto and not self.ready:
            return False
        msg = op.message
        if msg is None:
            return True
        if self.stamp_from[op.peer] not in self.done:
            return False  # waits for the stamp (blocking or not)
        header = self.headers.get((msg.src, msg.stream, msg.position))
        return not (header is not None and header != k and not msg.grad
                    and header not in self.done)


def run_in_order(plans: list[ExecutionPlan], per: str = "rank") -> tuple[bool, list[str]]:
    """Run one step of ``plans`` (one per rank) in the model; returns (finished, the first
    waiting operation of every rank when it got stuck). ``per="rank"``: one queue per
    rank (strictest); ``"peer"``: one queue per pair of ranks."""
    ranks = [_Rank(p) for p in plans]
    queues: dict[tuple[int, int], deque[tuple[int, int]]] = {}

    def key(rank: int, peer: int) -> tuple[int, int]:
        return (rank, peer if per == "peer" else -1)

    def issue(r: _Rank, upto: int, block: bool) -> bool:
        moved = False
        while r.issued < len(r.plan.ops) and r.can_issue(r.issued, block, upto):
            op: Issue = r.plan.ops[r.issued]
            queues.setdefault(key(r.plan.rank, op.peer), deque()).append((r.plan.rank,
                                                                            r.issued))
            r.ready.discard(r.issued)
            r.issued += 1
            moved = True
        return moved

    progress = True
    while progress:
        progress = False
        for r in ranks:
            # run steps while their inputs are in (issuing what they need first)
            while r.step < len(r.plan.steps):
                step = r.plan.steps[r.step]
                r.due = max(r.due, step.due)
                progress |= issue(r, r.due, False)
                need = [r.plan.index[m] for a in step.actions for m in a.recvs]
                if need:
                    progress |= issue(r, max(need) + 1, True)
                if not all(k in r.done for k in need):
                    break
                for a in step.actions:
                    r.ready.update(r.plan.index[m] for m in a.sends)
                r.step += 1
                progress = True
                issue(r, r.due, False)
            if r.step == len(r.plan.steps):
                progress |= issue(r, len(r.plan.ops), True)
        # complete the queue heads that face each other
        moved = True
        while moved:
            moved = False
            for q in queues.values():
                if not q:
                    continue
                rank, k = q[0]
                op = ranks[rank].plan.ops[k]
                other = queues.get(key(op.peer, rank))
                if not other:
                    continue
                prank, pk = other[0]
                pop = ranks[prank].plan.ops[pk]
                if pop.peer != rank or pop.send == op.send:
                    continue
                assert pop.message == op.message, f"NCCL would pair {op} with {pop}"
                q.popleft()
                other.popleft()
                ranks[rank].done.add(k)
                ranks[prank].done.add(pk)
                moved = progress = True
    finished = all(r.step == len(r.plan.steps) and len(r.done) == len(r.plan.ops)
                   for r in ranks)
    heads = [f"rank {rank}: {ranks[rank].plan.ops[k]}" for q in queues.values() if q
             for rank, k in [q[0]]]
    return finished, heads
