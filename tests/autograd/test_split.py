"""Split backward: backward_input + WeightGradWork.run() and backward_full reproduce a plain
single-process backward exactly, and the weight-gradient work is really deferred (done once,
in run(), and not repeated)."""

from __future__ import annotations

import copy
import gc
import random
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from dualpipe.autograd import WeightGradWork, backward_full, backward_input, defer_weight_grad

# ----------------------------------------------------------------------------- stages


class Twice(nn.Module):
    """One weight used twice on the input chain: h = x @ W; y = tanh(h) @ W."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) @ self.w


class LinearTwice(nn.Module):
    """One Linear (weight and bias) applied twice."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.lin(F.gelu(self.lin(x))))


class InputSideMultiOutput(nn.Module):
    """chunk / split / unbind between the input and the weights."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d // 2, d)
        self.b = nn.Linear(d // 2, d)
        self.c = nn.Linear(3, d)
        self.d = nn.Linear(d - 3, d)
        self.e = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        u, v = x.chunk(2, dim=-1)
        p, q = x.split([3, x.shape[-1] - 3], dim=-1)
        rows = [self.e(r) for r in x.unbind(0)]
        return self.a(u) * self.b(v) + self.c(p) - self.d(q).sin() + torch.stack(rows)


class WeightChunkParallel(nn.Module):
    """Weight-side multi-output node shared by two independent uses: w1, w2 = W.chunk(2)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * d, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(2 * d) / 10)

    def forward(self, x: Tensor) -> Tensor:
        w1, w2 = self.w.chunk(2)
        b1, b2 = self.b.unbind(0)[0], self.b.split([1, 2 * x.shape[-1] - 1])[1]
        return (x @ w1.t() + b1) * (x @ w2.t()) + b2.sum()


class WeightChunkSequential(nn.Module):
    """Weight-side multi-output node whose parts are used one after the other."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * d, d) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        w1, w2 = self.w.chunk(2)
        return torch.relu(x @ w1.t()) @ w2


class ParamFree(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2 + x.sin()


class EmbeddingStage(nn.Module):
    """First stage: integer token ids, no input gradient."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lin(F.gelu(self.emb(ids)))


class TwoInTwoOut(nn.Module):
    """Two inputs (the second needs no grad), two outputs (the second has no parameters)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm(self.lin(x) * mask), x.cos() + mask


class ParamOnlyOutput(nn.Module):
    """A second output that depends only on parameters (an auxiliary loss, say)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.lin(x) * self.scale, (self.lin.weight * self.scale).pow(2).sum(0)


class Attention(nn.Module):
    """A hand-written pre-norm transformer block."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Experts(nn.Module):
    """A tiny MoE layer: experts are parallel branches of the graph."""

    def __init__(self, d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, n)
        self.up = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(n))
        self.down = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        weight, choice = self.router(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e, (up, down) in enumerate(zip(self.up, self.down, strict=True)):
            idx = (choice == e).nonzero().squeeze(1)
            y = down(F.gelu(up(x.index_select(0, idx)))) * weight.index_select(0, idx)[:, None]
            out = out.index_add(0, idx, y)
        return x + out


class LossStage(nn.Module):
    """Last stage: returns a scalar loss (its grad_output is None: implicit ones)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.head = nn.Linear(d, 5)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.head(F.relu(x)), target)


class LinearFn(torch.autograd.Function):
    """A custom Function computing its weight gradient in backward, the ordinary way."""

    calls = 0

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        LinearFn.calls += 1
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class DeferredLinearFn(torch.autograd.Function):
    """A custom Function deferring its weight gradient explicitly (DualPipe-style)."""

    calls = 0

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        DeferredLinearFn.calls += 1
        x, w = ctx.saved_tensors

        def weight_grad() -> None:
            gw = g.t() @ x
            w.grad = gw if w.grad is None else w.grad + gw

        defer_weight_grad(weight_grad)
        return g @ w, None


