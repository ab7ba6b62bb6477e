"""Stages written as parts: ``parts(*inputs)`` is a generator whose code between two
``yield``\\ s is a computation part and whose each ``yield`` is a communication part."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from torch import Tensor, nn

from .asynccomm import CommCall, run_synchronously

__all__ = ["PartedStage", "split_yield", "reply"]

PartsGenerator = Generator[Any, Any, Any]


def _parts_unimplemented(self: nn.Module, *inputs: Any) -> PartsGenerator:
    raise NotImplementedError(f"{type(self).__name__} must define parts(*inputs)")


class PartedStage(nn.Module):
    """A pipeline stage written as an ordered sequence of computation and communication
    parts, so the runtime can interleave two micro-batches' parts.

    Write :meth:`parts` like an ordinary ``forward``, and ``yield`` each communication::

        class MoEBlock(PartedStage):
            def parts(self, x):
                h = x + self.attn(x)                     # computation part 0
                recv, h = yield self.dispatch(self.gate(h)), h
                y = self.experts(recv)                   # computation part 1
                back, h = yield self.combine(y), h
                return h + back                          # computation part 2

    ``yield op(t)`` hands back ``op``'s result (a tensor, or a tuple when it has
    several); ``yield op(t), a, b`` hands back ``(result, a, b)``: tensors that skip the
    communication (a residual) are *carried* and come back as fresh autograd leaves, so
    every part is its own autograd graph and its backward is its own call. Use only what
    comes back from a ``yield`` after it (a tensor kept across a ``yield`` without
    carrying it would tie two parts' graphs together: its gradient would be lost).
    Non-tensor values may be carried too (they come back unchanged).

    Calling the module (``stage(x)``) runs the parts in order with each communication
    as an ordinary blocking autograd operation: the same numbers as the pipeline's
    part-by-part execution, usable anywhere a module is. Every rank of a
    communication's group must run the same parts in the same order.
    """

    # declared like nn.Module.forward, so subclasses may name their own arguments
    parts: Callable[..., PartsGenerator] = _parts_unimplemented
    """The stage's computation, with ``yield`` at each communication."""

    def forward(self, *inputs: Any) -> Any:
        gen = self.parts(*inputs)
        if not isinstance(gen, Generator):
            raise TypeError(f"{type(self).__name__}.parts must be a generator (use yield)")
        value: Any = None
        started = False
        while True:
            try:
                yielded = gen.send(value) if started else next(gen)
            except StopIteration as stop:
                return stop.value
            started = True
            call, carried = split_yield(yielded, self)
            value = reply(yielded, run_synchronously(call), carried)


def split_yield(yielded: Any, stage: object) -> tuple[CommCall, tuple[Any, ...]]:
    """The communication call and the carried values of what ``parts`` yielded."""
    if isinstance(yielded, CommCall):
        return yielded, ()
    if isinstance(yielded, tuple) and yielded and isinstance(yielded[0], CommCall):
        return yielded[0], yielded[1:]
    raise TypeError(
        f"{type(stage).__name__}.parts must yield a communication call, op(x), or a tuple "
        f"(op(x), carried...); got {type(yielded).__name__}"
    )


def reply(yielded: Any, results: tuple[Tensor, ...], carried: tuple[Any, ...]) -> Any:
    """What a ``yield`` evaluates to: the result alone, or ``(*results, *carried)``."""
    if isinstance(yielded, CommCall):
        return results[0] if len(results) == 1 else results
    return (*results, *carried)
