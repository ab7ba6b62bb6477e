"""After an input-only backward only what the weight gradients read stays held: measured,
per layer kind, by following every storage the forward and the backward create until it is
freed (``dualpipe.autograd.memory``), against what each layer's weight gradient reads,
derived by hand; the gradients stay exactly those of a plain backward."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.testing import assert_close

from dualpipe.autograd import backward_input, defer_weight_grad
from dualpipe.autograd.memory import measure_stage_memory

ROWS, D = 16, 32
T = ROWS * D * 4  # bytes of one (ROWS, D) fp32 tensor


def _mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(D, D), nn.GELU())])


class NormMLP(nn.Module):
    """LayerNorm (or RMSNorm), Linear, GELU, Linear."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm = norm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm self-attention with an explicit softmax and a residual."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class MoE(nn.Module):
    """Top-1 routed experts with grouped weights (one (E, D, H) tensor per projection)."""

    def __init__(self, experts: int = 4, hidden: int = 2 * D) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.gate = nn.Linear(D, experts)
        self.w1 = nn.Parameter(torch.randn(experts, D, hidden) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, D) / hidden**0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        top, idx = torch.softmax(self.gate(h), dim=-1).max(dim=-1)
        out = torch.zeros_like(h)
        for e in range(self.w1.shape[0]):
            rows = (idx == e).nonzero(as_tuple=True)[0]
            y = torch.nn.functional.gelu(h[rows] @ self.w1[e]) @ self.w2[e]
            out = out.index_add(0, rows, y * top[rows, None])
        return x + out


