"""The HuggingFace MoE demo's training run of one process: a tiny random Qwen3-MoE on 2
pipeline ranks x 2 expert-parallel ranks (``dualpipe.models.hf_ep``), DualPipeV with the
overlap engine, checked against HuggingFace's own model on one process, and the same
stages timed with the overlap engine off."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.pipeline import Pipeline
from .moe_train import PIPELINE_RANKS, MoEOptions, MoERankResult, measure_pair
from .task import IGNORE, CopyTask
from .train import GradCheck

__all__ = ["HF_MOE_FAMILY", "LOSS_RTOL", "GRAD_RNORM", "hf_moe_config", "hf_labels",
           "train_hf_moe_rank"]

HF_MOE_FAMILY = "qwen3_moe"
"""The HuggingFace family the demo builds (``transformers.Qwen3MoeConfig``)."""

LOSS_RTOL = 1e-6
"""The first step's loss (sum over every process) against HuggingFace's, relative."""
GRAD_RNORM = 1e-5
"""Every gradient against HuggingFace's: relative norm of the difference."""


def hf_moe_config(num_experts: int = 4) -> Any:
    """The demo's Qwen3-MoE: the dense demo GPT's width (64), 4 decoder layers of
    ``num_experts`` experts (top-2), the copy task's vocabulary; eager attention."""
    import transformers

    task = CopyTask()
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=task.vocab_size, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, moe_intermediate_size=128, num_experts=num_experts,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2 * task.seq_len,
        tie_word_embeddings=False, output_router_logits=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_hf_moe(seed: int) -> nn.Module:
    """``Qwen3MoeForCausalLM`` with random weights from ``seed`` (the same on every
    process); its routers, which HuggingFace starts at zero (every token would pick the
    same experts), drawn like the other weights."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_moe_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 0.1)
    result: nn.Module = model.train()
    return result


def hf_labels(targets: torch.Tensor) -> torch.Tensor:
    """The copy task's targets (``targets[:, t]`` follows ``tokens[:, t]``) as HuggingFace
    labels (unshifted: the model shifts them by one itself)."""
    first = torch.full_like(targets[:, :1], IGNORE)
    return torch.cat([first, targets[:, :-1]], dim=1)


class BlockingStage(nn.Module):
    """A parted stage as an ordinary module: its parts run in order, each all-to-all an
    ordinary blocking autograd operation (the overlap engine leaves it alone)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *inputs: Any) -> Any:
        return self.stage(*inputs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def train_hf_moe_rank(rank: int, world: int, opts: MoEOptions) -> MoERankResult:
    """Train the HF MoE model as process ``rank`` of a ``PIPELINE_RANKS x EP`` mesh.
    Even steps run the pipeline with the overlap engine, odd steps the same stages as
    ordinary modules (``step_ms`` and ``plain_ms``). Step 0 runs both (the same batch and
    weights; the optimizer takes the second's gradients), each checked against
    HuggingFace's model on one process."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..models import hf, hf_ep

    torch.set_num_threads(1)
    ep_size = world // PIPELINE_RANKS
    mesh = init_device_mesh("cpu", (PIPELINE_RANKS, ep_size), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    ep_rank = rank % ep_size
    task = CopyTask(vocab_size=hf_moe_config().vocab_size)
    model = build_hf_moe(opts.seed)
    pristine = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    lm = hf_ep.split_causal_lm_ep(model, "dualpipev", ep_group=ep, group=pp)
    del model
    overlapped = lm.pipeline(process_group=pp, timeout=opts.timeout)
    plain = Pipeline([BlockingStage(s) for s in lm.stages], "dualpipev", process_group=pp,
                     timeout=opts.timeout)
    params = lm.parameters()
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.98), weight_decay=0.01)
    result = MoERankResult(rank)
    size = opts.chunks * opts.micro_batch
    last_overlapped = opts.steps - 1 - (opts.steps - 1) % 2

    def one_step(pipe: Pipeline, shares: list[tuple[torch.Tensor, torch.Tensor]],
                 labels: list[torch.Tensor], record: bool) -> tuple[float, float]:
        """One step of ``pipe`` and the expert-parallel gradient sum: the loss summed over
        every process (HF's loss of the whole batch) and the slowest process's time of
        ``pipe.step``."""
        crit = lm.criterion(num_items=sum(hf.count_targets(y) for y in labels),
                            num_chunks=opts.chunks)
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        if lm.takes_labels:
            losses, _ = pipe.step(shares[ep_rank][0], num_chunks=opts.chunks, criterion=crit,
                                  labels=(labels[ep_rank],), record=record)
        else:
            losses, _ = pipe.step(num_chunks=opts.chunks, record=record)
        step_s = time.perf_counter() - t0
        hf_ep.sync_expert_parallel_grads(lm, ep, pipe)
        total = torch.zeros(2, dtype=torch.float64)
        total[0] = losses.double().sum() if losses is not None else 0.0
        total[1] = step_s
        dist.all_reduce(total[:1])
        dist.all_reduce(total[1:], op=dist.ReduceOp.MAX)
        return float(total[0]), float(total[1])

    for step in range(opts.steps):
        shares = [task.batch(size, opts.seed * 1000 + q, step) for q in range(ep_size)]
        labels = [hf_labels(t) for _, t in shares]
        if step == 0:
            # both ways of running the stages, on the same batch and weights, against HF
            ref_loss, ref_grads = _reference(pristine, shares, labels)
            del pristine
            checks: list[GradCheck | None] = []
            loss = 0.0
            for pipe, how in ((plain, "ordinary modules"), (overlapped, "overlap engine")):
                loss, step_s = one_step(pipe, shares, labels,
                                        pipe is overlapped and last_overlapped == 0)
                mine = _check(names, params, ref_grads, ref_loss, loss, how)
                gathered: list[GradCheck | None] = [None] * world
                dist.all_gather_object(gathered, mine)
                checks += gathered
            if rank == 0:
                result.grad_check = GradCheck.combine(checks)
                loss_rel = abs(loss - ref_loss) / abs(ref_loss)
                result.check_detail = (
                    f"loss {loss:.6f} vs HF's forward(labels=...) {ref_loss:.6f}, rel "
                    f"{loss_rel:.1e}; {len(params)} gradient tensors per process, worst rel. "
                    f"norm {result.grad_check.max_abs_diff:.1e}; with and without the "
                    f"overlap engine")
        else:
            pipe = overlapped if step % 2 == 0 else plain
            loss, step_s = one_step(pipe, shares, labels, step == last_overlapped)
        optimizer.step()
        if rank == 0:
            result.losses.append(loss)
            (result.step_ms if step % 2 == 0 else result.plain_ms).append(step_s * 1e3)
            if step == last_overlapped:
                measure_pair(overlapped, result)
    overlapped.close()
    plain.close()
    return result


def _reference(pristine: nn.Module, shares: list[tuple[torch.Tensor, torch.Tensor]],
               labels: list[torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """HuggingFace's ``forward(labels=...)`` loss of the whole step's batch (every
    expert-parallel share) on this process, and its gradients by parameter name."""
    ids = torch.cat([t for t, _ in shares])
    ref_loss = pristine(input_ids=ids, labels=torch.cat(labels)).loss
    ref_loss.backward()
    grads = {n: p.grad for n, p in pristine.named_parameters() if p.grad is not None}
    return float(ref_loss.detach()), grads


def _check(names: dict[int, str], params: list[nn.Parameter],
           ref: dict[str, torch.Tensor], ref_value: float, loss: float, how: str) -> GradCheck:
    """This rank's gradients (after the expert-parallel sum) against HuggingFace's, and the
    pipelines' summed loss against HuggingFace's; ``how`` names the run in the messages.
    The check's ``max_abs_diff`` is the worst relative norm."""
    messages: list[str] = []
    worst = 0.0
    for p in params:
        n = names[id(p)]
        want = ref.get(n)
        if p.grad is None or want is None:
            messages.append(f"{how}: {n}: gradient missing "
                            f"({'pipeline' if p.grad is None else 'HF'})")
            continue
        err = _rel(p.grad, want)
        worst = max(worst, err)
        if not err <= GRAD_RNORM:
            messages.append(f"{how}: {n}: gradient rel. norm {err:.2e} > {GRAD_RNORM:.0e}")
    loss_rel = abs(loss - ref_value) / abs(ref_value)
    loss_ok = loss_rel <= LOSS_RTOL
    if not loss_ok:
        messages.append(f"{how}: loss {loss!r} vs HF's {ref_value!r}: rel {loss_rel:.2e}")
    return GradCheck(not messages, worst, loss_ok, messages)
