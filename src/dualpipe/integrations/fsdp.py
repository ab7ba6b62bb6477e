"""Pipeline stages wrapped in FSDP2 (``fully_shard``, HSDP) or FSDP2's ``replicate``: one
gradient reduction per stage and step, after that stage's last backward or
weight-gradient action, with the automatic weight-gradient split on.

FSDP2 reduces a module's gradients in its *post-backward*, which it runs when the
gradients of the module's inputs are ready, and at the end of every autograd engine call.
A pipeline runs many backward calls per stage and step (one or more per micro-batch, and
with the weight-gradient split the parameter gradients only arrive in the later ``W``
actions), so left alone FSDP2 would reduce-scatter once per micro-batch, before the
weight gradients exist. This extension takes the reduction over:

* before a training step, every FSDP2 parameter group of the rank's stages stops reducing
  (``reduce_grads``/``all_reduce_grads`` off) and, by default, keeps its parameters
  unsharded (no reshard after forward or backward): each group all-gathers once, at the
  step's first forward of its stage;
* right after the action that finishes the stage's last ``B``/``I``/``W`` of the step
  (the executor derives it from the rank's plan), the user's settings come back and
  FSDP2's post-backward runs once for every group of the stage: one reduce-scatter
  (``fully_shard``), one all-reduce (``replicate``), or both (HSDP) per group, over the
  gradients of every micro-batch, then the parameters are resharded;
* a stage whose FSDP2 modules were given ``reshard_after_forward=True`` *explicitly*
  frees its parameters after every action instead, unless the next action of the rank
  uses the same stage (less memory, one all-gather per run of consecutive uses). By
  default the all-gather a step needs is *prefetched*: it is started asynchronously
  before the compute of the rank's previous step (in schedule order, derived from the
  rank's plan), so it overlaps that compute, and waited for right before the step's
  compute (by FSDP2's hooks in forwards and backwards; a ``W``, which runs no module
  hook, waits before it runs). :func:`set_prefetch` turns this off (the all-gather is
  then started after the previous step's compute: less memory held, no overlap).

DualPipe's mirrored copies then sum their local gradient shards (both copies hold the
same shard: checked at construction). Anything this cannot run exactly is refused at
construction or at the first step with an error that says what to do.

On gloo (CPU) FSDP2's collectives of a step (all-gathers and reductions) are waited for
with the pipeline's failure check (:func:`dualpipe.transport.guarded.polled_collectives`):
a failure anywhere in the job ends a collective that waits for a replica that will never
join it within about a second, with the failed rank's message; that group is then left
with a collective in flight and refused from then on (build new process groups).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..runtime.extension import Extension, PipelineInfo
from ..runtime.plan import ExecutionPlan, PlannedStep
from ..schedules.actions import Op
from ..transport.guarded import check_group, polled_collectives

__all__ = ["FSDPExtension", "extension_for", "set_prefetch", "stage_param_groups"]


def _fsdp_api() -> Any:
    """The FSDP2 module (``torch.distributed.fsdp``), or None if this torch lacks it or
    nothing imported it yet (then no module can be wrapped in FSDP2)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    try:
        import torch.distributed.fsdp as fsdp

        return fsdp if hasattr(fsdp, "FSDPModule") else None
    except ImportError:  # pragma: no cover
        return None


def _state_of(module: nn.Module) -> Any:
    """The FSDP2 state of ``module`` (``fully_shard`` or FSDP2's ``replicate``), or None."""
    from torch.distributed._composable_state import _get_module_state
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    state = _get_module_state(module)
    return state if isinstance(state, FSDPState) else None


@dataclass
class _GroupSettings:
    """A parameter group's settings as the user left them (restored after the step)."""

    reduce_grads: bool
    all_reduce_grads: bool
    reshard_after_backward: bool
    post_forward_mesh_info: Any


