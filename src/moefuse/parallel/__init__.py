"""Parallelism for moefuse models, kept out of the model code (torchtitan style).

Expert parallelism (EP): :func:`apply_expert_parallel` shards the experts of a model over a device mesh and
exchanges tokens with ``all_to_all_single``; dense parameters are left to DDP or FSDP2.
"""

from .all_to_all import DispatchPlan, all_to_all, combine, dispatch, plan_dispatch
from .checkpoint import (
    expert_parallel_state_dict,
    load_expert_parallel,
    load_expert_parallel_checkpoint,
    save_expert_parallel,
)
from .expert_parallel import (
    ExpertParallelShard,
    apply_expert_parallel,
    clip_grad_norm_,
    expert_parallel_fused_experts,
    expert_parameters,
    experts_modules,
    init_expert_parallel_mesh,
)

__all__ = [
    "DispatchPlan",
    "ExpertParallelShard",
    "all_to_all",
    "apply_expert_parallel",
    "clip_grad_norm_",
    "combine",
    "dispatch",
    "expert_parallel_fused_experts",
    "expert_parallel_state_dict",
    "expert_parameters",
    "experts_modules",
    "init_expert_parallel_mesh",
    "load_expert_parallel",
    "load_expert_parallel_checkpoint",
    "plan_dispatch",
    "save_expert_parallel",
]
