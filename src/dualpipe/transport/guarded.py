"""Collectives of other process groups (data-parallel reductions, FSDP2's) waited for with
the job's failure check: a failure anywhere in the job ends the wait within about a
second, naming the failed rank, instead of at the group's timeout.

A rank that learns of the failure while such a collective is in flight gives up on it:
the collective stays posted in the process group (gloo's ``ProcessGroup.abort()`` does
not end a pending collective on CPU in torch 2.13), so that group must not be used again
— a peer's next collective on it would pair with the abandoned one. The group is then
recorded as abandoned (in this process and in the store), and the library's own
collectives refuse it on every rank: destroy it and build new process groups.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PipelineError, RemoteFailure, StepTimeout
from .base import BaseTransport

__all__ = [
    "ABANDONED",
    "GRACE",
    "REBUILD",
    "abandoned_reason",
    "all_reduce",
    "check_group",
    "polled_collectives",
    "wait_collective",
]

ABANDONED = "dualpipe/job/abandoned"
"""Store key prefix: ``ABANDONED/<group name>`` says why a rank left a collective of that
process group in flight (the group cannot be used again)."""

REBUILD = ("that group cannot be used again (a peer's next collective on it would pair with "
           "the abandoned one): destroy it and build new process groups before training on")
"""What every error about an abandoned collective tells the user to do."""

_abandoned: dict[str, tuple[dist.ProcessGroup, str]] = {}  # name -> (group, why): this process
_lock = threading.Lock()


def _pg(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.distributed_c10d._get_default_group()


def _describe(group: dist.ProcessGroup | None) -> str:
    """``process group <name> (processes [...])``."""
    pg = _pg(group)
    try:
        ranks = dist.get_process_group_ranks(pg)
    except Exception:  # noqa: BLE001 - a destroyed group: its name is enough
        ranks = []
    return f"process group {pg.group_name} (processes {ranks})"


def _store(transport: BaseTransport) -> dist.Store | None:
    store: dist.Store | None = getattr(transport, "store", None)
    return store


def abandoned_reason(group: dist.ProcessGroup | None,
                     transport: BaseTransport | None = None) -> str | None:
    """Why some rank left a collective of ``group`` in flight (this process's record, else
    the store's when ``transport`` has one), or None if none did."""
    pg = _pg(group)
    name = pg.group_name
    with _lock:
        mine = _abandoned.get(name)
    # (a group of that name built after a new init_process_group is another group)
    why = mine[1] if mine is not None and mine[0] is pg else None
    store = _store(transport) if transport is not None else None
    if why is None and store is not None:
        key = f"{ABANDONED}/{name}"
        try:
            if store.check([key]):
                why = store.get(key).decode()
        except Exception:  # noqa: BLE001 - no store: this process's record only
            why = None
        if why is not None:
            with _lock:
                _abandoned[name] = (pg, why)
    return why


def check_group(group: dist.ProcessGroup | None, transport: BaseTransport | None = None
                ) -> None:
    """Raise :class:`PipelineError` if a rank left a collective of ``group`` in flight
    (:func:`abandoned_reason`): using it would pair collectives wrongly."""
    why = abandoned_reason(group, transport)
    if why is not None:
        raise PipelineError(f"{_describe(group)} was left with a collective in flight "
                            f"({why}); {REBUILD}")


def _record(pg: dist.ProcessGroup, why: str) -> None:
    """Remember (in this process) that ``pg`` cannot be used again; the first reason stays.
    The group is held, so no later group takes its identity."""
    with _lock:
        mine = _abandoned.get(pg.group_name)
        if mine is None or mine[0] is not pg:
            _abandoned[pg.group_name] = (pg, why)


def _abandon(group: dist.ProcessGroup | None, transport: BaseTransport, what: str,
             cause: str) -> str:
    """Record that this rank leaves ``what`` (on ``group``) in flight; the message to raise."""
    pg = _pg(group)
    why = f"process {dist.get_rank()} gave up {what} after: {cause}"
    _record(pg, why)
    store = _store(transport)
    if store is not None:
        with contextlib.suppress(Exception):  # best effort: the job is failing
            store.compare_set(f"{ABANDONED}/{pg.group_name}", "", why)
    return (f"{cause} [this rank was waiting in {what} on {_describe(group)}, which it "
            f"left in flight: {REBUILD}]")


GRACE = 0.3
"""Seconds a collective may still take to complete once a failure of the job is known
(the ranks that are alive may all have issued it: then nothing is left in flight)."""


def _timeout(group: dist.ProcessGroup | None, transport: BaseTransport) -> float:
    """The group's own timeout in seconds (its backend's), else the pipeline's."""
    pg = _pg(group)
    try:
        device = transport.device if transport.device.type != "cpu" else torch.device("cpu")
        seconds = pg._get_backend(device).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - a backend without options: the pipeline's timeout
        return float(transport.timeout)
    return float(seconds)


def wait_collective(
    work: dist.Work,
    transport: BaseTransport,
    what: str,
    group: dist.ProcessGroup | None,
    *,
    post: bool = False,
) -> None:
    """Complete ``work`` (a collective issued with ``async_op=True`` whose result the host
    needs) while checking ``transport`` for failures of the job (its cheap check: the
    failure watch's finding, or the store at most every 0.2 s).

    The work must report completion by itself (``is_completed()``: NCCL's, gloo's
    all-reduce and all-gather; not gloo's reduce-scatter, which completes only inside
    ``wait()``). On a failure of the job: :class:`RemoteFailure` with its message (the
    failed process, pipeline rank and action) — once the collective completed (within
    :data:`GRACE` seconds: the group is fine), else after that grace, and the group is
    then recorded as abandoned.
    A collective that fails by itself — the group's own timeout expired (as before: the
    wait is not shortened for a replica that is only slow), or a peer process died —:
    :class:`PipelineError` naming it and the group, posted to the job when ``post`` (so
    the other ranks fail at once too). Should the backend not report that, a
    :class:`StepTimeout` a few seconds after the group's timeout ends the wait."""
    deadline = time.monotonic() + _timeout(group, transport) + 5.0
    nap = 2e-5
    failure: RemoteFailure | None = None
    given_up = 0.0  # when the grace after a failure ends
    while not work.is_completed():
        now = time.monotonic()
        if failure is None:
            try:
                transport.check_error()
            except RemoteFailure as exc:
                failure, given_up = exc, now + GRACE
        if failure is not None and now > given_up:
            raise RemoteFailure(_abandon(group, transport, what, str(failure)),
                                failure.failure) from None
        if now > deadline:
            message = (f"process {dist.get_rank()} timed out after "
                       f"{_timeout(group, transport) + 5.0:.1f} s waiting for {what} on "
                       f"{_describe(group)}")
            if post:
                transport.post_error(message)
            raise StepTimeout(_abandon(group, transport, what, message))
        time.sleep(nap)
        nap = min(nap * 2, 1e-3)
    try:
        work.wait()  # at once: completed; raises what the collective hit
    except Exception as exc:  # noqa: BLE001 - reported below
        message = (f"process {dist.get_rank()}: {what} failed on {_describe(group)}: "
                   f"{type(exc).__name__}: {exc}")
        _record(_pg(group), message)  # gloo closed the group's connections: broken
        try:
            transport.check_error(fresh=True)  # a posted failure explains it: that first
        except RemoteFailure as known:
            raise RemoteFailure(f"{known} [{message}; {REBUILD}]", known.failure) from exc
        if post:
            transport.post_error(message)
        raise PipelineError(f"{message}; {REBUILD}") from exc
    if failure is not None:  # completed by every rank: the group is fine, the job is not
        raise failure


def _pipeline_error(transport: BaseTransport) -> str | None:
    """The failure posted in ``transport``'s own pipeline (by this rank or another of its
    ranks), if any: its gradients are then partial and must not be contributed."""
    mine: str | None = getattr(transport, "_own_error", None)
    store = _store(transport)
    key = getattr(transport, "key", None)
    if mine is not None or store is None or key is None:
        return mine
    try:
        return store.get(f"{key}/error").decode() if store.check([f"{key}/error"]) else None
    except Exception:  # noqa: BLE001 - no store: the failure watch's finding decides
        return None


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None,
    transport: BaseTransport,
    what: str,
    *,
    op: Any = None,
    host: bool = True,
    post: bool = False,
    checked: bool = False,
) -> None:
    """``dist.all_reduce(tensor, op, group)``, in place, waited for with the job's failure
    check (:func:`wait_collective`). A failure of this rank's own pipeline raises before
    anything is issued (its values are partial), and so does a group some rank left a
    collective in flight on (``checked``: the caller looked in the store already; this
    process's record is still read). A failure of another pipeline does not: the
    all-reduce is issued, so that the ranks that are alive complete it together and leave
    the group usable, and the failure is raised after (:data:`GRACE`).

    On a device backend with ``host=False`` the collective is left to the stream (the
    host does not wait, as ``dist.all_reduce`` does); a CPU tensor's collective (gloo)
    always blocks the host, so it is always waited for this way."""
    own = _pipeline_error(transport)
    if own is not None:
        raise RemoteFailure(own)
    check_group(group, None if checked else transport)
    op = dist.ReduceOp.SUM if op is None else op
    if tensor.device.type != "cpu" and not host:
        dist.all_reduce(tensor, op=op, group=group)
        return
    work = dist.all_reduce(tensor, op=op, group=group, async_op=True)
    assert work is not None
    wait_collective(work, transport, what, group, post=post)