class CustomStage(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function], d: int = 8) -> None:
        super().__init__()
        self.fn = fn
        self.w1 = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.lin = nn.Linear(d, d)
        self.w2 = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fn.apply(self.lin(x), self.w1)
        return self.fn.apply(F.gelu(h), self.w2)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], list[Tensor]]


def _x(*shape: int, grad: bool = True) -> Callable[[], list[Tensor]]:
    return lambda: [torch.randn(*shape, requires_grad=grad)]


CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.0), nn.Linear(16, 8)
        ),
        _x(4, 8),
    ),
    Case(
        "mlp_3d",
        lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)),
        _x(2, 3, 8),
    ),
    Case("weight_twice", Twice, _x(4, 8)),
    Case("linear_twice", LinearTwice, _x(4, 8)),
    Case("input_side_multi_output", InputSideMultiOutput, _x(4, 8)),
    Case("weight_chunk_parallel", WeightChunkParallel, _x(4, 8)),
    Case("weight_chunk_sequential", WeightChunkSequential, _x(4, 8)),
    Case("param_free", ParamFree, _x(4, 8)),
    Case("embedding_ids", EmbeddingStage, lambda: [torch.randint(0, 11, (4, 5))]),
    Case(
        "float_input_no_grad",
        lambda: nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)),
        _x(4, 8, grad=False),
    ),
    Case(
        "two_in_two_out",
        TwoInTwoOut,
        lambda: [torch.randn(4, 8, requires_grad=True), torch.rand(4, 8)],
    ),
    Case("param_only_output", ParamOnlyOutput, _x(4, 8)),
    Case(
        "transformer_layer",
        lambda: nn.TransformerEncoderLayer(
            16, 4, 32, dropout=0.0, batch_first=True, norm_first=True
        ),
        _x(2, 5, 16),
    ),
    Case("attention_block", Attention, _x(2, 5, 16)),
    Case(
        "conv1d",
        lambda: nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 4, 3), nn.Flatten()
        ),
        _x(2, 4, 10),
    ),
    Case("experts", Experts, _x(16, 8)),
    Case("loss", LossStage, lambda: [torch.randn(6, 8, requires_grad=True), torch.arange(6) % 5]),
    Case("custom_function", lambda: CustomStage(LinearFn), _x(4, 8)),
    Case("custom_function_deferred", lambda: CustomStage(DeferredLinearFn), _x(4, 8)),
]

# ----------------------------------------------------------------------------- harness


