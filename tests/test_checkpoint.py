"""DCP checkpoints keyed by layer: saved by 4 DualPipeV ranks, loaded into 2, saved again
and loaded into 4 DualPipe ranks (mirrored copies): every next step's losses equal those of
the uninterrupted run bit for bit, and the optimizer state survives resharding exactly."""

from __future__ import annotations

from pathlib import Path

from dualpipe.testing import run_distributed

from .training_workers import checkpoint_run, wrapped_checkpoint_run


def _merged(results: list[dict[str, object]], key: str) -> dict:
    out: dict = {}
    for r in results:
        out.update(r[key])  # type: ignore[arg-type]
    return out


def test_save_with_4_ranks_load_with_2_and_back(tmp_path: Path) -> None:
    first, second = str(tmp_path / "after1"), str(tmp_path / "after2")
    # uninterrupted: 4 DualPipeV ranks, 3 steps, checkpoint after step 1
    a = run_distributed(checkpoint_run, 4, "dualpipev", 3, None, first, 1, timeout=180)
    # 2 ranks resume from it, checkpoint after step 2
    b = run_distributed(checkpoint_run, 2, "dualpipev", 3, first, second, 2, timeout=180)
    # 4 DualPipe ranks (every stage on two ranks) resume from that
    c = run_distributed(checkpoint_run, 4, "dualpipe", 3, second, None, 0, timeout=180)
    la, lb, lc = a[0]["losses"], b[0]["losses"], c[0]["losses"]
    assert sorted(lb) == [1, 2] and sorted(lc) == [2]  # type: ignore[arg-type]
    assert lb[1] == la[1] and len(la[1]) == 8  # type: ignore[index]
    assert lc[2] == lb[2]  # type: ignore[index]
    # a and b computed step 2's gradients in other orders: equal up to rounding
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(la[2], lb[2], strict=True))  # type: ignore[index]
    # the optimizer state written by 4 ranks is what 2 ranks hold after loading it, and
    # the one written by 2 what the 4 DualPipe ranks hold (both copies of each stage)
    saved_a, loaded_b = _merged(a, "saved"), _merged(b, "loaded")
    assert len(saved_a) == 3 * 8 * 6  # step, exp_avg, exp_avg_sq of 6 tensors per layer
    assert saved_a == loaded_b
    assert _merged(b, "saved") == _merged(c, "loaded")
    assert c[0]["loaded"] == c[3]["loaded"]  # ranks 0 and 3 hold the same two stages


def test_wrapped_stages_save_layer_keys_and_load_at_another_size(tmp_path: Path) -> None:
    """Stages wrapped by checkpoint_wrapper (whole, or layer by layer) and a compiled layer
    are saved under the plain layer keys on 2 ranks and load into 1 plain rank exactly."""
    path = str(tmp_path / "wrapped")
    saved = run_distributed(wrapped_checkpoint_run, 2, path, True, timeout=180)
    (loaded,) = run_distributed(wrapped_checkpoint_run, 1, path, False, timeout=180)
    keys = [k for r in saved for k in r["keys"]]  # type: ignore[attr-defined]
    assert len(keys) == 8 * 6 and sorted(keys) == loaded["keys"], keys
    assert all(k.startswith("layers.") for k in keys), keys
    assert not any("_checkpoint_wrapped_module" in k or "_orig_mod" in k for k in keys), keys
    assert _merged(saved, "params") == loaded["params"]
    assert _merged(saved, "optim") == loaded["optim"]
    assert len(loaded["optim"]) == 3 * 8 * 6  # type: ignore[arg-type]


def test_fsdp2_stages_save_and_load_into_another_pipeline_and_data_parallel_size(
        tmp_path: Path) -> None:
    """2 data-parallel x 2 pipeline ranks with FSDP2 (sharded DTensor parameters and
    optimizer state) save; 4 plain pipeline ranks (no data parallelism) load: every full
    parameter and optimizer tensor equal."""
    from .training_workers import fsdp_checkpoint_run

    path = str(tmp_path / "fsdp")
    saved = run_distributed(fsdp_checkpoint_run, 4, path, True, timeout=180)
    loaded = run_distributed(fsdp_checkpoint_run, 4, path, False, timeout=180)
    for pp_rank in (0, 1):  # the second replica holds the same full tensors as the first
        for key in ("params", "optim"):
            assert saved[2 + pp_rank][key] == saved[pp_rank][key]
    saved_params, loaded_params = _merged(saved, "params"), _merged(loaded, "params")
    assert len(saved_params) == 8 * 6 and saved_params == loaded_params
    saved_optim, loaded_optim = _merged(saved, "optim"), _merged(loaded, "optim")
    assert len(saved_optim) == 3 * 8 * 6 and saved_optim == loaded_optim