@dataclass
class _Stage:
    """One of the rank's stage modules and the FSDP2 states inside it.

    Attributes:
        index: position in ``pipeline.module``.
        module: the stage module.
        states: every FSDP2 state in the module's subtree, in ``modules()`` order.
        owners: for each state, a module it manages (to call ``unshard``/``reshard``).
        groups: every parameter group of those states, in order.
        reshard: this step frees the parameters after every use (see module docstring).
        saved: the user's settings of every group during a step.
        saved_last: the user's ``is_last_backward`` of every state context.
        reduced: the stage's reduction ran this step.
    """

    index: int
    module: nn.Module
    states: list[Any]
    owners: list[nn.Module]
    groups: list[Any]
    reshard: bool = False
    saved: list[_GroupSettings] = field(default_factory=list)
    saved_last: list[tuple[Any, bool]] = field(default_factory=list)
    reduced: bool = False


def stage_param_groups(module: nn.Module) -> tuple[list[Any], list[nn.Module], list[Any]]:
    """``(states, owners, groups)``: the FSDP2 states in ``module``'s subtree (each once, in
    ``modules()`` order), one module each state manages, and their parameter groups."""
    states: list[Any] = []
    owners: list[nn.Module] = []
    seen: set[int] = set()
    for m in module.modules():
        state = _state_of(m)
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        states.append(state)
        owners.append(m)
    groups = [g for s in states for g in s._fsdp_param_groups]
    return states, owners, groups


def _is_sharded_group(group: Any) -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo

    return isinstance(group.mesh_info, FSDPMeshInfo)


def _refuse(pipeline: PipelineInfo, stages: list[_Stage]) -> None:
    """Raise for what the extension cannot run exactly (see the messages)."""
    from ..overlap.parted import PartedStage

    where = f"rank {pipeline.rank}"
    local = {id(m): i for i, m in enumerate(pipeline.modules)}
    for stage in stages:
        name = f"{where}, pipeline.module[{stage.index}]"
        if isinstance(stage.module, PartedStage):
            raise ValueError(
                f"{name}: a stage written as parts (PartedStage) cannot be wrapped in FSDP2 "
                "(its parts bypass the module's forward hooks that all-gather the "
                "parameters); use an ordinary nn.Module stage with FSDP2"
            )
        inside = {id(m) for m in stage.module.modules()}
        for group in stage.groups:
            for m in group.modules:
                if id(m) not in inside:
                    other = local.get(id(m))
                    raise ValueError(
                        f"{name}: one FSDP2 parameter group spans more than one stage "
                        f"(it also manages {type(m).__name__}"
                        + (f", pipeline.module[{other}]" if other is not None else "")
                        + "); call fully_shard/replicate on each stage (or on modules "
                        "inside one stage) separately"
                    )
            if len(group.modules) > 1:
                raise ValueError(
                    f"{name}: fully_shard([module, ...]) groups are not supported in a "
                    "pipeline stage; call fully_shard on each module (or on the stage)"
                )
        managed = {id(fp.sharded_param) for g in stage.groups for fp in g.fsdp_params}
        loose = [n for n, p in stage.module.named_parameters()
                 if p.requires_grad and id(p) not in managed]
        if loose:
            raise ValueError(
                f"{name}: parameters {loose[:4]}{'...' if len(loose) > 4 else ''} require "
                "grad but no FSDP2 module of the stage manages them, so nothing would reduce "
                "their gradients over the data-parallel ranks; apply fully_shard/replicate to "
                "the stage module itself (after its submodules), or freeze them"
            )
    # a weight tied between two stages, sharded by two fully_shard calls: two copies now
    owner: dict[int, tuple[int, str]] = {}
    for stage in stages:
        for g in stage.groups:
            for fp in g.fsdp_params:
                uid = getattr(fp, "_orig_param_uid", None)
                name = getattr(fp, "_param_fqn", None) or fp._module_info.param_name
                if uid is None:
                    continue
                if uid in owner and owner[uid][0] != stage.index:
                    raise ValueError(
                        f"{where}: a parameter shared by pipeline.module[{owner[uid][0]}] "
                        f"({owner[uid][1]}) and pipeline.module[{stage.index}] ({name}) was "
                        "sharded by two fully_shard/replicate calls, which breaks the tie (two "
                        "independent copies); tied weights across stages are not supported "
                        "with FSDP2 stages: untie them"
                    )
                owner.setdefault(uid, (stage.index, name))


