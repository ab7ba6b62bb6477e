"""dualpipe.models.hf against HuggingFace's own models on one process (tiny configs,
random weights, no downloads)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers  # a dev dependency (pyproject's ``dev`` extra): never skipped

from dualpipe.models import hf
from dualpipe.testing import run_distributed

from . import hf_workers as w


def _check(cases: list[tuple], results: list[list[dict]]) -> None:
    """Per case: losses of every rank agree; the pipeline's loss (sum over micro-batches)
    equals HF's (bit for bit with one micro-batch, rel 1e-6 otherwise); every parameter of
    the model got a gradient somewhere, each within rel 1e-5 of HF's; the pipeline's global
    gradient norm (``dualpipe.clip.grad_norm``) is HF's to rel 1e-6 (a tie counted once);
    an inference step's logits are HF's to rel 1e-6 (single-stream schedules); every
    ``dualpipe.checkpoint`` key is ``layers.<i>.<HF name in the layer>`` (checked in the
    workers)."""
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        chunks = case[4]
        loss, ref = per_rank[0]["loss"], per_rank[0]["ref"]
        assert all(r["loss"] == loss for r in per_rank), case
        if chunks == 1:
            assert loss == ref, (case, loss, ref)
        else:
            assert math.isclose(loss, ref, rel_tol=1e-6), (case, loss, ref)
        covered = set().union(*(r["checked"] for r in per_rank))
        assert covered == set(per_rank[0]["ref_names"]), case
        assert all(math.isclose(r["norm"], r["ref_norm"], rel_tol=1e-6) for r in per_rank), (
            case, [(r["norm"], r["ref_norm"]) for r in per_rank])
        assert all(r["logits"] <= 1e-6 for r in per_rank), case
        worst = max(r["grad"] for r in per_rank)
        assert worst <= 1e-5, (case, worst, [r["where"] for r in per_rank])


def test_every_family_dualpipev_sdpa_and_eager() -> None:
    """DualPipeV on 2 ranks, each family (dense, sliding window, MoE with the
    load-balancing loss, DeepSeek-V3's latent attention), sdpa and eager, tied and
    untied, padded batches with an attention mask, against
    ``model(input_ids, attention_mask=..., labels=labels).loss`` and its gradients."""
    cases = [
        *[(f, "dualpipev", False, "sdpa", 4) for f in w.FAMILIES],
        # eager gets explicit masks: one family per mask rule, MoE and latent attention
        *[(f, "dualpipev", True, "eager", 4)
          for f in ("llama", "mistral", "qwen2", "mixtral")],
        ("mixtral", "dualpipev", False, "sdpa", 1),    # HF's whole-batch aux loss, exactly
        ("llama", "dualpipev", False, "sdpa", 1),
        # padded batches with an attention mask (the balancing loss leaves padding out)
        ("llama", "dualpipev", False, "sdpa", 2, None, 1, "left"),
        ("mixtral", "dualpipev", False, "sdpa", 1, None, 1, "left"),
        ("qwen2_moe", "dualpipev", False, "eager", 2, None, 1, "left"),
    ]
    results = run_distributed(w.compare_cases, 2, cases, timeout=240)
    _check(cases, results)


def test_other_schedules_ties_and_checkpoint_load(tmp_path) -> None:
    """1F1B and interleaved 1F1B put a tied embedding and head on two ranks (their
    gradients are summed after the step); ZBV keeps them on rank 0; DualPipe holds both
    ends on both ranks (the mirrored sum). Stages built on the meta device and loaded from
    ``save_pretrained`` files train exactly as HF's model does (rotary buffers recomputed,
    a tied head read from the embedding's tensor, on one rank or across two)."""
    paths = {}
    for family, tied in (("llama", True), ("qwen3", False), ("mistral", True)):
        paths[family] = str(tmp_path / family)
        w.save_checkpoint(family, tied, paths[family])
    cases = [
        ("qwen3_moe", "1f1b", True, "sdpa", 4),
        ("llama", "zbv", True, "sdpa", 4),
        ("qwen2_moe", "dualpipe", True, "eager", 4),
        ("deepseek_v3", "interleaved-1f1b", True, "sdpa", 4),
        ("llama", "dualpipev", True, "sdpa", 2, paths["llama"]),
        ("qwen3", "dualpipev", False, "eager", 2, paths["qwen3"]),
        ("mistral", "1f1b", True, "sdpa", 2, paths["mistral"]),
        ("llama", "1f1b", True, "sdpa", 2, None, 2),  # two steps accumulate, tie across ranks
        ("mistral", "1f1b", False, "sdpa", 2, None, 1, "left"),   # padded, mask across ranks
        ("qwen2", "dualpipe", False, "sdpa", 2, None, 1, "right"),
    ]
    results = run_distributed(w.compare_cases, 2, cases, timeout=240)
    _check(cases, results)


def test_expert_parallel_2pp_x_2ep() -> None:
    """Mixtral's and Qwen2-MoE's (shared expert, a dense layer) experts spread over 2
    expert-parallel ranks (all-to-all dispatch and combine in stages written as parts, run
    by the overlap engine) on 2 DualPipeV ranks: 4 processes, each pipeline replica
    training half the batch; after the expert-parallel gradient sum every rank holds HF's
    gradient of the whole batch on one process."""
    families = ["mixtral", "qwen2_moe"]
    results = run_distributed(w.expert_parallel, 4, families, 4, timeout=240)
    for i, family in enumerate(families):
        per_rank = [r[i] for r in results]
        for r in per_rank:
            assert r["loss"] == per_rank[0]["loss"], family
            assert math.isclose(r["loss"], r["ref"], rel_tol=1e-6), (family, r)
            assert r["grad"] <= 1e-5, (family, r)
        covered = set().union(*(r["checked"] for r in per_rank))
        assert covered == set(per_rank[0]["ref_names"]), family


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_loaded_stages_match_the_model_on_one_process(tmp_path, family) -> None:
    """Without any process group: the two stages of a one-rank DualPipeV loaded from a
    checkpoint (sharded or not) hold the model's tensors exactly (MoE experts assembled
    from their per-expert form, Mixtral's ``block_sparse_moe`` names included), no meta
    tensor, and give HF's logits bit for bit."""
    model = w.build(family, tied=family == "llama").eval()
    # Llama in several files (model.safetensors.index.json), the others in one
    model.save_pretrained(tmp_path, max_shard_size="20KB" if family == "llama" else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (family == "llama")
    lm = hf.load_causal_lm(tmp_path, "dualpipev", rank=0, num_ranks=1)
    first, last = lm.stages
    own = model.state_dict()
    for stage in lm.stages:
        for key, value in stage.state_dict().items():
            assert not value.is_meta, key
            assert torch.equal(value, own[w._hf_name(lm, stage, key)]), key
    if family == "llama":
        assert last[-1].lm_head.weight is first[0].weight  # tie kept on one rank
    ids, _ = w.batch()
    with torch.no_grad():
        out = first(ids)
        out = last(*out) if isinstance(out, tuple) else last(out)
        logits = out[0] if isinstance(out, tuple) else out  # then the balancing sums
        assert torch.equal(logits, model(input_ids=ids).logits)


def test_refusals(tmp_path) -> None:
    """Clear errors: other model families, a checkpoint missing a tensor, expert
    parallelism for DeepSeek-V3 (grouped routing) or with the balancing loss on, a mean
    loss reduction, a criterion without a count."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16,
                                                                 n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        hf.split_causal_lm(gpt2, "dualpipev", rank=0, num_ranks=1)
    from safetensors.torch import load_file, save_file

    w.build("qwen3").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_norm.weight"):
        hf.load_causal_lm(tmp_path, "dualpipev", rank=0, num_ranks=1)
    from dualpipe.models import hf_ep

    with pytest.raises(ValueError, match="implemented for mixtral, qwen2_moe, qwen3_moe"):
        hf_ep.split_causal_lm_ep(w.build("deepseek_v3"), ep_group=None)
    with pytest.raises(ValueError, match="output_router_logits=False"):
        hf_ep.split_causal_lm_ep(w.build("mixtral"), ep_group=None)  # balancing loss on
    lm = hf.split_causal_lm(w.build("llama"), "dualpipev", rank=0, num_ranks=1)
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        lm.pipeline(loss_reduction="mean")
    with pytest.raises(ValueError, match="labels or num_items"):
        lm.criterion(num_chunks=2)


def test_criterion_sums_to_hf_loss() -> None:
    """On one process: the micro-batch criteria sum to HF's token-mean loss of the batch,
    with ignored labels spread unevenly over the micro-batches."""
    model = w.build("llama").eval()
    ids, labels = w.batch()
    lm = hf.split_causal_lm(model, "dualpipev", rank=0, num_ranks=1)
    crit = lm.criterion(labels, num_chunks=2)
    assert crit.num_items == hf.count_targets(labels) == int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        parts = [crit(lg, lb) for lg, lb in zip(logits.chunk(2), labels.chunk(2), strict=True)]
        whole = model(input_ids=ids, labels=labels).loss
    assert math.isclose(float(sum(parts)), float(whole), rel_tol=1e-6)
    assert torch.equal(lm.criterion(labels, num_chunks=1)(logits, labels), whole)