# ---------------------------------------------------------------- collectives inside FSDP2
_active: dict[int, list[tuple[BaseTransport, str]]] = {}  # thread id -> (transport, what)
_saved: dict[str, Any] = {}  # the ProcessGroup methods replaced while a thread is inside


class _PolledWork(dist.Work):
    """A collective issued inside :func:`polled_collectives`: ``wait()`` (which
    ``torch.distributed`` calls for a blocking collective, and FSDP2 for a prefetched
    all-gather) waits with the job's failure check, then runs ``then`` (if any)."""

    def __init__(self, work: dist.Work, transport: BaseTransport, what: str,
                 group: dist.ProcessGroup, then: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.work = work
        self.transport = transport
        self.what = what
        self.group = group
        self.then = then
        self.done = False

    def wait(self, timeout: Any = None) -> bool:
        if not self.done:
            wait_collective(self.work, self.transport, self.what, self.group)
            self.done = True
            if self.then is not None:
                self.then()
                self.then = None
        return True

    def is_completed(self) -> bool:
        return self.done or bool(self.work.is_completed())


def _inside(tensors: list[Any]) -> tuple[BaseTransport, str] | None:
    """The calling thread's innermost :func:`polled_collectives`, if it is inside one and
    ``tensors`` are CPU tensors (a device backend's collectives are left to its streams)."""
    stack = _active.get(threading.get_ident())
    if not stack or not all(isinstance(t, torch.Tensor) and t.device.type == "cpu"
                            for t in tensors):
        return None
    return stack[-1]


def _issue(pg: dist.ProcessGroup, transport: BaseTransport) -> None:
    """Before a collective: a known failure, or a group left with one in flight, raises."""
    transport.check_error()
    check_group(pg)


def _replacements(originals: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """The ``ProcessGroup`` methods FSDP2's collectives reach (through ``dist.all_reduce``,
    ``dist.all_gather_single`` and ``dist.reduce_scatter_single``, which wait for the work
    they return unless asked for ``async_op``), as installed while a thread is inside
    :func:`polled_collectives`; each calls ``originals`` (captured: a call from another
    thread may arrive while the last thread leaves)."""
    allreduce = originals["allreduce"]

    def all_reduce_method(pg: dist.ProcessGroup, *args: Any, **kwargs: Any) -> Any:
        inside = _inside(args[0]) if len(args) == 2 and isinstance(args[0], list) and \
            isinstance(args[1], dist.AllreduceOptions) and not kwargs else None
        if inside is None:
            return allreduce(pg, *args, **kwargs)
        transport, what = inside
        what = f"{what} (all-reduce)"
        _issue(pg, transport)
        return _PolledWork(allreduce(pg, *args), transport, what, pg)

    out: dict[str, Callable[..., Any]] = {"allreduce": all_reduce_method}
    gather = originals.get("all_gather_single")
    if gather is not None:
        def all_gather_method(pg: dist.ProcessGroup, *args: Any, **kwargs: Any) -> Any:
            inside = _inside(list(args[:2])) if len(args) == 3 and not kwargs else None
            if inside is None:
                return gather(pg, *args, **kwargs)
            transport, what = inside
            what = f"{what} (all-gather)"
            _issue(pg, transport)
            return _PolledWork(gather(pg, *args), transport, what, pg)

        out["all_gather_single"] = all_gather_method
    scatter = originals.get("reduce_scatter_single")
    if scatter is not None:
        def reduce_scatter_method(pg: dist.ProcessGroup, *args: Any, **kwargs: Any) -> Any:
            """gloo's reduce-scatter reports completion only inside ``wait()``, where
            nothing could check for failures: it runs as an all-reduce of a copy of the
            input (which reports completion) and the copy of this rank's part into the
            output — the same values bit for bit (gloo reduce-scatters that way)."""
            inside = None
            if len(args) == 3 and not kwargs and isinstance(args[2], dist.ReduceScatterOptions):
                output, inp, _ = args
                if output.numel() * pg.size() == inp.numel() and inp.is_contiguous():
                    inside = _inside([output, inp])
            if inside is None:
                return scatter(pg, *args, **kwargs)
            transport, what = inside
            what = f"{what} (reduce-scatter)"
            _issue(pg, transport)
            output, inp, opts = args
            full = inp.detach().clone()
            all_opts = dist.AllreduceOptions()
            all_opts.reduceOp = opts.reduceOp
            all_opts.timeout = opts.timeout
            work = allreduce(pg, [full], all_opts)
            part = full.view(pg.size(), -1)[pg.rank()].view_as(output)

            def copy_out() -> None:
                with torch.no_grad():
                    output.copy_(part)

            return _PolledWork(work, transport, what, pg, then=copy_out)

        out["reduce_scatter_single"] = reduce_scatter_method
    return out


_METHODS = ("allreduce", "all_gather_single", "reduce_scatter_single")
"""The ``ProcessGroup`` methods replaced while a thread is inside (those that exist)."""


@contextlib.contextmanager
def polled_collectives(transport: BaseTransport, what: str) -> Iterator[None]:
    """While the calling thread is inside, the all-reduces, all-gathers and reduce-scatters
    it issues on CPU tensors through ``torch.distributed`` (FSDP2's, on gloo) return
    works whose ``wait()`` checks ``transport`` for failures of the job
    (:func:`wait_collective`): a failure posted anywhere in the job ends a collective
    that waits for a replica that will never join it. Other threads and device tensors
    are untouched; nesting names the innermost ``what``."""
    me = threading.get_ident()
    with _lock:
        if not _active:
            _saved.update({name: getattr(dist.ProcessGroup, name) for name in _METHODS
                           if hasattr(dist.ProcessGroup, name)})
            for name, replacement in _replacements(_saved).items():
                setattr(dist.ProcessGroup, name, replacement)
        _active.setdefault(me, []).append((transport, what))
    try:
        yield
    finally:
        with _lock:
            stack = _active.get(me, [])
            if stack:
                stack.pop()
            if not stack:
                _active.pop(me, None)
            if not _active:
                for name, original in _saved.items():
                    setattr(dist.ProcessGroup, name, original)
                _saved.clear()
