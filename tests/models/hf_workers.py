"""Workers for tests/models/test_hf.py: tiny HuggingFace causal LMs (random weights, no
downloads) run by a pipeline and compared with the model's own forward on one process."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

VOCAB, SEQ = 96, 12

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe",
            "deepseek_v3")


def make_config(family: str, tied: bool = False, attn: str = "sdpa") -> Any:
    """A tiny config of ``family`` (hidden 32, 3 decoder layers, vocabulary 96)."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    moe = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        # sliding window on the last layer only (layer_types): a mask per layer type
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=5,
                                       max_window_layers=2)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=8)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=5)  # < SEQ: it matters
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, **moe)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **common, num_experts=4, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, mlp_only_layers=[1], **moe)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=16,
                                          **moe)
    elif family == "deepseek_v3":
        common["num_key_value_heads"] = 4  # multi-head latent attention: one per head
        cfg = transformers.DeepseekV3Config(
            **common, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1)
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return cfg


def build(family: str, tied: bool = False, attn: str = "sdpa", seed: int = 0) -> Any:
    """The model, float32, random weights from ``seed`` (the same on every rank)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        make_config(family, tied, attn), attn_implementation=attn)
    # routers start at zero in some families (all experts tie): make routing non-trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.dim() == 2:
                p.normal_(0, 0.5)
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model.train()


def batch(seed: int = 1, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 3:7] = -100          # ignored targets, unevenly spread over micro-batches
    labels[rows - 1, :5] = -100
    return ids, labels


def padded(ids: torch.Tensor, labels: torch.Tensor, side: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths padded on ``side`` (token 0, label -100): ids, labels and
    the attention mask (1 = token, 0 = padding)."""
    ids, labels = ids.clone(), labels.clone()
    mask = torch.ones_like(ids)
    for row, pad in enumerate((3, 0, 5, 1)[: ids.shape[0]]):
        where = slice(0, pad) if side == "left" else slice(ids.shape[1] - pad, ids.shape[1])
        mask[row, where] = 0
        ids[row, where] = 0
        labels[row, where] = -100
    return ids, labels, mask


