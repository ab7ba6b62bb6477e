"""Checkpoints that understand the pipeline."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .runtime.pipeline import Pipeline
from .split import StageModule
from .stages import local_stages

__all__ = [
    "CheckpointError",
    "model_view",
    "stage_state_dict",
    "load_stage_state_dict",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "save",
    "load",
]


def _dcp(action: str, path: str | os.PathLike[str], fn: Callable[[], Any]) -> None:
    """Run a DCP collective; its failure (a ``BaseException`` naming every failing rank)
    becomes a :class:`CheckpointError` with each rank's reason."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        fn()
    except CheckpointException as exc:
        reasons = "; ".join(
            f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(exc.failures.items())
        )
        raise CheckpointError(f"{action} checkpoint {os.fspath(path)!r} failed: {reasons}") from exc


_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")
"""Attributes under which wrappers keep the wrapped module: ``torch.compile``'s
``OptimizedModule`` and ``checkpoint_wrapper``'s ``CheckpointWrapper``. Their names appear
in parameter names (and ``_orig_mod`` in state-dict keys) but say nothing about the model,
so checkpoint keys leave them out, as DCP's own state-dict helpers do."""


def _unwrap(module: nn.Module) -> nn.Module:
    """The module behind any number of wrappers (``torch.compile``, ``checkpoint_wrapper``)."""
    while True:
        inner = next(
            (m for m in (getattr(module, a, None) for a in _WRAPPERS) if isinstance(m, nn.Module)),
            None,
        )
        if inner is None:
            return module
        module = inner


def _plain_key(key: str) -> str:
    """``key`` without the wrappers' path segments (``layers.3._orig_mod.w`` ->
    ``layers.3.w``)."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPERS)


def _key_map(view: nn.Module) -> dict[str, str]:
    """Checkpoint key -> key of ``view.state_dict()`` (which keeps the wrappers' segments
    of wrapped modules inside a stage)."""
    out: dict[str, str] = {}
    for key in view.state_dict():
        plain = _plain_key(key)
        if plain in out:
            raise CheckpointError(
                f"two state-dict entries, {out[plain]!r} and {key!r}, have the checkpoint key "
                f"{plain!r} once the wrappers' names are left out"
            )
        out[plain] = key
    return out


def model_view(pipe: Pipeline) -> nn.Module:
    """A module holding this rank's stages under rank-independent names: ``layers.<i>``
    for the layers of :class:`~dualpipe.split.StageModule` stages, ``stages.<k>`` for
    other stage modules; a stage wrapped by ``torch.compile`` or ``checkpoint_wrapper``
    is held unwrapped. Its ``named_parameters()`` and ``state_dict()`` use the
    checkpoint's keys, except for wrappers *inside* a stage (a compiled or
    checkpoint-wrapped layer), whose path segments (``_orig_mod``,
    ``_checkpoint_wrapped_module``) :func:`stage_state_dict` leaves out. It shares the
    pipeline's parameters (nothing is copied)."""
    view = nn.Module()
    layers = nn.ModuleDict()
    stages = nn.ModuleDict()
    for k, module in local_stages(pipe):
        inner = _unwrap(module)
        if isinstance(inner, StageModule):
            for i, layer in zip(inner.layer_ids, inner, strict=True):
                layers[str(i)] = layer
        else:
            stages[str(k)] = inner
    if len(layers):
        view.layers = layers
    if len(stages):
        view.stages = stages
    return view


def stage_state_dict(pipe: Pipeline) -> dict[str, Any]:
    """This rank's model state (parameters and buffers) under the checkpoint's keys: by
    layer or stage, without the path segments of wrappers (``torch.compile``'s
    ``_orig_mod``, ``checkpoint_wrapper``'s ``_checkpoint_wrapped_module``), so a
    checkpoint does not depend on how the stages were wrapped."""
    state = model_view(pipe).state_dict()
    return {_plain_key(k): v for k, v in state.items()}


def load_stage_state_dict(pipe: Pipeline, state: dict[str, Any], strict: bool = True) -> None:
    """Load what :func:`stage_state_dict` produced (on any pipeline holding those layers or
    stages, wrapped or not; with ``strict=False`` keys of other ranks' stages are
    ignored)."""
    view = model_view(pipe)
    keys = _key_map(view)
    if not strict:
        state = {k: v for k, v in state.items() if k in keys}
    view.load_state_dict({keys.get(k, k): v for k, v in state.items()}, strict=True)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer_state_dict(pipe: Pipeline, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state under the checkpoint's keys, flat
    (``state.<param key>.<name>``, ``param_groups.<param key>.<hyper-parameter>``).

    The optimizer must hold parameters of ``pipe``'s modules only. If it has not stepped
    yet, its state is first created with a zero-learning-rate step (parameters do not
    change), so that loading has tensors to fill."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model_view(pipe), optimizer, options=_options())


def load_optimizer_state_dict(
    pipe: Pipeline, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_state_dict` produced into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model_view(pipe), optimizer, state, options=_options())


def _full_state(
    pipe: Pipeline, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """What a checkpoint holds: ``model``, ``optim`` (with an optimizer), ``extra``."""
    state: dict[str, Any] = {"model": stage_state_dict(pipe)}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pipe, optimizer)
    if extra:
        state["extra"] = dict(extra)
    return state


def save(
    path: str | os.PathLike[str],
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Collective (every process of the job): write model, optimizer and ``extra`` (plain
    values such as the step number, equal on every rank) to the folder ``path`` with
    ``torch.distributed.checkpoint``. Raises :class:`CheckpointError` on every rank if any
    rank fails."""
    import torch.distributed.checkpoint as dcp

    state = _full_state(pipe, optimizer, extra)
    _dcp("saving", path, lambda: dcp.save(state, checkpoint_id=os.fspath(path)))


def load(
    path: str | os.PathLike[str],
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collective: load model (and optimizer) state written by :func:`save`, whatever the
    pipeline size and schedule were then. ``extra`` names the extra values to read, with
    placeholders (``{"step": 0}``); returns them as saved. Raises :class:`CheckpointError`
    on every rank if any rank fails (a missing folder, missing keys)."""
    import torch.distributed.checkpoint as dcp

    state = _full_state(pipe, optimizer, extra)
    _dcp("loading", path, lambda: dcp.load(state, checkpoint_id=os.fspath(path)))
    load_stage_state_dict(pipe, state["model"])
    if optimizer is not None:
        load_optimizer_state_dict(pipe, optimizer, state["optim"])
    return dict(state.get("extra", {}))