class FSDPExtension(Extension):
    """Runs the FSDP2 (``fully_shard``/``replicate``) stages of one pipeline on one rank
    (see the module docstring). Built by :func:`extension_for`."""

    name = "fsdp2"

    def __init__(self, pipeline: PipelineInfo, stages: list[_Stage]) -> None:
        """Check the stages (raises for what cannot run exactly)."""
        self.stages = stages
        self.by_index = {s.index: s for s in stages}
        self.pipeline = pipeline
        self.prefetch = True
        """Resharding stages: start the all-gather of the next step before the current
        step's compute (see :func:`set_prefetch`)."""
        self._training = False
        self._next: dict[int, PlannedStep | None] = {}
        self.transport = getattr(pipeline.pipeline, "transport", None)
        self.process_groups = _process_groups(stages)
        self._polled = contextlib.ExitStack()  # the step's collectives: failure-checked
        _refuse(pipeline, self.stages)
        for stage in self.stages:
            self._wants_reshard(stage)  # refuses reshard_after_forward=<int> now

    # ------------------------------------------------------------------ hooks

    def step_plan(self, plan: ExecutionPlan) -> None:
        """Remember which step follows which (the look-ahead of the prefetch)."""
        steps = plan.steps
        self._next = {id(s): steps[i + 1] if i + 1 < len(steps) else None
                      for i, s in enumerate(steps)}

    def before_step(self, training: bool) -> None:
        """Take over the reduction of every group (and keep parameters unsharded unless the
        stage asked to reshard after forward)."""
        fsdp = _fsdp_api()
        if fsdp is not None and isinstance(self.pipeline.pipeline, fsdp.FSDPModule):
            raise ValueError(
                "the pipeline itself is wrapped in fully_shard/replicate: wrap each stage "
                "module instead (before building the pipeline)"
            )
        self._training = training
        if self.transport is not None:
            for group in self.process_groups:  # one left with a collective in flight
                check_group(group, self.transport)
            # a replica that failed never joins: FSDP2's collectives of the step wait with
            # the job's failure check (gloo; device streams are left alone)
            self._polled.enter_context(
                polled_collectives(self.transport, "an FSDP2 collective of the step"))
        for stage in self.stages:
            stage.reduced = False
            stage.saved = [
                _GroupSettings(g.reduce_grads, g.all_reduce_grads, g.reshard_after_backward,
                               g.post_forward_mesh_info)
                for g in stage.groups
            ]
            stage.reshard = self._wants_reshard(stage)
            stage.saved_last = [(s._state_ctx, s._state_ctx.is_last_backward)
                                for s in stage.states]
            for g in stage.groups:  # FSDP2 neither reduces nor reshards by itself
                g.reduce_grads = False
                g.all_reduce_grads = False
                g.reshard_after_backward = False
                g.post_forward_mesh_info = None
            for s in stage.states:
                s._state_ctx.is_last_backward = False

    def after_stage_backward(self, stage_index: int) -> None:
        """The stage's last backward work of the step ran: reduce its gradients once."""
        stage = self.by_index.get(stage_index)
        if stage is None or stage.reduced:
            return
        stage.reduced = True
        self._restore(stage)
        if self.transport is None:
            _reduce(stage)
            return
        with polled_collectives(self.transport, "FSDP2's gradient reduction of "
                                f"pipeline.module[{stage_index}]"):
            _reduce(stage)

    def after_step(self, training: bool) -> None:
        """Restore settings; reshard what inference left unsharded; check every stage
        reduced in a training step."""
        self._next = {}
        self._polled.close()
        missing = [s.index for s in self.stages if training and not s.reduced]
        for stage in self.stages:
            _settle(stage)  # (none expected: every prefetch was for an action that ran)
            if not stage.reduced:
                self._restore(stage)
                for g in stage.groups:
                    g.reshard()
        if missing:
            raise RuntimeError(
                f"the gradients of pipeline.module{missing} were never reduced (no backward "
                "action of theirs ran in this step)"
            )

    def step_failed(self) -> None:
        """Restore the user's settings and FSDP2's per-iteration state, and drop the
        failed step's unreduced gradients (no communication: an all-gather started
        ahead is dropped, not waited for)."""
        self._next = {}
        self._polled.close()
        for stage in self.stages:
            _drop_pending(stage)
            if not stage.reduced and stage.saved:
                self._restore(stage)
            stage.reduced = False
            try:  # best effort: the step's own error is what the caller gets
                for state in stage.states:
                    if state._is_root:
                        state._reset_iter_state()
                for g in stage.groups:
                    for fp in g.fsdp_params:
                        fp.unsharded_accumulated_grad = None
                        if hasattr(fp, "_unsharded_param"):
                            fp._unsharded_param.grad = None
                    g.reshard()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        """Drop any all-gather still pending (none after a step that ended; no
        communication)."""
        self._next = {}
        for stage in self.stages:
            _drop_pending(stage)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _wants_reshard(stage: _Stage) -> bool:
        """Whether the user asked this stage to reshard after forward explicitly."""
        wants = False
        for state in stage.states:
            for g in state._fsdp_param_groups:
                if not _is_sharded_group(g) or g.post_forward_mesh_info is None:
                    continue
                if g._use_post_forward_mesh:
                    raise ValueError(
                        f"pipeline.module[{stage.index}]: reshard_after_forward=<int> "
                        "(resharding to a smaller mesh) is not supported in a pipeline "
                        "stage; pass reshard_after_forward=True (free after every use) or "
                        "False/None (all-gather once per step)"
                    )
                if state._auto_reshard_after_forward is False:
                    wants = True
        return wants

    @staticmethod
    def _restore(stage: _Stage) -> None:
        """Give the stage's groups and contexts back the settings saved before the step."""
        roots = {id(g) for s in stage.states if s._is_root and s._auto_reshard_after_forward
                 for g in s._fsdp_param_groups}
        for g, saved in zip(stage.groups, stage.saved, strict=True):
            g.reduce_grads = saved.reduce_grads
            g.all_reduce_grads = saved.all_reduce_grads
            g.reshard_after_backward = saved.reshard_after_backward
            # (a root found in this step's lazy init keeps FSDP2's default: no reshard)
            g.post_forward_mesh_info = None if id(g) in roots else saved.post_forward_mesh_info
        for ctx, last in stage.saved_last:
            ctx.is_last_backward = last
        stage.saved = []
        stage.saved_last = []

    def _modules_of(self, step: PlannedStep) -> list[tuple[_Stage, Op]]:
        out = []
        for a in step.actions:
            stage = self.by_index.get(a.module)
            if stage is not None:
                out.append((stage, a.action.op))
        return out

    def before_action(self, step: PlannedStep) -> None:
        """Resharding stages: start the all-gathers of this step's stages (normally on
        their way since the previous step) and, with prefetching, of the stages the next
        step adds, before this step's compute; a ``W`` waits for its stage's parameters
        here (FSDP2's hooks do not run for it)."""
        if not self._resharding():
            return
        mine = self._modules_of(step)
        if self.prefetch:
            _start_unshard(mine)
            following = self._next.get(id(step))
            if following is not None:
                here = {id(s) for s, _ in mine}
                _start_unshard([(s, op) for s, op in self._modules_of(following)
                                if id(s) not in here])
        if self._training:
            for stage, op in mine:
                if stage.reshard and op is Op.WEIGHT:
                    for owner in stage.owners:
                        owner.unshard()  # type: ignore[operator]  # waits for a prefetch

    def after_action(self, step: PlannedStep, following: PlannedStep | None) -> None:
        """Resharding stages: free the parameters after every use, unless the following
        step uses the same stage; without prefetching, start the all-gather of the
        stages the following step uses now."""
        if not self._resharding():
            return
        upcoming = {id(s) for s, _ in self._modules_of(following)} if following else set()
        for stage, _ in self._modules_of(step):
            if stage.reshard and not stage.reduced and id(stage) not in upcoming:
                _settle(stage)
                for g in stage.groups:
                    g.reshard()
        if following is not None and not self.prefetch:
            _start_unshard(self._modules_of(following))

    def _resharding(self) -> bool:
        return any(stage.reshard for stage in self.stages)