def reference(model: Any, ids: torch.Tensor, labels: torch.Tensor, chunks: int, steps: int = 1,
              mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """HuggingFace's own loss of the whole batch, its gradients (accumulated over
    ``steps`` backwards) and its logits, on this process. With the load-balancing loss
    and several micro-batches: HF's token loss of the batch plus the coefficient times
    the mean of HF's aux loss over the micro-batches."""
    ref = copy.deepcopy(model)
    aux = getattr(ref.config, "output_router_logits", False) and ref.config.model_type in (
        "mixtral", "qwen2_moe", "qwen3_moe")
    for _ in range(steps):
        if aux and chunks > 1:
            loss = ref(input_ids=ids, attention_mask=mask, labels=labels,
                       output_router_logits=False).loss
            parts = mask.chunk(chunks) if mask is not None else [None] * chunks
            for part, part_mask in zip(ids.chunk(chunks), parts, strict=True):
                out = ref(input_ids=part, attention_mask=part_mask, output_router_logits=True)
                loss = loss + ref.router_aux_loss_coef * out.aux_loss / chunks
        else:
            loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits
    return loss.detach(), grads, logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run_case(rank: int, world: int, family: str, schedule: str, tied: bool, attn: str,
              chunks: int, load_from: str | None = None, steps: int = 1,
              pad: str | None = None) -> dict[str, Any]:
    from dualpipe.models import hf

    model = build(family, tied, attn)
    ids, labels = batch()
    mask = None
    if pad is not None:
        ids, labels, mask = padded(ids, labels, pad)
    ref_loss, ref_grads, ref_logits = reference(model, ids, labels, chunks, steps, mask)
    inputs = (ids,) if mask is None else (ids, mask)
    names = {id(p): n for n, p in model.named_parameters()}
    if load_from is not None:
        lm = hf.load_causal_lm(load_from, schedule, attn_implementation=attn)
    else:
        lm = hf.split_causal_lm(model, schedule)
    layout = lm.layout
    pipe = lm.pipeline()
    first, last = lm.takes_inputs, lm.takes_labels
    assert first == (rank in [layout.entry(s)[0] for s in range(layout.num_streams)])
    assert last == (rank in [layout.exit(s)[0] for s in range(layout.num_streams)])
    assert len(lm.parameters()) == len({id(p) for s in lm.stages for p in s.parameters()})
    for _ in range(steps):  # gradients accumulate over the steps (no zero_grad)
        losses = _step(pipe, lm, rank, world, inputs, labels, chunks)
    logits_err = 0.0
    if layout.num_streams == 1:  # inference: the last stage's outputs are HF's logits
        with torch.no_grad():
            _, outputs = pipe.step(*(inputs if first else (None,) * len(inputs)),
                                   num_chunks=chunks, return_outputs=True)
        if last:
            got = outputs[0] if isinstance(outputs, tuple) else outputs
            keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
            logits_err = _rel(got[keep], ref_logits[keep])  # padded positions: anything
    total = torch.zeros((), dtype=torch.float64)
    if losses is not None:
        total += losses.double().sum()
    dist.all_reduce(total)
    worst = 0.0
    worst_name = ""
    checked: set[str] = set()
    for stage in lm.stages:
        for p in stage.parameters():
            if load_from is not None:
                continue
            n = names[id(p)]
            if p.grad is None or n not in ref_grads:
                raise AssertionError(f"{family}: {n} has no gradient (pipeline or reference)")
            err = _rel(p.grad, ref_grads[n])
            checked.add(n)
            if err > worst:
                worst, worst_name = err, n
    if load_from is not None:
        # loaded stages: compare by HF name through the same mapping as the reference
        for stage in lm.stages:
            for key, p in stage.named_parameters():
                n = _hf_name(lm, stage, key)
                if p.grad is None:
                    raise AssertionError(f"{family}: loaded {n} has no gradient")
                err = _rel(p.grad, ref_grads[n])
                checked.add(n)
                if err > worst:
                    worst, worst_name = err, n
    # dualpipe.checkpoint keys: layers.<global layer>.<HF's name inside the layer>
    from dualpipe.checkpoint import stage_state_dict

    own = model.state_dict()
    for key, value in stage_state_dict(pipe).items():
        assert key.startswith("layers."), key
        assert torch.equal(value, own[_hf_name(lm, None, key[len("layers."):])]), key
    from dualpipe.clip import grad_norm

    norm = float(grad_norm(pipe))  # every parameter once, a tie across ranks included
    ref_norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values()])))
    pipe.close()
    return {"loss": float(total), "ref": float(ref_loss), "grad": worst, "where": worst_name,
            "norm": norm, "ref_norm": ref_norm, "logits": logits_err,
            "checked": sorted(checked), "ref_names": sorted(ref_grads)}


def _step(pipe: Any, lm: Any, rank: int, world: int, inputs: tuple[torch.Tensor, ...],
          labels: torch.Tensor, chunks: int) -> torch.Tensor | None:
    """One training step; this rank's losses (None where no stream ends)."""
    from dualpipe.models import hf

    if lm.layout.num_streams == 1:
        last = lm.takes_labels
        losses, _ = pipe.step(*(inputs if lm.takes_inputs else (None,) * len(inputs)),
                              num_chunks=chunks,
                              criterion=lm.criterion(labels, num_chunks=chunks) if last else None,
                              labels=(labels if last else None,))
        return losses
    # DualPipe: the first half enters at rank 0, the second at rank N-1
    half = labels.shape[0] // 2
    crit = lm.criterion(num_items=hf.count_targets(labels), num_chunks=chunks)
    if rank == 0:
        losses, _ = pipe.step(*(t[:half] for t in inputs), num_chunks=chunks, criterion=crit,
                              labels=(labels[half:],))
    elif rank == world - 1:
        losses, _ = pipe.step(*(t[half:] for t in inputs), num_chunks=chunks, criterion=crit,
                              labels=(labels[:half],))
    else:
        losses, _ = pipe.step(num_chunks=chunks)
    return losses


