"""HuggingFace decoder-only causal LMs (Llama, Qwen2/3, Mistral, Mixtral, Qwen2/3-MoE,
DeepSeek-V3) cut into pipeline stages, with the loss the model itself computes.

A model's layers for the pipeline are ``[embed_tokens, layers[0], ..., layers[L-1],
head]`` (global layer indices ``0 .. L+1``; ``head`` holds the final norm and
``lm_head``). Each stage recomputes what HuggingFace's ``*Model.forward`` computes once
for all layers — position ids, the rotary ``(cos, sin)`` and the causal (or
sliding-window, padding-aware) masks — with the same HuggingFace functions, so only the
hidden states (plus the 2-D attention mask when the batch has one, and for the MoE
load-balancing loss two per-expert sums) cross a stage boundary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..runtime.extension import Extension, PipelineInfo, register_extension
from ..runtime.pipeline import Pipeline
from ..schedules.layout import Layout
from ..schedules.schedule import Schedule
from ..split import StageModule, param_counts, partition, pipeline_position
from ..stages import COUNTED_ELSEWHERE, unique_parameters
from ..transport.guarded import all_reduce

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CausalLMStage",
    "CausalLMLoss",
    "split_causal_lm",
    "load_causal_lm",
    "count_targets",
]

_MASKS = {
    "llama": "causal",
    "deepseek_v3": "causal",
    "mistral": "sliding_if_set",
    "mixtral": "sliding_if_set",
    "qwen3_moe": "sliding_if_set",
    "qwen2": "layer_types",
    "qwen3": "layer_types",
    "qwen2_moe": "layer_types",
}
"""How each family's ``*Model.forward`` picks a decoder layer's mask: ``causal`` (always
``create_causal_mask``), ``sliding_if_set`` (``create_sliding_window_causal_mask`` for every
layer when ``config.sliding_window`` is set) or ``layer_types`` (by
``config.layer_types[i]``)."""

_AUX_LOSS = ("mixtral", "qwen2_moe", "qwen3_moe")
"""Families whose ``*ForCausalLM`` adds the router load-balancing loss (when
``config.output_router_logits``); DeepSeek-V3 balances with a bias and adds none."""

SUPPORTED_MODEL_TYPES = tuple(sorted(_MASKS))
"""``config.model_type`` of the families this module cuts (checked against
transformers 5.23's modeling code)."""

IGNORE_INDEX = -100


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError(
            "dualpipe.models.hf needs transformers: pip install 'dualpipe[hf]'"
        ) from e
    return transformers


@dataclass(frozen=True)
class _AuxSpec:
    """The MoE load-balancing loss as the model's ``*ForCausalLM`` computes it."""

    num_experts: int
    top_k: int
    coef: float
    router_layers: int
    """Decoder layers with a router (each adds one set of rows to the loss)."""


@dataclass
class _Spec:
    """What every stage of one model needs to know (shared by a rank's stages)."""

    config: Any
    model_type: str
    num_layers: int
    vocab_size: int
    router_class: type | None
    aux: _AuxSpec | None
    rotary_factory: Callable[[], nn.Module]
    embed_shape: tuple[int, ...]
    tied: bool
    layout: Layout
    rank: int
    cross_rank_tie: tuple[int, int] | None = None
    """``(embedding's rank, head's rank)`` when a tied weight lives on two ranks."""
    rotary: dict[torch.device, nn.Module] = field(default_factory=dict)

    def mask_kind(self, layer: int) -> str:
        """``full_attention`` or ``sliding_attention``: the mask of decoder layer
        ``layer`` (0-based), as the family's ``*Model.forward`` picks it."""
        return self.mask_kind_of(self.model_type, self.config, layer)

    @staticmethod
    def mask_kind_of(model_type: str, config: Any, layer: int) -> str:
        rule = _MASKS[model_type]
        if rule == "causal":
            return "full_attention"
        if rule == "sliding_if_set":
            sliding = getattr(config, "sliding_window", None) is not None
            return "sliding_attention" if sliding else "full_attention"
        return str(config.layer_types[layer])

    def rotary_on(self, device: torch.device) -> nn.Module:
        """The model's rotary embedding module on ``device``: the model's own, or (stages
        built on the meta device) one built afresh from the config, so its ``inv_freq``
        is never a meta tensor's or ``to_empty``'s garbage."""
        if device not in self.rotary:
            self.rotary[device] = self.rotary_factory().to(device)
        return self.rotary[device]

    def attention_inputs(
        self, hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any, Callable[[int], Any]]:
        """What ``*Model.forward`` hands its decoder layers: position ids, the rotary
        ``(cos, sin)`` and, per decoder layer (1-based pipeline layer index), its mask,
        made by HF's own mask functions once per kind."""
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary_on(hidden.device)(hidden, position_ids)
        masks: dict[str, Any] = {}

        def mask_of(layer: int) -> Any:
            kind = self.mask_kind(layer - 1)
            if kind not in masks:
                make = (create_sliding_window_causal_mask if kind == "sliding_attention"
                        else create_causal_mask)
                masks[kind] = make(config=self.config, inputs_embeds=hidden,
                                   attention_mask=mask, past_key_values=None,
                                   position_ids=position_ids)
            return masks[kind]

        return position_ids, position_embeddings, mask_of


class _Head(nn.Module):
    """The model's final norm and output projection (one pipeline layer)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(hidden))
        return out


class CausalLMStage(StageModule):
    """One pipeline stage of a HuggingFace causal LM: consecutive layers of
    ``[embed_tokens, decoder layers..., head]``, keyed by global layer index (so
    :mod:`dualpipe.checkpoint` keys are ``layers.<i>.*``, independent of the cut).

    Inputs: ``input_ids`` and optionally a ``[batch, seq]`` ``attention_mask`` (1 = token,
    0 = padding) at the first stage, otherwise what the previous stage returned.
    Outputs: the hidden states, or the logits at the last stage; then the attention mask,
    if there was one (no gradient; every stage builds HF's masks from it); then, with the
    MoE load-balancing loss on, two float32 ``[num_experts]`` sums over the routers so
    far (top-k assignments, no gradient; router probabilities).
    """

    def __init__(
        self, stage: int, layers: Sequence[tuple[int, nn.Module]], spec: _Spec
    ) -> None:
        super().__init__(stage, layers)
        self._spec = spec
        self._captured: list[torch.Tensor] | None = None
        self.has_embedding = 0 in self.layer_ids
        self.has_head = spec.num_layers + 1 in self.layer_ids
        if spec.aux is not None and spec.router_class is not None:
            for i, layer in zip(self.layer_ids, self, strict=True):
                if 1 <= i <= spec.num_layers:
                    for sub in layer.modules():
                        if isinstance(sub, spec.router_class):
                            sub.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._captured is not None:
            self._captured.append(output[0])

    def forward(self, *inputs: Any) -> Any:
        spec = self._spec
        aux = spec.aux
        layers = list(zip(self.layer_ids, self, strict=True))
        if self.has_embedding:
            if len(inputs) not in (1, 2):
                raise TypeError(
                    "the first stage takes input_ids and optionally a [batch, seq] "
                    f"attention_mask (1 = token, 0 = padding); got {len(inputs)} inputs"
                )
            input_ids = inputs[0]
            mask = inputs[1] if len(inputs) == 2 else None
            hidden = layers[0][1](input_ids)
            layers = layers[1:]
            sums: list[torch.Tensor] = []
            if aux is not None:
                sums = [
                    torch.zeros(aux.num_experts, dtype=torch.float32, device=hidden.device)
                    for _ in range(2)
                ]
        else:
            hidden, *rest = inputs
            mask, sums = _split_rest(rest, spec)
        decoders = [(i, m) for i, m in layers if 1 <= i <= spec.num_layers]
        if decoders:
            hidden, sums = self._decoders(hidden, mask, sums, decoders)
        if self.has_head:
            hidden = layers[-1][1](hidden)
        extra = ([] if mask is None else [mask]) + sums
        return (hidden, *extra) if extra else hidden

    def _decoders(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        sums: list[torch.Tensor],
        decoders: list[tuple[int, nn.Module]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the decoder layers as ``*Model.forward`` does (same positions, rotary and
        masks), adding each router's share to the load-balancing sums."""
        spec = self._spec
        position_ids, position_embeddings, mask_of = spec.attention_inputs(hidden, mask)
        for i, layer in decoders:
            self._captured = [] if spec.aux is not None else None
            try:
                out = layer(
                    hidden,
                    attention_mask=mask_of(i),
                    position_ids=position_ids,
                    past_key_values=None,
                    use_cache=False,
                    position_embeddings=position_embeddings,
                )
                captured = self._captured
            finally:
                self._captured = None
            hidden = out[0] if isinstance(out, tuple) else out
            if spec.aux is not None and captured:
                (logits,) = captured  # one router per MoE layer
                sums = _add_router_share(sums, logits, spec.aux, mask)
        return hidden, sums


def _split_rest(
    rest: list[torch.Tensor], spec: _Spec
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``(attention mask or None, load-balancing sums)`` from what follows the hidden
    states at a stage boundary."""
    n_sums = 0 if spec.aux is None else 2
    if len(rest) == n_sums:
        return None, list(rest)
    if len(rest) == n_sums + 1:
        return rest[0], list(rest[1:])
    raise TypeError(f"unexpected stage inputs: hidden states and {len(rest)} more tensors")


def _add_router_share(
    sums: list[torch.Tensor],
    router_logits: torch.Tensor,
    aux: _AuxSpec,
    mask: torch.Tensor | None,
) -> list[torch.Tensor]:
    """One router's addition to (top-k assignment counts, router probability sums), in
    the arithmetic of HuggingFace's ``load_balancing_loss_func`` (padding left out where
    ``mask`` is 0)."""
    tokens, probs = sums
    device = tokens.device
    weights = F.softmax(router_logits.to(device), dim=-1)
    _, selected = torch.topk(weights, aux.top_k, dim=-1)
    if mask is None:
        histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
        tokens = tokens + torch.histc(
            selected.reshape(-1).to(histc_dtype), bins=aux.num_experts, min=0,
            max=aux.num_experts,
        )
        probs = probs + weights.float().sum(dim=0)
    else:
        flat = mask.reshape(-1).to(device=device, dtype=torch.float32)
        tokens = tokens + torch.zeros(
            aux.num_experts, dtype=torch.float32, device=device
        ).scatter_add_(0, selected.reshape(-1), flat.repeat_interleave(aux.top_k))
        probs = probs + (weights.float() * flat.unsqueeze(-1)).sum(dim=0)
    return [tokens, probs]


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many tokens of ``labels`` (``[batch, seq]``) a causal LM predicts: the labels
    after the first position of each row that are not ``ignore_index``."""
    return int((labels[..., 1:] != ignore_index).sum().item())


class CausalLMLoss:
    """The model's own causal-LM loss, split over micro-batches so that the micro-batch
    losses *sum* to HuggingFace's ``model(input_ids, labels=labels).loss`` of the whole
    batch (and their gradients to its gradient).

    Called as ``criterion(logits, [attention_mask], [router sums], labels)`` (what the last
    stage returns, then the labels). Each micro-batch's loss is the sum of its token
    cross-entropies (labels shifted by one, ``-100`` ignored, logits upcast to float32 as
    HuggingFace does; the attention mask does not enter it, as in HuggingFace) divided by
    ``num_items``, the number of predicted tokens of the whole step; with the MoE
    load-balancing loss on, plus ``router_aux_loss_coef * aux / num_chunks``, where
    ``aux`` is HuggingFace's load-balancing loss of that micro-batch (over all of the
    model's routers): HuggingFace's value for the batch when ``num_chunks == 1``, the
    mean over micro-batches otherwise (that loss is a product of batch-wide sums, so a
    pipeline, which runs a micro-batch's backward before it has seen the next
    micro-batch, cannot form it for the whole batch).

    Use it with ``loss_reduction="sum"`` (the pipeline's default).
    """

    def __init__(
        self,
        vocab_size: int,
        num_items: int,
        num_chunks: int,
        aux: _AuxSpec | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        self.vocab_size = vocab_size
        self.num_items = num_items
        self.num_chunks = num_chunks
        self.aux = aux
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """``criterion(logits, [attention_mask], [router counts, router probabilities],
        labels)``: what the last stage returns, then the micro-batch's labels."""
        n_sums = 0 if self.aux is None else 2
        if len(rest) not in (n_sums + 1, n_sums + 2):
            raise ValueError(
                f"expected the last stage's outputs (logits, {n_sums} load-balancing sums, "
                f"and the attention mask if the step had one) and the labels; got "
                f"{1 + len(rest)} tensors"
            )
        *outputs, labels = rest
        mask = outputs[0] if len(outputs) == n_sums + 1 else None
        sums = outputs[len(outputs) - n_sums :]
        shifted = F.pad(labels, (0, 1), value=self.ignore_index)[..., 1:].contiguous()
        loss = F.cross_entropy(
            logits.float().view(-1, self.vocab_size),
            shifted.view(-1).to(logits.device),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        loss = loss / self.num_items
        if self.aux is not None:
            tokens, probs = sums
            if mask is None:
                rows: float | torch.Tensor = float(
                    self.aux.router_layers * logits.shape[0] * logits.shape[1]
                )
            else:  # as HF: the mask's sum, once per router
                rows = 0.0
                flat = mask.reshape(-1).to(device=tokens.device, dtype=torch.float32)
                for _ in range(self.aux.router_layers):
                    rows = rows + flat.sum()
            balance = torch.sum((tokens / rows) * (probs / rows).unsqueeze(0))
            balance = balance * self.aux.num_experts
            loss = loss + self.aux.coef * balance.to(loss.device) / self.num_chunks
        return loss


@dataclass
class CausalLM:
    """One pipeline rank's share of a HuggingFace causal LM.

    Attributes:
        stages: this rank's stage modules, in ``layout.rank_stages[rank]`` order: pass
            them to :class:`~dualpipe.Pipeline` (or call :meth:`pipeline`).
        schedule: the schedule (name or ``Schedule``) they were cut for.
        layout: where every stage lives.
        rank: this pipeline rank.
        config: the model's HuggingFace config.
    """

    stages: list[CausalLMStage]
    schedule: str | Schedule
    layout: Layout
    rank: int
    config: Any
    _spec: _Spec

    @property
    def takes_inputs(self) -> bool:
        """Whether micro-batches enter the pipeline on this rank (pass ``input_ids``)."""
        return bool(self.layout.streams_starting_on(self.rank))

    @property
    def takes_labels(self) -> bool:
        """Whether a stream ends on this rank (pass the criterion and labels)."""
        return bool(self.layout.streams_ending_on(self.rank))

    @property
    def aux_loss(self) -> bool:
        """Whether the loss includes the MoE load-balancing term."""
        return self._spec.aux is not None

    def criterion(
        self,
        labels: torch.Tensor | None = None,
        *,
        num_chunks: int,
        num_items: int | None = None,
    ) -> CausalLMLoss:
        """The step's criterion (see :class:`CausalLMLoss`): ``labels`` are the whole
        step's labels (``[batch, seq]``), used to count the predicted tokens; or pass that
        count as ``num_items`` (DualPipe: both ends need the count of the whole batch,
        :func:`count_targets` of both halves). ``num_chunks`` is the step's total number
        of micro-batches."""
        if num_items is None:
            if labels is None:
                raise ValueError("pass the step's labels or num_items")
            num_items = count_targets(labels)
        return CausalLMLoss(self._spec.vocab_size, num_items, num_chunks, self._spec.aux)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (a weight tied on this rank appears once):
        what to give the optimizer."""
        return unique_parameters(self.stages)

    def pipeline(self, **kwargs: Any) -> Pipeline:
        """``Pipeline(self.stages, self.schedule, **kwargs)``; ``loss_reduction`` must stay
        ``"sum"`` (the criterion already divides by the step's token count)."""
        if kwargs.get("loss_reduction", "sum") != "sum":
            raise ValueError(
                "CausalLM's criterion divides by the step's number of predicted tokens: "
                "build the pipeline with loss_reduction='sum'"
            )
        return Pipeline(self.stages, self.schedule, **kwargs)


def _check_model(model: Any) -> tuple[Any, str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _MASKS:
        raise ValueError(
            f"dualpipe.models.hf cuts decoder-only causal LMs of the families "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} "
            f"(model_type {model_type!r}). Other models: cut them by hand "
            "(dualpipe.split.split_model) and check them against one process"
        )
    base = getattr(model, "model", None)
    if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or (
        not hasattr(model, "lm_head")
    ):
        raise ValueError(
            f"{type(model).__name__} does not have the layout of a *ForCausalLM "
            "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)"
        )
    if getattr(config, "is_causal", True) is False:
        raise ValueError("the config sets is_causal=False (bidirectional attention): refused")
    return config, model_type


def _spec(
    model: Any, layout: Layout, rank: int, stage_layers: list[range], fresh_rotary: bool
) -> _Spec:
    config, model_type = _check_model(model)
    num_layers = len(model.model.layers)
    if num_layers != config.num_hidden_layers:
        raise ValueError(
            f"the model has {num_layers} decoder layers but its config says "
            f"{config.num_hidden_layers}"
        )
    recorder = getattr(model.model, "_can_record_outputs", {}).get("router_logits")
    router_class = getattr(recorder, "target_class", None)
    if recorder is not None and getattr(recorder, "index", 0) != 0:
        raise ValueError("unexpected router recorder (router logits not the first output)")
    aux = None
    if model_type in _AUX_LOSS and getattr(config, "output_router_logits", False):
        if router_class is None:
            raise ValueError(f"{type(model).__name__}: no router class to read logits from")
        routers = sum(
            any(isinstance(m, router_class) for m in layer.modules())
            for layer in model.model.layers
        )
        aux = _AuxSpec(
            num_experts=int(model.num_experts),
            top_k=int(model.num_experts_per_tok),
            coef=float(model.router_aux_loss_coef),
            router_layers=int(routers),
        )
    kinds = {
        _Spec.mask_kind_of(model_type, config, i) for i in range(num_layers)
    }
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(
            f"layer types {sorted(unknown)} (config.layer_types) are not implemented: only "
            "full and sliding-window attention layers"
        )
    embed = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embed.weight or bool(
        getattr(config, "tie_word_embeddings", False)
    )
    rotary = model.model.rotary_emb
    rotary_class = type(rotary)

    def rotary_factory() -> nn.Module:
        if not fresh_rotary:
            return rotary  # the model's own (its buffers as the model has them)
        with torch.device("cpu"):
            return rotary_class(config=config)

    spec = _Spec(
        config=config,
        model_type=model_type,
        num_layers=num_layers,
        vocab_size=int(config.vocab_size),
        router_class=router_class,
        aux=aux,
        rotary_factory=rotary_factory,
        embed_shape=tuple(embed.weight.shape),
        tied=tied,
        layout=layout,
        rank=rank,
    )
    if tied:
        spec.cross_rank_tie = _tie_ranks(layout, stage_layers, num_layers)
    return spec


def _tie_ranks(
    layout: Layout, stage_layers: list[range], num_layers: int
) -> tuple[int, int] | None:
    """None when every rank holding the embedding also holds the head (the tie is local);
    ``(embedding rank, head rank)`` when each is held by one rank; otherwise refused."""
    first = next(k for k, r in enumerate(stage_layers) if 0 in r)
    last = next(k for k, r in enumerate(stage_layers) if num_layers + 1 in r)
    embed_ranks = [r for r, ids in enumerate(layout.rank_stages) if first in ids]
    head_ranks = [r for r, ids in enumerate(layout.rank_stages) if last in ids]
    if embed_ranks == head_ranks:
        return None
    if len(embed_ranks) == 1 and len(head_ranks) == 1:
        return embed_ranks[0], head_ranks[0]
    raise ValueError(  # pragma: no cover - no registered layout does this
        f"tied embeddings: the embedding lives on ranks {embed_ranks} and the head on "
        f"{head_ranks}; untie them (config.tie_word_embeddings=False) or use DualPipeV"
    )


def _pipeline_layers(model: Any) -> list[nn.Module]:
    """``[embed_tokens, layers..., head]``: the model as consecutive pipeline layers."""
    head = _Head(model.model.norm, model.get_output_embeddings())
    return [model.get_input_embeddings(), *model.model.layers, head]


def _prepare(
    model: Any,
    schedule: str | Schedule,
    costs: str | Sequence[float],
    rank: int | None,
    num_ranks: int | None,
    group: dist.ProcessGroup | None,
    fresh_rotary: bool = False,
) -> tuple[Layout, int, list[nn.Module], list[range], _Spec]:
    _check_model(model)
    layout, rank = pipeline_position(schedule, rank, num_ranks, group)
    layers = _pipeline_layers(model)
    if isinstance(costs, str):
        if costs != "params":
            raise ValueError(f"costs must be 'params' or one number per layer, got {costs!r}")
        values = param_counts(layers)
    else:
        values = [float(c) for c in costs]
        if len(values) != len(layers):
            raise ValueError(
                f"got {len(values)} costs for {len(layers)} layers (embedding, "
                f"{len(layers) - 2} decoder layers, head)"
            )
    stage_layers = partition(values, layout.num_stages)
    spec = _spec(model, layout, rank, stage_layers, fresh_rotary)
    return layout, rank, layers, stage_layers, spec


def split_causal_lm(
    model: nn.Module,
    schedule: str | Schedule = "dualpipev",
    *,
    costs: str | Sequence[float] = "params",
    rank: int | None = None,
    num_ranks: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> CausalLM:
    """This pipeline rank's stages of a HuggingFace ``*ForCausalLM`` built on every rank
    (same weights everywhere: build it from one seed, or ``from_pretrained``).

    The model's layers ``[embed_tokens, *layers, norm + lm_head]`` are cut into the
    schedule's stages balanced by ``costs`` (parameter counts by default, as
    :func:`dualpipe.split.split_model`); the stages share the model's modules (nothing is
    copied: drop the model's other layers to free them). Tied embeddings are kept where
    both ends live on one rank (DualPipeV, ZBV, DualPipe...); where they live on two
    (1F1B, interleaved...), the two gradients are summed after every training step
    between those ranks (an all-reduce over the pipeline group).
    """
    layout, rank, layers, stage_layers, spec = _prepare(
        model, schedule, costs, rank, num_ranks, group
    )
    stages = [
        CausalLMStage(k, [(i, layers[i]) for i in stage_layers[k]], spec)
        for k in layout.rank_stages[rank]
    ]
    return CausalLM(stages, schedule, layout, rank, spec.config, spec)


def _checkpoint_index(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file of a ``save_pretrained`` directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{path} holds no model.safetensors(.index.json): save the model with "
            "save_pretrained (safetensors)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
"""Per-expert tensor names of MoE checkpoints (Qwen2/3-MoE and DeepSeek-V3; Mixtral):
gate, up and down projection."""


def _checkpoint_tensor(
    key: str,
    shape: tuple[int, ...],
    index: dict[str, str],
    read: Callable[[str], torch.Tensor],
) -> torch.Tensor | None:
    """The module tensor ``key`` from a checkpoint: stored under its name, or (MoE
    checkpoints, which transformers 5 fuses when loading) assembled from per-expert
    tensors — ``experts.gate_up_proj[e]`` is expert ``e``'s gate and up projections
    concatenated, ``experts.down_proj[e]`` its down projection — under ``mlp.`` or
    Mixtral's ``block_sparse_moe.``. None when neither form is there."""
    prefixes = [key]
    if ".mlp." in key:
        prefixes.append(key.replace(".mlp.", ".block_sparse_moe.", 1))
    for k in prefixes:
        if k in index:
            return read(k)
    for k in prefixes:
        base, _, leaf = k.rpartition(".")
        if not base.endswith("experts") or leaf not in ("gate_up_proj", "down_proj"):
            continue
        for gate, up, down in _EXPERT_NAMES:
            names = [
                [f"{base}.{e}.{n}.weight" for n in ((gate, up) if leaf == "gate_up_proj" else
                                                    (down,))]
                for e in range(shape[0])
            ]
            if all(n in index for per in names for n in per):
                return torch.stack([torch.cat([read(n) for n in per]) for per in names])
    return None


def _hf_names(model: Any, num_layers: int) -> Callable[[int, str], str]:
    """(global layer index, key inside that layer) -> the model's state-dict key."""
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())]
    decoder = names[id(model.model.layers)]
    norm = names[id(model.model.norm)]
    head = names[id(model.get_output_embeddings())]

    def name(layer: int, key: str) -> str:
        if layer == 0:
            return f"{embed}.{key}"
        if layer <= num_layers:
            return f"{decoder}.{layer - 1}.{key}"
        part, _, rest = key.partition(".")
        return f"{norm if part == 'norm' else head}.{rest}"

    return name


def load_causal_lm(
    path: str | os.PathLike[str],
    schedule: str | Schedule = "dualpipev",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    costs: str | Sequence[float] = "params",
    rank: int | None = None,
    num_ranks: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> CausalLM:
    """Like :func:`split_causal_lm`, for a model saved with ``save_pretrained``
    (safetensors) in the local directory ``path``: the model is built on the meta device,
    and only this rank's stages are materialised on ``device`` (in ``dtype``; by default
    the one ``from_config`` gives: the config's ``dtype``, else float32) and loaded from
    the checkpoint. The rotary
    embedding's buffers are recomputed from the config. Every other buffer must be in the
    checkpoint.

    MoE checkpoints store each expert's projections separately (``experts.<e>.gate_proj``,
    ``up_proj``, ``down_proj``; Mixtral's ``block_sparse_moe.experts.<e>.w1/w3/w2``), where
    transformers 5's modules hold them fused (``experts.gate_up_proj``,
    ``experts.down_proj``): they are assembled the way transformers does. Any other tensor
    missing from the checkpoint is an error naming it (load such a model with
    ``from_pretrained`` on every rank and call :func:`split_causal_lm`).
    """
    transformers = _transformers()
    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    layout, rank, layers, stage_layers, spec = _prepare(
        model, schedule, costs, rank, num_ranks, group, fresh_rotary=True
    )
    name = _hf_names(model, spec.num_layers)
    index = _checkpoint_index(path)
    device = torch.device(device)
    mine = list(layout.rank_stages[rank])
    local: dict[int, nn.Module] = {}
    for k in mine:
        for i in stage_layers[k]:
            if i not in local:
                layer = layers[i].to_empty(device=device)
                if dtype is not None:
                    layer = layer.to(dtype)
                local[i] = layer
    embed_name = name(0, "weight")
    from safetensors import safe_open

    handles: dict[str, Any] = {}

    def read(k: str) -> torch.Tensor:
        file = index[k]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        out: torch.Tensor = handles[file].get_tensor(k)
        return out

    try:
        for i, layer in local.items():
            persistent = layer.state_dict(keep_vars=True)
            for key, _ in layer.named_buffers():
                if key not in persistent:
                    raise ValueError(  # pragma: no cover - no supported family has one
                        f"layer {i} has the non-persistent buffer {key!r}, which a "
                        "checkpoint does not hold: refused"
                    )
            for key, tensor in persistent.items():
                hf_key = name(i, key)
                if hf_key not in index and spec.tied and i == spec.num_layers + 1:
                    hf_key = embed_name  # a tied head is saved once, as the embedding
                value = _checkpoint_tensor(hf_key, tuple(tensor.shape), index, read)
                if value is None:
                    raise KeyError(
                        f"the checkpoint in {path} has no tensor {hf_key!r} (for layer {i}, "
                        f"{key!r}), nor a per-expert form of it: load the model with "
                        "from_pretrained on every rank and use split_causal_lm"
                    )
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"{hf_key}: checkpoint shape {tuple(value.shape)}, model "
                        f"{tuple(tensor.shape)}"
                    )
                with torch.no_grad():
                    tensor.copy_(value)
    finally:
        handles.clear()
    head_index = spec.num_layers + 1
    if spec.tied and 0 in local and head_index in local:
        head = local[head_index]
        assert isinstance(head, _Head)
        head.lm_head.weight = local[0].weight
    stages = [CausalLMStage(k, [(i, local[i]) for i in stage_layers[k]], spec) for k in mine]
    return CausalLM(stages, schedule, layout, rank, config, spec)


class _TiedGradSum(Extension):
    """Sums the gradients of a tied embedding and output head held by two ranks after
    every training step (an all-reduce over the pipeline group; ranks holding neither
    contribute zeros), so both copies hold the gradient one process computes."""

    name = "hf-tied-embeddings"

    def __init__(self, info: PipelineInfo, spec: _Spec) -> None:
        assert spec.cross_rank_tie is not None
        self.group = info.group
        self.device = info.device
        self.pipeline = info.pipeline
        self.param: nn.Parameter | None = None
        embed_rank, head_rank = spec.cross_rank_tie
        for module in info.modules:
            if isinstance(module, CausalLMStage):
                layer: Any = module
                if info.rank == embed_rank and module.has_embedding:
                    self.param = layer[0].weight
                if info.rank == head_rank and module.has_head:
                    self.param = layer[-1].lm_head.weight
                    # the embedding's rank counts it (gradient norms, clipping)
                    setattr(self.param, COUNTED_ELSEWHERE, True)
        if self.param is not None:
            self.dtype = self.param.dtype
        else:
            first = next(iter(info.modules[0].parameters()), None)
            self.dtype = first.dtype if first is not None else torch.get_default_dtype()
        self.shape = spec.embed_shape
        self.before: torch.Tensor | None = None

    def before_step(self, training: bool) -> None:
        p = self.param
        self.before = None
        if training and p is not None and p.grad is not None:
            self.before = p.grad.detach().clone()

    def after_step(self, training: bool) -> None:
        if not training:
            return
        p = self.param
        if p is None:
            delta = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        elif p.grad is None:
            delta = torch.zeros_like(p)
        else:
            delta = p.grad.detach().clone()
            if self.before is not None:
                delta -= self.before
        transport = getattr(self.pipeline, "transport", None)
        if transport is None:
            dist.all_reduce(delta, group=self.group)
        else:  # a failure elsewhere in the job ends the wait (one failure domain)
            all_reduce(delta, self.group, transport, "the tied embedding's gradient sum")
        if p is not None:
            total = delta if self.before is None else self.before + delta
            p.grad = total
        self.before = None


@register_extension
def _tied_embeddings(info: PipelineInfo) -> Extension | None:
    """Every pipeline whose stages come from this module and tie weights across ranks gets
    the gradient sum on every rank (refused if built for another layout)."""
    specs = {id(m._spec): m._spec for m in info.modules if isinstance(m, CausalLMStage)}
    if not specs:
        return None
    if len(specs) > 1:
        raise ValueError("the stages of one rank come from two different split models")
    (spec,) = specs.values()
    if spec.layout.rank_stages != info.layout.rank_stages or spec.rank != info.rank:
        raise ValueError(
            f"these stages were cut for pipeline rank {spec.rank} of a layout with stages "
            f"{spec.layout.rank_stages}; this pipeline is rank {info.rank} of "
            f"{info.layout.rank_stages}: cut the model for the schedule you run (with a "
            "rank_mapping, pass rank=<pipeline rank> when cutting)"
        )
    if spec.cross_rank_tie is None:
        return None
    return _TiedGradSum(info, spec)