def _leaves(raw: list[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(t.requires_grad) for t in raw]


def _tuple(out: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _grad_outputs(outs: list[Tensor], seed: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(o.shape, generator=gen) if o.requires_grad and o.numel() > 1 else None
        for o in outs
    ]


def _reference(
    module: nn.Module, raw: list[Tensor], seed: int
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Plain autograd: outputs.backward(grads); returns (grad_outputs, input grads)."""
    leaves = _leaves(raw)
    outs = _tuple(module(*leaves))
    grads = _grad_outputs(outs, seed)
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return grads, [t.grad for t in leaves]


def _assert_same(actual: list[Tensor | None], expected: list[Tensor | None], exact: bool) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a is not None
            if exact:
                assert_close(a, e, rtol=0, atol=0)
            else:
                assert_close(a, e, rtol=1e-6, atol=1e-6)


def _param_grads(module: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def _split(module: nn.Module, raw: list[Tensor], grads: list[Tensor | None]) -> list[Tensor | None]:
    leaves = _leaves(raw)
    outs = _tuple(module(*leaves))
    in_grads, work = backward_input(outs, grads, leaves)
    assert isinstance(work, WeightGradWork)
    assert all(t.grad is None for t in leaves)
    # The weight work really is deferred: no parameter gradient exists yet.
    assert all(p.grad is None for p in module.parameters())
    work.run()
    assert all(t.grad is None for t in leaves)
    return in_grads


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_split_and_full_match_plain_backward(case: Case) -> None:
    torch.manual_seed(0)
    ref = case.make()
    split, full = copy.deepcopy(ref), copy.deepcopy(ref)
    raw = case.inputs()
    grads, ref_in = _reference(ref, raw, seed=1)
    assert any(g is not None for g in _param_grads(ref)) or not list(ref.parameters())

    # Bitwise equal: every kernel sees the same operands as in the plain backward.
    _assert_same(_split(split, raw, grads), ref_in, exact=True)
    _assert_same(_param_grads(split), _param_grads(ref), exact=True)

    leaves = _leaves(raw)
    got = backward_full(_tuple(full(*leaves)), grads, leaves)
    assert all(t.grad is None for t in leaves)
    _assert_same(got, ref_in, exact=True)
    _assert_same(_param_grads(full), _param_grads(ref), exact=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_two_micro_batches_accumulate_like_two_backwards(case: Case) -> None:
    torch.manual_seed(0)
    ref = case.make()
    split = copy.deepcopy(ref)
    raw1, raw2 = case.inputs(), case.inputs()
    grads1, ref_in1 = _reference(ref, raw1, seed=1)
    grads2, ref_in2 = _reference(ref, raw2, seed=2)

    # Interleaved as a zero-bubble schedule would: B1, B2, W1, W2.
    leaves1, leaves2 = _leaves(raw1), _leaves(raw2)
    in1, work1 = backward_input(_tuple(split(*leaves1)), grads1, leaves1)
    in2, work2 = backward_input(_tuple(split(*leaves2)), grads2, leaves2)
    work1.run()
    work2.run()
    _assert_same(in1, ref_in1, exact=True)
    _assert_same(in2, ref_in2, exact=True)
    _assert_same(_param_grads(split), _param_grads(ref), exact=True)


def test_backward_full_accumulates_like_two_backwards() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    full = copy.deepcopy(ref)
    for seed in (1, 2):
        raw = [torch.randn(3, 8, requires_grad=True)]
        grads, ref_in = _reference(ref, raw, seed)
        leaves = _leaves(raw)
        _assert_same(backward_full([full(*leaves)], grads, leaves), ref_in, exact=True)
    _assert_same(_param_grads(full), _param_grads(ref), exact=True)


# ----------------------------------------------------------------------------- deferral


class OpLog(TorchDispatchMode):
    """Records (op name, output shape) of every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "native_layer_norm_backward":
            # A fused kernel: record which of (input, weight, bias) grads it computed.
            shape = tuple(int(m) for m in args[-1])
        else:
            shape = tuple(out.shape) if isinstance(out, Tensor) else ()
        self.ops.append((name, shape))
        return out

    def compute(self) -> Counter[tuple[str, tuple[int, ...]]]:
        skip = {"t", "view", "detach", "transpose", "_unsafe_view", "alias", "expand", "reshape"}
        return Counter(op for op in self.ops if op[0] not in skip)


def _mlp() -> nn.Sequential:
    # All widths and the batch differ, so every matmul has a recognisable output shape.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 11), nn.LayerNorm(11), nn.Linear(11, 13)
    )


def test_input_pass_does_no_weight_work_and_run_does_not_repeat_input_work() -> None:
    ref = _mlp()
    split = copy.deepcopy(ref)
    x = torch.randn(3, 5)
    g = torch.randn(3, 13)
    weight_shapes = {tuple(p.shape) for p in split.parameters()}
    weight_shapes |= {s[::-1] for s in weight_shapes}

    accumulated: list[str] = []
    for name, p in split.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: accumulated.append(name))

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    with OpLog() as plain:
        yr.backward(g)

    xs = x.clone().requires_grad_()
    ys = split(xs)
    with OpLog() as first:
        (gx,), work = backward_input([ys], [g], [xs])
    assert accumulated == []
    assert all(p.grad is None for p in split.parameters())
    mm_shapes = [s for op, s in first.ops if op in ("mm", "addmm", "bmm")]
    assert mm_shapes == [(3, 11), (3, 7), (3, 5)]  # input gradients only
    assert not any(s in weight_shapes for _, s in first.compute())
    assert work.num_engine_calls == 4  # three Linear and one LayerNorm frontier node

    with OpLog() as second:
        work.run()
    assert sorted(accumulated) == sorted(n for n, _ in split.named_parameters())
    # The same kernels as one plain backward, none repeated. The one exception is the fused
    # LayerNorm backward, launched once per pass with complementary output masks.
    ln = "native_layer_norm_backward"
    assert (ln, (1, 0, 0)) in first.ops and (ln, (0, 1, 1)) in second.ops
    assert (ln, (1, 1, 1)) in plain.ops
    total = first.compute() + second.compute()
    del total[(ln, (1, 0, 0))], total[(ln, (0, 1, 1))]
    expected = plain.compute()
    del expected[(ln, (1, 1, 1))]
    assert total == expected
    assert_close(gx, xr.grad, rtol=0, atol=0)
    _assert_same(_param_grads(split), _param_grads(ref), exact=True)


def test_parallel_branches_share_deferred_engine_calls() -> None:
    torch.manual_seed(0)
    stage = Experts()
    x = torch.randn(16, 8, requires_grad=True)
    out = stage(x)
    assert len({int(e) for e in stage.router(x).argmax(-1)}) == 4  # every expert is used
    _, work = backward_input([out], [torch.randn(16, 8)], [x])
    # Not one engine call per Linear (9): one for the `down` experts, one for the `up`
    # experts together with the router (none of them reaches another).
    assert work.num_engine_calls == 2
    work.run()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    split = copy.deepcopy(ref)
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    xr = x.clone().requires_grad_()
    checkpoint(ref, xr, use_reentrant=reentrant).backward(g)
    xs = x.clone().requires_grad_()
    (gx,), work = backward_input([checkpoint(split, xs, use_reentrant=reentrant)], [g], [xs])
    # Non-reentrant checkpointing is plain autograd and splits; the reentrant kind computes
    # its parameter gradients inside its own backward, so it gets a plain backward.
    assert all((p.grad is None) != reentrant for p in split.parameters())
    work.run()
    assert xs.grad is None
    assert_close(gx, xr.grad, rtol=0, atol=0)
    _assert_same(_param_grads(split), _param_grads(ref), exact=True)


def test_no_input_requiring_grad_runs_the_activation_side_now() -> None:
    """A first stage (integer ids, no input gradient): the input backward runs the
    activation side down to where it ends (the linear layer's input gradient, the GELU's
    backward) and stops at the embedding, so W holds only what the weight side reads;
    no parameter gradient is computed before ``run``, and the result is exact."""
    torch.manual_seed(0)
    stage = EmbeddingStage()
    ref = copy.deepcopy(stage)
    ids = torch.randint(0, 11, (4, 5))
    out = stage(ids)
    grad = torch.randn_like(out)
    ref(ids).backward(grad)
    with OpLog() as log:
        grads, work = backward_input([out], [grad], [ids])
    assert grads == [None]
    ops = log.compute()
    assert ops[("gelu_backward", (4, 5, 8))] == 1  # the activation side ran now
    assert not any("embedding" in name for name, _ in ops)  # the weight side did not
    assert all(p.grad is None for p in stage.parameters())
    with OpLog() as log:
        work.run()
    assert not any("gelu" in name for name, _ in log.compute())  # nothing ran twice
    _assert_same(_param_grads(stage), _param_grads(ref), exact=True)


def test_first_stage_whose_activation_side_is_its_output_defers_everything() -> None:
    """A first stage that is one linear layer of its (gradient-free) input: nothing to run
    before the weight gradients, so the input backward computes nothing."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    out = lin(x)
    grad = torch.ones_like(out)
    with OpLog() as log:
        grads, work = backward_input([out], [grad], [x])
    assert grads == [None] and log.ops == []
    work.run()
    assert all(p.grad is not None for p in lin.parameters())


def test_run_twice_raises() -> None:
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    _, work = backward_input([lin(x)], [torch.ones(2, 4)], [x])
    assert not work.done
    work.run()
    assert work.done
    grad = lin.weight.grad.clone()
    with pytest.raises(RuntimeError, match="already"):
        work.run()
    assert_close(lin.weight.grad, grad, rtol=0, atol=0)


def test_custom_function_backward_runs_once() -> None:
    for fn in (LinearFn, DeferredLinearFn):
        torch.manual_seed(0)
        ref = CustomStage(fn)
        split = copy.deepcopy(ref)
        x = torch.randn(4, 8)
        fn.calls = 0
        ref(x.clone().requires_grad_()).sum().backward()
        assert fn.calls == 2
        xs = x.clone().requires_grad_()
        _, work = backward_input([split(xs).sum()], [None], [xs])
        assert fn.calls == 4
        assert split.w1.grad is None and split.w2.grad is None
        work.run()
        assert fn.calls == 4
        _assert_same(_param_grads(split), _param_grads(ref), exact=True)


def test_defer_weight_grad_is_immediate_outside_backward_input() -> None:
    ran: list[int] = []
    defer_weight_grad(lambda: ran.append(1))
    assert ran == [1]
    with pytest.raises(TypeError):
        defer_weight_grad(42)  # type: ignore[arg-type]

    torch.manual_seed(0)
    stage = CustomStage(DeferredLinearFn)
    stage(torch.randn(4, 8)).sum().backward()  # plain autograd
    assert stage.w1.grad is not None and stage.w2.grad is not None

    stage.zero_grad(set_to_none=True)
    x = torch.randn(4, 8, requires_grad=True)
    backward_full([stage(x).sum()], [None], [x])
    assert stage.w1.grad is not None and stage.w2.grad is not None


class ThreadedDeferFn(torch.autograd.Function):
    """Calls defer_weight_grad from another thread, as the CUDA engine's device threads do."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        return x * w

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors

        def weight_grad() -> None:
            w.grad = g.sum(0)

        t = threading.Thread(target=defer_weight_grad, args=(weight_grad,))
        t.start()
        t.join()
        return g * w, None


def test_defer_weight_grad_from_another_thread_is_queued() -> None:
    w = nn.Parameter(torch.randn(3))
    x = torch.randn(2, 3, requires_grad=True)
    (gx,), work = backward_input([ThreadedDeferFn.apply(x, w)], [torch.ones(2, 3)], [x])
    assert_close(gx, w.detach().expand(2, 3), rtol=0, atol=0)
    assert w.grad is None
    work.run()
    assert_close(w.grad, torch.full((3,), 2.0), rtol=0, atol=0)


def test_hooks_are_applied_once() -> None:
    """Tensor hooks on parameters (including a weight used twice, captured in the input pass)
    and on intermediate activations are applied exactly once, as in a plain backward."""

    def build() -> tuple[nn.Module, list[int]]:
        torch.manual_seed(0)
        stage = LinearTwice()
        calls = [0]

        def count(g: Tensor) -> None:
            calls[0] += 1

        for p in stage.parameters():
            p.register_hook(lambda g: g * 3)
            p.register_post_accumulate_grad_hook(lambda _p: count(_p.grad))
        return stage, calls

    ref, ref_calls = build()
    split, split_calls = build()
    x = torch.randn(4, 8)
    g = torch.randn(4, 8)

    def forward(stage: nn.Module, x: Tensor) -> Tensor:
        h = stage.lin(x)
        h.register_hook(lambda g: g * 2)
        return stage.out(stage.lin(F.gelu(h)))

    xr = x.clone().requires_grad_()
    forward(ref, xr).backward(g)
    xs = x.clone().requires_grad_()
    (gx,), work = backward_input([forward(split, xs)], [g], [xs])
    assert split_calls == [0]
    work.run()
    assert split_calls == ref_calls
    assert_close(gx, xr.grad, rtol=0, atol=0)
    _assert_same(_param_grads(split), _param_grads(ref), exact=True)


def test_memory_is_released() -> None:
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    hidden = stage[0](x)  # saved by GELU only (input-side)
    activ = stage[1](hidden)  # saved by the second Linear (for its weight gradient)
    pre = stage[2](activ)
    out = pre.sin()  # above every frontier node: sin saves `pre`
    refs = [weakref.ref(t) for t in (hidden, activ, pre)]
    del hidden, activ, pre

    _, work = backward_input([out], [torch.ones(4, 8)], [x])
    del out
    gc.collect()
    alive = [r() is not None for r in refs]
    # only what the deferred work reads: the second Linear's input; the GELU's input is
    # read by the input side only and is freed by the input backward
    assert alive == [False, True, False]
    work.run()
    gc.collect()
    assert all(r() is None for r in refs)

    y = stage(x)
    backward_full([y], [torch.ones(4, 8)], [x])
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(torch.ones(4, 8))


def test_outputs_and_inputs_edge_cases() -> None:
    x = torch.randn(3, requires_grad=True)
    # Identity stage: the output is the input leaf itself.
    (gx,), work = backward_input([x], [torch.full((3,), 2.0)], [x])
    work.run()
    assert_close(gx, torch.full((3,), 2.0), rtol=0, atol=0)
    assert x.grad is None
    # Outputs that need no grad, or non-scalar outputs without a gradient, are skipped.
    grads, work = backward_input([torch.ones(3), x * 2], [None, None], [x])
    assert grads == [None] and work.num_engine_calls == 0
    work.run()
    # A pre-existing .grad of an input is left untouched by backward_full.
    x.grad = torch.ones(3)
    (gx,) = backward_full([(x * 3).sum()], [None], [x])
    assert_close(gx, torch.full((3,), 3.0), rtol=0, atol=0)
    assert_close(x.grad, torch.ones(3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="leaf"):
        backward_input([x * 2], [torch.ones(3)], [x * 1])
    with pytest.raises(ValueError, match="grad_outputs"):
        backward_full([x * 2], [], [x])


# ----------------------------------------------------------------------------- random stages


class MatmulFn(torch.autograd.Function):
    """x @ w with an ordinary custom backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        return g @ w.t(), x.t() @ g


class DeferredMatmulFn(torch.autograd.Function):
    """x @ w deferring the gradient of a leaf w with defer_weight_grad."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        x, w = ctx.saved_tensors

        def weight_grad() -> None:
            gw = x.t() @ g
            w.grad = gw if w.grad is None else w.grad + gw

        defer_weight_grad(weight_grad)
        return g @ w.t(), None


OPS = ["mm", "mm", "bias", "act", "add", "mul", "chunk", "wchunk", "wt", "wscale"]
OPS += ["custom", "defer"]


def _random_stage(
    seed: int,
) -> tuple[Callable[[list[Tensor], list[Tensor]], list[Tensor]], dict[str, Any]]:
    """A random stage over a pool of tensors: weight sharing, multi-output nodes, custom
    Functions, parameter-only outputs and inputs without gradient all occur."""
    rng = random.Random(seed)
    d = 4
    n_in = rng.choice([1, 1, 2])
    spec = {
        "requires": [rng.random() > 0.1] + [rng.random() < 0.6 for _ in range(n_in - 1)],
        "mats": rng.randint(1, 3),
        "vecs": rng.randint(1, 2),
    }
    program = [(rng.choice(OPS), rng.random(), rng.random()) for _ in range(rng.randint(1, 10))]
    n_out = rng.choice([1, 1, 2])
    param_output = rng.random() < 0.2

    def stage(inputs: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        mats, vecs = params[: spec["mats"]], params[spec["mats"] :]
        pool = list(inputs)

        def pick(lst: list[Tensor], r: float) -> Tensor:
            return lst[int(r * len(lst))]

        for op, a, b in program:
            x, w = pick(pool, a), pick(mats, b)
            if op == "mm":
                y = x @ w
            elif op == "bias":
                y = x + pick(vecs, b)
            elif op == "act":
                y = (torch.tanh, torch.sin, F.gelu)[int(b * 3)](x)
            elif op == "add":
                y = x + pick(pool, b)
            elif op == "mul":
                y = x * pick(pool, b).tanh()
            elif op == "chunk":
                u, v = x.chunk(2, dim=-1)
                y = torch.cat([v.sin(), u], -1)
            elif op == "wchunk":
                w1, w2 = w.chunk(2)
                y = (x[:, :2] @ w1) * (x[:, 2:] @ w2) if b < 0.5 else x[:, :2] @ w1 + x[:, 2:] @ w2
            elif op == "wt":
                y = x @ w.t()
            elif op == "wscale":
                y = x @ (w * 0.5)
            elif op == "custom":
                y = MatmulFn.apply(x, w)
            else:
                y = DeferredMatmulFn.apply(x, w)
            pool.append(y)
        outs = pool[-n_out:]
        return outs + [(mats[0] * 3).sin()] if param_output else outs

    spec["d"] = d
    return stage, spec


@pytest.mark.parametrize("block", range(4))
def test_random_stages_match_plain_backward(block: int) -> None:
    for seed in range(block * 50, block * 50 + 50):
        stage, spec = _random_stage(seed)
        gen = torch.Generator().manual_seed(seed)
        d = spec["d"]
        mats = [torch.randn(d, d, generator=gen) / 2 for _ in range(spec["mats"])]
        vecs = [torch.randn(d, generator=gen) / 2 for _ in range(spec["vecs"])]
        requires = spec["requires"]
        raw = [torch.randn(3, d, generator=gen) for _ in requires]

        results = []
        for mode in ("reference", "split", "full"):
            params = [nn.Parameter(t.clone()) for t in mats + vecs]
            leaves = [t.clone().requires_grad_(r) for t, r in zip(raw, requires, strict=True)]
            outs = stage(leaves, params)
            gen_out = torch.Generator().manual_seed(seed)
            grads = [torch.randn(o.shape, generator=gen_out) for o in outs]
            if mode == "reference":
                pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                in_grads = [t.grad for t in leaves]
            elif mode == "split":
                in_grads, work = backward_input(outs, grads, leaves)
                assert all(p.grad is None for p in params), seed
                work.run()
            else:
                in_grads = backward_full(outs, grads, leaves)
            if mode != "reference":
                assert all(t.grad is None for t in leaves)
            results.append(in_grads + [p.grad for p in params])
        for got in results[1:]:
            # Contributions to a shared weight may be summed in another order.
            _assert_same(got, results[0], exact=False)


def test_compiled_stage_with_donated_buffers() -> None:
    """A torch.compile'd stage whose compiled backward donates its buffers (it refuses
    retain_graph=True) gets an exact plain backward from backward_input."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))
    stage = copy.deepcopy(eager)
    compiled = torch.compile(stage, backend="aot_eager")  # AOTAutograd, no C++ compiler
    x = torch.randn(4, 8)
    g = torch.randn(4, 8)
    # first backward without retain_graph: the backward is compiled with donated buffers
    backward_full([compiled(x.requires_grad_())], [g], [x])
    node = compiled(x).grad_fn
    assert node is not None and node._forward_cls.metadata.bw_donated_idxs  # type: ignore[attr-defined]
    for p in stage.parameters():
        p.grad = None
    xs = x.detach().requires_grad_()
    (gx,), work = backward_input([compiled(xs)], [g], [xs])
    work.run()
    xr = x.detach().requires_grad_()
    eager(xr).backward(g)
    assert gx is not None and xr.grad is not None
    assert_close(gx, xr.grad, rtol=1e-6, atol=1e-7)
    for p, q in zip(stage.parameters(), eager.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
