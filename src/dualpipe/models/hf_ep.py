"""Expert parallelism for HuggingFace MoE causal LMs (Mixtral, Qwen2/3-MoE) under the overlap
engine: each stage is written as parts, its sparse MoE blocks dispatching tokens to the
expert-parallel rank that runs their experts and combining the results with all-to-alls,
so DualPipe's forward-and-backward pairs hide them under the other micro-batch's work."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..overlap import AllToAll, PartedStage
from ..schedules.schedule import Schedule
from ..transport.guarded import all_reduce
from .hf import CausalLM, CausalLMStage, _prepare, _Spec

__all__ = ["ExpertParallelStage", "split_causal_lm_ep", "sync_expert_parallel_grads",
           "EP_MODEL_TYPES"]

EP_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
"""Families whose sparse MoE block is a router (``gate``) and fused experts (``experts``:
``gate_up_proj``, ``down_proj``), plus for Qwen2-MoE a sigmoid-gated shared expert (run
locally on every token)."""


def _any(module: nn.Module) -> Any:
    """A HuggingFace module, whose submodules the type checker cannot see."""
    return module


def _sparse_block(layer: nn.Module) -> nn.Module | None:
    """The decoder layer's sparse MoE block, or None for a dense layer."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if mlp is not None and hasattr(mlp, "gate") and hasattr(experts, "gate_up_proj"):
        return mlp
    return None


class ExpertParallelStage(PartedStage, CausalLMStage):
    """A :class:`~dualpipe.models.hf.CausalLMStage` written as parts: in each sparse MoE
    block, expert-parallel rank ``q`` of ``ep_group`` runs experts
    ``q * E/ep .. (q+1) * E/ep - 1`` for the tokens of every rank of its group. Every rank
    holds every expert's weights (HuggingFace stores them fused), so checkpoints keep the
    model's keys; only the computation is spread."""

    def __init__(
        self,
        stage: int,
        layers: Sequence[tuple[int, nn.Module]],
        spec: _Spec,
        ep_group: dist.ProcessGroup,
    ) -> None:
        CausalLMStage.__init__(self, stage, layers, spec)
        self._a2a = AllToAll(ep_group)
        self._ep = dist.get_world_size(ep_group)
        self._ep_rank = dist.get_rank(ep_group)
        self._num_experts = int(spec.config.num_local_experts
                                if spec.model_type == "mixtral" else spec.config.num_experts)
        self._top_k = int(spec.config.num_experts_per_tok)

    def parts(self, *inputs: Any) -> Generator[Any, Any, Any]:
        spec = self._spec
        layers = list(zip(self.layer_ids, self, strict=True))
        if len(inputs) != 1:
            raise NotImplementedError(
                "expert-parallel stages take input_ids only (no attention_mask)"
            )
        if self.has_embedding:
            (input_ids,) = inputs
            hidden = layers[0][1](input_ids)
            layers = layers[1:]
        else:
            (hidden,) = inputs
        decoders = [(i, m) for i, m in layers if 1 <= i <= spec.num_layers]
        if decoders:
            hidden = yield from self._decoders_parts(hidden, decoders)
        if self.has_head:
            hidden = layers[-1][1](hidden)
        return hidden

    def _decoders_parts(
        self, hidden: Tensor, decoders: list[tuple[int, nn.Module]]
    ) -> Generator[Any, Any, Tensor]:
        # constants without gradient: safe to keep across the parts
        position_ids, position_embeddings, mask_of = self._spec.attention_inputs(hidden, None)
        masks = [mask_of(i) for i, _ in decoders]  # all made before the first part ends
        for (_, layer), mask in zip(decoders, masks, strict=True):
            block = _sparse_block(layer)
            layer = _any(layer)
            if block is None:
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                               past_key_values=None, use_cache=False,
                               position_embeddings=position_embeddings)
                continue
            # the decoder layer's forward, with its MoE block's experts spread
            residual = hidden
            h = layer.input_layernorm(hidden)
            h, _ = layer.self_attn(hidden_states=h, attention_mask=mask,
                                   position_ids=position_ids, past_key_values=None,
                                   position_embeddings=position_embeddings)
            hidden = residual + h
            z = layer.post_attention_layernorm(hidden)
            shape = z.shape
            out, hidden = yield from self._experts_parts(block, z.view(-1, shape[-1]), hidden)
            hidden = hidden + out.reshape(shape)
        return hidden

    def _experts_parts(
        self, block: nn.Module, z: Tensor, residual: Tensor
    ) -> Generator[Any, Any, tuple[Tensor, Tensor]]:
        """``z [tokens, hidden]`` through the routed experts (the block's router and
        weights); ``residual`` is carried across the all-to-alls."""
        ep, k, num = self._ep, self._top_k, self._num_experts
        local = num // ep
        _, weights, index = _any(block).gate(z)          # HF's router: top-k weights and experts
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = z.repeat_interleave(k, dim=0)[order]
        counts = torch.bincount(flat, minlength=num)
        got, rows, order, weights, counts, residual, z = yield (
            self._a2a(counts), rows, order, weights, counts, residual, z)
        send = counts.view(ep, local).sum(1).tolist()
        per_source = got.view(ep, local)
        recv = per_source.sum(1).tolist()
        arrived, order, weights, residual, z = yield (
            self._a2a(rows, in_splits=send, out_splits=recv), order, weights, residual, z)
        experts = block.experts
        mine = range(self._ep_rank * local, (self._ep_rank + 1) * local)
        outs, at = [], 0
        for source in range(ep):
            for j, e in enumerate(mine):
                n = int(per_source[source, j])
                outs.append(_expert(experts, e, arrived[at:at + n]))
                at += n
        back, order, weights, residual, z = yield (
            self._a2a(torch.cat(outs), in_splits=recv, out_splits=send),
            order, weights, residual, z)
        unsorted = torch.empty_like(back).index_copy(0, order, back)
        tokens = weights.shape[0]
        mixed = (unsorted.view(tokens, k, -1) * weights.unsqueeze(-1).to(back.dtype)).sum(1)
        shared = getattr(block, "shared_expert", None)
        if shared is not None:  # Qwen2-MoE: every token also through the shared expert
            gate = torch.sigmoid(_any(block).shared_expert_gate(z))
            mixed = mixed + gate * shared(z)
        return mixed, residual