def _start_unshard(uses: list[tuple[_Stage, Op]]) -> None:
    """Start the all-gather of every group of the resharding stages in ``uses`` that is
    neither unsharded nor on its way (FSDP2's ``unshard(async_op=True)``; waited for by
    its pre-forward/pre-backward hook or an explicit ``unshard()``)."""
    seen: set[int] = set()
    for stage, _ in uses:
        if not stage.reshard or stage.reduced or id(stage) in seen:
            continue
        seen.add(id(stage))
        for g in stage.groups:
            if g.is_unsharded or g._all_gather_result is not None:
                continue
            g.lazy_init()
            g.unshard(async_op=True)


def _settle(stage: _Stage) -> None:
    """Finish an all-gather of ``stage`` that no hook waited for (so none is left behind
    to be mistaken for current parameters later)."""
    for g in stage.groups:
        if g._all_gather_result is not None:
            g.wait_for_unshard()


def _drop_pending(stage: _Stage) -> None:
    """Forget the all-gathers of ``stage`` still on their way without waiting (a failed
    step: the peers may never join them); their results are never used."""
    for g in stage.groups:
        g._all_gather_result = None


def _process_groups(stages: list[_Stage]) -> list[Any]:
    """Every process group the stages' FSDP2 parameter groups communicate on (each once)."""
    out: list[Any] = []
    for stage in stages:
        for g in stage.groups:
            for name in ("shard_process_group", "reduce_scatter_process_group",
                         "replicate_process_group"):
                pg = getattr(g.mesh_info, name, None)
                if pg is not None and all(pg is not q for q in out):
                    out.append(pg)
    return out