def _hf_name(lm: Any, stage: Any, key: str) -> str:
    layer, _, rest = key.partition(".")
    i = int(layer)
    n = lm.config.num_hidden_layers
    if i == 0:
        return f"model.embed_tokens.{rest}"
    if i <= n:
        return f"model.layers.{i - 1}.{rest}"
    part, _, tail = rest.partition(".")
    if part == "norm":
        return f"model.norm.{tail}"
    if lm.config.tie_word_embeddings:  # HF names a tied head's weight once
        return "model.embed_tokens.weight"
    return f"lm_head.{tail}"


def compare_cases(rank: int, world: int, cases: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Run every ``(family, schedule, tied, attn, chunks)`` case on this group."""
    torch.set_num_threads(1)
    return [_run_case(rank, world, *case) for case in cases]


def save_checkpoint(family: str, tied: bool, path: str) -> None:
    """``save_pretrained`` of the seed-0 model into ``path`` (safetensors)."""
    build(family, tied).save_pretrained(path)
    assert os.path.exists(os.path.join(path, "model.safetensors"))


def expert_parallel(rank: int, world: int, families: list[str], chunks: int
                    ) -> list[dict[str, Any]]:
    """:func:`expert_parallel_case` for each family, on one 2 x 2 mesh."""
    torch.set_num_threads(1)
    return [expert_parallel_case(f, chunks) for f in families]


def expert_parallel_case(family: str, chunks: int) -> dict[str, Any]:
    """2 pipeline x 2 expert-parallel processes (DualPipeV, overlap engine): replica ``q``
    trains share ``q`` of the batch; after the expert-parallel gradient sum every rank
    holds HF's gradient of the whole batch on one process (no expert parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe.models import hf_ep

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    ep_rank = dist.get_rank(ep)
    model = build(family)
    model.config.output_router_logits = False
    ids, labels = batch(rows=8)
    ref_loss, ref_grads, _ = reference(model, ids, labels, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    lm = hf_ep.split_causal_lm_ep(model, "dualpipev", ep_group=ep, group=pp)
    assert all(isinstance(s, hf_ep.ExpertParallelStage) for s in lm.stages)
    pipe = lm.pipeline(process_group=pp)
    mine, my_labels = ids.chunk(2)[ep_rank], labels.chunk(2)[ep_rank]
    crit = lm.criterion(num_items=hf_count(labels), num_chunks=chunks)
    if lm.takes_labels:
        losses, _ = pipe.step(mine, num_chunks=chunks, criterion=crit, labels=(my_labels,))
    else:
        losses, _ = pipe.step(num_chunks=chunks)
    from dualpipe.overlap.plugin import is_parted

    assert all(is_parted(s) for s in lm.stages)  # run part by part by the overlap engine
    spread = 0
    for p in lm.parameters():  # before the sum: only this rank's experts have gradients
        n = names[id(p)]
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            local = p.shape[0] // 2
            own = slice(ep_rank * local, (ep_rank + 1) * local)
            other = slice((1 - ep_rank) * local, (2 - ep_rank) * local)
            assert p.grad[own].abs().sum() > 0 and p.grad[other].abs().sum() == 0, n
            spread += 1
    assert spread > 0
    hf_ep.sync_expert_parallel_grads(lm, ep, pipe)
    total = torch.zeros((), dtype=torch.float64)
    if losses is not None:
        total += losses.double().sum()
    dist.all_reduce(total)
    worst, where, checked = 0.0, "", set()
    for p in lm.parameters():
        n = names[id(p)]
        err = _rel(p.grad, ref_grads[n])
        checked.add(n)
        if err > worst:
            worst, where = err, n
    pipe.close()
    return {"loss": float(total), "ref": float(ref_loss), "grad": worst, "where": where,
            "checked": sorted(checked), "ref_names": sorted(ref_grads)}


def hf_count(labels: torch.Tensor) -> int:
    from dualpipe.models import hf

    return hf.count_targets(labels)