def _exact(stage: nn.Module, x: Tensor, input_grad: bool = True) -> None:
    """The split gives exactly a plain backward's gradients."""
    ref = copy.deepcopy(stage)
    g = torch.randn_like(stage(x))
    xr = x.clone().requires_grad_(input_grad)
    ref(xr).backward(g)
    xs = x.clone().requires_grad_(input_grad)
    (gx,), work = backward_input([stage(xs)], [g], [xs])
    work.run()
    if input_grad:
        assert_close(gx, xr.grad, rtol=0, atol=0)
    for p, q in zip(stage.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_linear_gelu_keeps_the_linear_inputs_and_their_output_gradients() -> None:
    """3 x (Linear, GELU): the forward saves 6 tensors (each Linear's input, each GELU's
    input); W reads the 3 Linear inputs and the 3 gradients of their outputs: 6, where
    the input backward used to leave 8 (5 saved tensors and 3 gradients)."""
    torch.manual_seed(0)
    m = measure_stage_memory(_mlp(), torch.randn(ROWS, D))
    assert (m.activation_bytes, m.deferred_bytes, m.after_weight_bytes) == (6 * T, 6 * T, 0)
    assert m.fraction == 1.0
    _exact(_mlp(), torch.randn(ROWS, D))


def test_first_stage_holds_no_more_than_its_weight_gradients_read() -> None:
    """No input gradient (a first stage): the input backward still runs the GELUs and the
    input side of the later Linears, so W keeps the same 6 tensors (it used to keep all 6
    saved tensors and the output gradient: 7)."""
    torch.manual_seed(0)
    m = measure_stage_memory(_mlp(), torch.randn(ROWS, D), input_grad=False)
    assert (m.activation_bytes, m.deferred_bytes, m.after_weight_bytes) == (6 * T, 6 * T, 0)
    _exact(_mlp(), torch.randn(ROWS, D), input_grad=False)


def test_layer_norm_keeps_its_input_and_statistics() -> None:
    """LayerNorm, Linear, GELU, Linear: the forward saves the norm's input and statistics,
    the first Linear's input, the GELU's input and the second Linear's input; W reads all
    of them but the GELU's input, and the gradients of the three weighted layers' outputs."""
    torch.manual_seed(0)
    stat_bytes = 2 * ROWS * 4  # mean and rstd: (ROWS, 1) each
    m = measure_stage_memory(NormMLP(nn.LayerNorm), torch.randn(ROWS, D))
    assert m.activation_bytes == 4 * T + stat_bytes
    assert m.deferred_bytes == 3 * T + stat_bytes + 3 * T
    assert m.after_weight_bytes == 0
    _exact(NormMLP(nn.LayerNorm), torch.randn(ROWS, D))


def test_rms_norm_keeps_the_normalised_input() -> None:
    """RMSNorm (composite on CPU: ``x * rsqrt(mean(x^2) + eps) * weight``), Linear, GELU,
    Linear. The forward saves x, rstd, the normalised x, the norm's output, the GELU's
    input and the second Linear's input (5 tensors and rstd). W reads the normalised x
    (for the norm's weight), the two Linear inputs and 3 output gradients (6); rstd, the
    GELU's input and the stage input (read by the input side only; autograd's leaf node
    would keep it until W, so it is emptied: ``release_unread_inputs``) are freed."""
    torch.manual_seed(0)
    m = measure_stage_memory(NormMLP(nn.RMSNorm), torch.randn(ROWS, D))
    assert m.activation_bytes == 5 * T + ROWS * 4
    assert m.deferred_bytes == 6 * T
    assert m.after_weight_bytes == 0
    _exact(NormMLP(nn.RMSNorm), torch.randn(ROWS, D))


def test_inputs_read_by_the_weight_side_are_kept_and_views_stay_valid() -> None:
    """``release_unread_inputs`` empties only inputs no frontier node reads directly: a
    Linear's input is kept; an input read through a view by a Linear is emptied, but the
    view the Linear saved keeps the storage, and the weight gradients stay exact; an
    input only a norm's input side reads goes."""
    torch.manual_seed(0)
    lin = nn.Linear(D, D)
    ref = copy.deepcopy(lin)
    x, g = torch.randn(2, ROWS // 2, D), torch.randn(ROWS, D)
    ref(x.reshape(ROWS, D)).backward(g)

    direct = x.reshape(ROWS, D).clone().requires_grad_()
    _, work = backward_input([lin(direct)], [g], [direct])
    assert work.release_unread_inputs() == 0 and direct.numel() == ROWS * D
    work.run()
    lin.zero_grad()

    viewed = x.clone().requires_grad_()
    (gx,), work = backward_input([lin(viewed.view(ROWS, D))], [g], [viewed])
    assert work.release_unread_inputs() == 1 and viewed.numel() == 0
    work.run()
    for p, q in zip(lin.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert gx.shape == x.shape

    rms = NormMLP(nn.RMSNorm)
    normed = torch.randn(ROWS, D, requires_grad=True)
    _, work = backward_input([rms(normed)], [g], [normed])
    assert work.release_unread_inputs() == 1 and normed.numel() == 0
    work.run()


def test_attention_frees_scores_and_probabilities() -> None:
    """Attention block on (2, 16, D), 2 heads: W reads the norm's input and statistics,
    the qkv projection's input, the output projection's input (8 tensors of the block's
    width in all, with the gradients of the qkv output (3), of the output projection's
    output and of the norm's output); q, k, v, the scores and the probabilities (read
    only by the input side) are freed."""
    torch.manual_seed(0)
    x = torch.randn(2, ROWS, D)
    tb = 2 * ROWS * D * 4
    stat_bytes = 2 * (2 * ROWS * 4)
    m = measure_stage_memory(Attention(), x)
    assert m.deferred_bytes == 8 * tb + stat_bytes
    assert m.deferred_bytes < 2 * tb + m.activation_bytes  # held to W: less than before
    assert m.after_weight_bytes == 0
    _exact(Attention(), x)


def test_moe_with_grouped_weights_keeps_each_experts_inputs() -> None:
    """Top-1 MoE over N tokens, hidden 2D: W reads the norm's input and statistics, the
    gate's input, every expert's two matmul inputs (N x D and N x 2D over all experts)
    and the gradients of the gate's, the experts' and the norm's outputs; the routing
    products and the GELU inputs are freed. That is 9 tokens x D tensors, the statistics
    and the gate's gradient (N x 4)."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, D)
    m = measure_stage_memory(MoE(), x)
    assert m.deferred_bytes == 9 * T + 2 * ROWS * 4 + ROWS * 4 * 4
    assert m.after_weight_bytes == 0
    _exact(MoE(), x)


def test_user_saved_tensor_hooks_are_left_alone() -> None:
    """Tensors packed by the user's saved_tensors_hooks belong to the hooks: nothing is
    released, the hooks unpack as usual and the gradients stay exact."""
    torch.manual_seed(0)
    packed: list[int] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(t.numel())
        return t.clone()

    stage, ref = _mlp(), None
    ref = copy.deepcopy(stage)
    x, g = torch.randn(ROWS, D), torch.randn(ROWS, D)
    xr = x.clone().requires_grad_()
    ref(xr).backward(g)
    xs = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(xs)
    (gx,), work = backward_input([out], [g], [xs])
    work.run()
    assert packed
    assert_close(gx, xr.grad, rtol=0, atol=0)
    for p, q in zip(stage.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=0, atol=0)


class TiedFirstStage(nn.Module):
    """Token ids in (no input gradient), embedding tied to the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, D)
        self.lin = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.nn.functional.gelu(self.lin(self.emb(ids)))
        return self.norm(h) @ self.emb.weight.T


def test_first_stage_with_a_tied_embedding_is_exact_and_frees_the_gelu_input() -> None:
    """The weight read at both ends (embedding and output projection) is completed in the
    input backward; the GELU's input (read by the input side only) is freed there."""
    torch.manual_seed(0)
    stage = TiedFirstStage()
    ref = copy.deepcopy(stage)
    ids = torch.randint(0, 11, (4, ROWS))
    g = torch.randn(4, ROWS, 11)
    ref(ids).backward(g)
    emb_out = stage.emb(ids)
    hidden = stage.lin(emb_out)
    ref_hidden = weakref.ref(hidden)
    out = stage.norm(torch.nn.functional.gelu(hidden)) @ stage.emb.weight.T
    del hidden, emb_out
    _, work = backward_input([out], [g], [ids])
    del out
    gc.collect()
    assert ref_hidden() is None
    work.run()
    for p, q in zip(stage.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=0, atol=0)


class _DeferredLinear(torch.autograd.Function):
    """The original DualPipe's pattern: the weight gradient reads the saved input later."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, weight = ctx.saved_tensors

        def grad_weight() -> None:
            g = grad.T @ x
            weight.grad = g if weight.grad is None else weight.grad + g

        defer_weight_grad(grad_weight)
        return grad @ weight, None


def test_an_input_a_custom_function_saved_is_kept_for_its_deferred_work() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(D, D))
    x, g = torch.randn(ROWS, D), torch.randn(ROWS, D)
    xs = x.clone().requires_grad_()
    (gx,), work = backward_input([_DeferredLinear.apply(xs, weight)], [g], [xs])
    assert work.release_unread_inputs() == 0 and xs.numel() == ROWS * D
    work.run()
    assert_close(weight.grad, g.T @ x, rtol=0, atol=0)
    assert_close(gx, g @ weight.detach(), rtol=0, atol=0)
