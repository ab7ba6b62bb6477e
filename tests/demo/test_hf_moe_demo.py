"""``dualpipe demo --model hf-moe``: a HuggingFace Qwen3-MoE on 2 pipeline x 2
expert-parallel processes, checked against HF's own loss and timed with and without the
overlap engine; and its label conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency (pyproject's ``dev`` extra): never skipped

from dualpipe.demo import main
from dualpipe.demo.hf_moe import build_hf_moe, hf_labels
from dualpipe.demo.task import CopyTask, lm_loss
from tests.demo.test_demo import _png_size


def test_hf_moe_demo_checks_against_hf_and_times_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps (one with the overlap engine, one without): the first step's summed loss
    is HF's ``forward(labels=...)`` loss and every gradient HF's; the pair picture and the
    summary are written; both step times are reported."""
    out = tmp_path / "hf"
    assert main(["--model", "hf-moe", "--steps", "2", "--chunks", "4", "--micro-batch", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient check vs single process: OK (loss " in printed
    assert "vs HF's forward(labels=...)" in printed
    assert "with the overlap engine" in printed and "without" in printed
    summary = json.loads((out / "hf_moe_summary.json").read_text())
    assert summary["model"] == "hf-moe" and summary["grad_check"]["ok"]
    assert summary["grad_check"]["messages"] == []
    assert len(summary["losses"]) == 2
    assert len(summary["step_ms"]) == 1 and len(summary["plain_step_ms"]) == 1
    assert summary["pairs_interleaved"] > 0 and summary["comm_ms"] > 0
    assert {iv["resource"] for iv in summary["pair"]} == {"compute", "comm"}
    width, _ = _png_size(out / "hf_moe_pair.png")
    assert width > 300
    assert main(["--model", "hf-moe", "--schedule", "1f1b", "--out", str(out)]) == 2


def test_hf_labels_give_the_demo_task_loss() -> None:
    """HF's loss with the converted labels is the copy task's loss of the same logits
    (HF shifts the labels itself)."""
    assert transformers.__version__
    task = CopyTask(vocab_size=16)
    tokens, targets = task.batch(3, 0, 0)
    model = build_hf_moe(0)
    out = model(input_ids=tokens, labels=hf_labels(targets))
    torch.testing.assert_close(out.loss, lm_loss(out.logits, targets), rtol=1e-6, atol=0)
    assert torch.equal(hf_labels(targets)[:, 1:], targets[:, :-1])


def test_hf_moe_check_fails_on_a_wrong_gradient_or_loss() -> None:
    """The demo's check against HF passes on HF's own gradients and names a gradient off
    by 1e-4 (relative) and a loss off by 1e-5."""
    from dualpipe.demo.hf_moe import _check, _reference

    task = CopyTask(vocab_size=16)
    shares = [task.batch(2, q, 0) for q in range(2)]
    labels = [hf_labels(t) for _, t in shares]
    model = build_hf_moe(0)
    ref_loss, ref = _reference(model, shares, labels)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    assert _check(names, params, ref, ref_loss, ref_loss, "x").ok
    ref = {n: g.clone() for n, g in ref.items()}
    victim = "model.layers.1.mlp.experts.down_proj"
    ref[victim] = ref[victim] * (1 + 1e-4)
    bad = _check(names, params, ref, ref_loss, ref_loss * (1 + 1e-5), "x")
    assert not bad.ok and not bad.losses_equal
    assert any(victim in m for m in bad.messages) and len(bad.messages) == 2