def _expert(experts: Any, e: int, x: Tensor) -> Tensor:
    """Expert ``e`` of HuggingFace's fused experts on rows ``x`` (their eager arithmetic:
    ``gate_up_proj``, the gate, ``down_proj``)."""
    gate_up = nn.functional.linear(x, experts.gate_up_proj[e])
    if hasattr(experts, "_apply_gate"):
        h = experts._apply_gate(gate_up)
    else:  # pragma: no cover - every transformers 5 experts class has it
        gate, up = gate_up.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    out: Tensor = nn.functional.linear(h, experts.down_proj[e])
    return out


def split_causal_lm_ep(
    model: nn.Module,
    schedule: str | Schedule = "dualpipev",
    *,
    ep_group: dist.ProcessGroup,
    costs: str | Sequence[float] = "params",
    rank: int | None = None,
    num_ranks: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> CausalLM:
    """Like :func:`dualpipe.models.hf.split_causal_lm` (``group``: the pipeline's group),
    with the sparse MoE blocks' experts spread over ``ep_group``: the processes holding
    the same pipeline rank in ``ep`` pipelines that run side by side, each on its own
    share of the batch. Stages are :class:`ExpertParallelStage`\\ s (parts), run by the
    overlap engine. After each step call :func:`sync_expert_parallel_grads` (the
    expert-parallel ranks are data-parallel for everything, and each expert's gradient
    lives on the rank that ran it).

    Refused: other families, the MoE load-balancing loss (``output_router_logits``),
    Mixtral's router jitter, a number of experts that ``ep_group`` does not divide.
    """
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in EP_MODEL_TYPES:
        raise ValueError(
            f"expert parallelism is implemented for {', '.join(EP_MODEL_TYPES)} (router + "
            f"fused experts); got model_type {model_type!r}"
        )
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            "expert parallelism with the MoE load-balancing loss is not implemented: set "
            "config.output_router_logits=False"
        )
    if getattr(config, "router_jitter_noise", 0.0):
        raise ValueError("expert parallelism with router_jitter_noise > 0 is not implemented")
    ep = dist.get_world_size(ep_group)
    experts = config.num_local_experts if model_type == "mixtral" else config.num_experts
    if experts % ep:
        raise ValueError(f"{experts} experts do not split over {ep} expert-parallel ranks")
    layout, rank, layers, stage_layers, spec = _prepare(
        model, schedule, costs, rank, num_ranks, group
    )
    stages: list[CausalLMStage] = [
        ExpertParallelStage(k, [(i, layers[i]) for i in stage_layers[k]], spec, ep_group)
        for k in layout.rank_stages[rank]
    ]
    return CausalLM(stages, schedule, layout, rank, spec.config, spec)


def sync_expert_parallel_grads(lm: CausalLM, ep_group: dist.ProcessGroup,
                               pipe: Any = None) -> None:
    """Sum every gradient of this rank's stages over ``ep_group`` (collective over it):
    the shared weights' gradients of the ``ep`` shares of the batch, and each expert's
    gradient from the rank that ran it (the others hold zeros there). Afterwards every
    expert-parallel rank holds the gradient of the whole batch. With ``pipe`` (the
    rank's :class:`~dualpipe.Pipeline`) the all-reduces wait with the job's failure
    check: a failure anywhere in the job ends them at once, naming the failed rank."""
    transport = getattr(pipe, "transport", None)
    for p in lm.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if transport is None:
            dist.all_reduce(p.grad, group=ep_group)
        else:
            all_reduce(p.grad, ep_group, transport, "the expert-parallel gradient sum")