def _reduce(stage: _Stage) -> None:
    """FSDP2's post-backward for every group of ``stage``, once: reduce-scatter (or
    all-reduce) the accumulated unsharded gradients into the sharded ``.grad`` and
    reshard, then FSDP2's end-of-backward bookkeeping (wait for the reductions)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    done: set[int] = set()
    for state in stage.states:
        if state._is_root:
            # runs post_backward for every group of its tree that has not run it since the
            # last engine call (all of them: each engine call's callback left them IDLE)
            state._root_post_backward_final_callback()
            done.update(id(s) for s in state._state_ctx.all_states)
    for state in stage.states:
        if id(state) in done:
            continue
        for g in reversed(state._fsdp_param_groups):  # never ran forward (lazily uninit)
            if g._training_state != TrainingState.POST_BACKWARD:
                g.post_backward()
            g._training_state = TrainingState.IDLE
            g.finalize_backward()


def extension_for(pipeline: PipelineInfo) -> FSDPExtension | None:
    """The FSDP2 extension of ``pipeline``, or None when none of its stages contains an
    FSDP2 module (the factory registered with the runtime)."""
    if _fsdp_api() is None:
        return None
    stages = []
    for i, module in enumerate(pipeline.modules):
        states, owners, groups = stage_param_groups(module)
        if states:
            stages.append(_Stage(i, module, states, owners, groups))
    if not stages:
        return None
    return FSDPExtension(pipeline, stages)


def set_prefetch(pipeline: nn.Module, enabled: bool) -> None:
    """Turn the prefetch of the resharding stages' all-gathers on (the default) or off
    for ``pipeline`` (a :class:`~dualpipe.Pipeline` whose stages are wrapped in FSDP2),
    from its next step on.

    On, the all-gather of a stage the rank's next step needs is started before the
    current step's compute and overlaps it; the next step's parameters are then held
    during the current step too. Off, it starts after the current step's compute (less
    memory held, no overlap). The number of all-gathers is the same either way. Stages
    that keep their parameters for the whole step (no ``reshard_after_forward=True``)
    are not affected.

    Raises:
        ValueError: no stage of ``pipeline`` on this rank is wrapped in FSDP2.
    """
    found = [ext for ext in getattr(pipeline, "extensions", ())
             if isinstance(ext, FSDPExtension)]
    if not found:
        raise ValueError(
            "set_prefetch: no stage of this pipeline on this rank is wrapped in FSDP2 "
            "(fully_shard); wrap the stage modules before building the pipeline"
        )
    for ext in found:
        ext.prefetch = bool(enabled)
