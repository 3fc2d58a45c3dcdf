"""Expert parallelism: each rank of an EP group holds ``E / ep_size`` experts and exchanges tokens.

The model code is not touched: :func:`apply_expert_parallel` slices the experts' stacks in place (the
parameters keep their names, so checkpoints map back) and gives each experts module a forward that routes,
dispatches rows with ``all_to_all_single``, computes the local experts with :func:`moefuse.fused_experts` and
combines back. Everything else (attention, norms, router, embeddings) stays replicated, for DDP or FSDP2 to
synchronise; the expert parameters are excluded from both (see :func:`expert_parameters`).

Gradients: a rank's expert parameters receive the gradient of every EP rank's loss through the backward
all-to-all. To match the averaging of DDP/FSDP over ``mesh.size()`` data-parallel ranks, the expert gradients
are summed over the replicas of the expert shard (the mesh's other dimension, if any) and divided by
``gradient_divide_factor`` (default ``mesh.size()``); pass ``gradient_divide_factor=1`` for the plain gradient
of the sum of the ranks' losses.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from ..experts import experts_structure, stacked_expert_weights
from ..ops.lora import ExpertsLora
from ..ops.moe import fused_experts
from ..ops.routing import check_top_k_index, route
from .all_to_all import combine, dispatch, plan_dispatch


class _ReduceExpertGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the expert shard's replicas and divides it."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, replica_group: ProcessGroup | None, divide_factor: float):
        ctx.replica_group, ctx.divide_factor = replica_group, divide_factor
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad / ctx.divide_factor
        if ctx.replica_group is not None:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.replica_group)
        return grad, None, None


def expert_parallel_fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    group: ProcessGroup,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lora: Sequence[ExpertsLora] = (),
) -> torch.Tensor:
    """:func:`moefuse.fused_experts` with the experts spread over the ranks of ``group``.

    Args:
        hidden_states: ``[T, H]`` this rank's tokens.
        gate_up_proj: ``[L, 2I, H]`` this rank's experts, global ids ``[rank * L, (rank + 1) * L)``.
        down_proj: ``[L, H, I]``.
        top_k_index: ``[T, K]`` global expert ids (``0 .. L * group size - 1``).
        top_k_weights: ``[T, K]`` routing weights (their gradient stays on this rank).
        group: the expert-parallel process group; every rank of it must call this together.
        act_fn, gate_fn, gate_up_bias, down_bias, post_fn, lora: as in :func:`moefuse.fused_experts`, for the
            local experts (biases ``[L, ...]``, LoRA factors ``[L, ...]``). Each expert's output, its bias and
            post-expert function included, comes back to the token's rank, which applies the routing weights.

    Returns:
        ``[T, H]``, equal to :func:`moefuse.fused_experts` on the full expert stacks.
    """
    num_experts = gate_up_proj.shape[0] * dist.get_world_size(group)
    check_top_k_index(top_k_index, num_experts)
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights {tuple(top_k_weights.shape)} must have the shape of top_k_index {tuple(top_k_index.shape)}"
        )
    num_tokens, hidden = hidden_states.shape
    routing = route(top_k_index, num_experts)
    plan = plan_dispatch(routing.m_sizes, group)
    received = dispatch(hidden_states[routing.token_index], plan, group)
    # The local experts as a top-1 MoE over the received rows (weight 1: the routing weights are applied
    # on the tokens' own rank, where the router's gradient belongs).
    expert_out = fused_experts(
        received,
        gate_up_proj,
        down_proj,
        plan.local_expert_index.unsqueeze(1),
        received.new_ones(received.shape[0], 1),
        act_fn=act_fn,
        gate_fn=gate_fn,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        post_fn=post_fn,
        lora=lora,
    )
    y = combine(expert_out, plan, group)[routing.inverse].view(num_tokens, routing.top_k, hidden)
    return (y * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1).to(hidden_states.dtype)


@dataclass(frozen=True)
class ExpertParallelShard:
    """What :func:`apply_expert_parallel` records on each experts module (``module.expert_parallel``)."""

    group: ProcessGroup
    replica_group: ProcessGroup | None
    ep_rank: int
    ep_size: int
    num_experts: int  # global
    gradient_divide_factor: float
    param_names: tuple[str, ...]  # the module's parameters sliced along the experts (stacks, biases)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_range(self) -> range:
        """Global ids of this rank's experts."""
        return range(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)


def _expert_parallel_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    shard: ExpertParallelShard = self.expert_parallel

    def reduced(t: torch.Tensor) -> torch.Tensor:
        return _ReduceExpertGrad.apply(t, shard.replica_group, shard.gradient_divide_factor)

    gate_up_proj, down_proj = (reduced(w) for w in stacked_expert_weights(self))
    structure = experts_structure(self)  # gating, this rank's biases, post-expert function
    for bias in ("gate_up_bias", "down_bias"):
        if bias in structure:
            structure[bias] = reduced(structure[bias])
    return expert_parallel_fused_experts(
        hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, group=shard.group, **structure
    )


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module (one holding ``gate_up_proj`` and ``down_proj`` stacks)."""
    for name, module in model.named_modules():
        gate_up = getattr(module, "gate_up_proj", None)
        if isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3 and hasattr(module, "down_proj"):
            yield name, module


def _ep_and_replica_groups(mesh: DeviceMesh, ep_dim: str) -> tuple[ProcessGroup, ProcessGroup | None]:
    if mesh.ndim == 1:
        return mesh.get_group(0), None
    if mesh.ndim != 2 or mesh.mesh_dim_names is None or ep_dim not in mesh.mesh_dim_names:
        raise ValueError(
            f"apply_expert_parallel takes a 1-D mesh (the EP group) or a 2-D mesh with a dimension named "
            f"'{ep_dim}', got shape {tuple(mesh.shape)} with names {mesh.mesh_dim_names}; build it with "
            "moefuse.parallel.init_expert_parallel_mesh"
        )
    replica_dim = next(n for n in mesh.mesh_dim_names if n != ep_dim)
    replica_group = mesh.get_group(replica_dim) if mesh[replica_dim].size() > 1 else None
    return mesh.get_group(ep_dim), replica_group


def apply_expert_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    ep_dim: str = "ep",
    gradient_divide_factor: float | None = None,
) -> nn.Module:
    """Shard the experts of ``model`` in place over the expert-parallel ranks of ``mesh``.

    Args:
        model: a model whose experts store ``gate_up_proj`` / ``down_proj`` stacks, experts first (any
            structure :func:`moefuse.experts.experts_structure` takes: biases, a family's own gate, a
            post-expert norm). Parameters may be on the meta device (sharding before loading).
        mesh: a 1-D mesh (all its ranks form one EP group) or a 2-D mesh whose ``ep_dim`` dimension is the EP
            group and whose other dimension holds replicas of the same expert shard (their expert gradients
            are summed), e.g. from :func:`init_expert_parallel_mesh`.
        gradient_divide_factor: expert gradients are divided by it; default ``mesh.size()``, the averaging
            DDP/FSDP apply to the dense parameters over all ranks.

    Returns:
        ``model``: each experts module keeps its per-expert parameters (stacks and biases) under their names,
        holding its rank's ``E / ep_size`` experts, records an :class:`ExpertParallelShard` as ``module.expert_parallel``,
        and is skipped by DDP (``DistributedDataParallel(model)`` works as is).
    """
    group, replica_group = _ep_and_replica_groups(mesh, ep_dim)
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    divide_factor = float(mesh.size() if gradient_divide_factor is None else gradient_divide_factor)
    modules = list(experts_modules(model))
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no experts module with gate_up_proj [E, 2I, H] and down_proj [E, H, I] "
            "stacks; expert parallelism needs a Transformers 5.x MoE model"
        )
    experts_ids = {id(module) for _, module in modules}
    for name, module in model.named_modules():
        if id(getattr(module, "base_layer", None)) in experts_ids:
            raise ValueError(
                f"{name} puts LoRA on the experts, which expert parallelism does not shard yet; apply "
                "expert parallelism without expert LoRA (target attention only) or train with ep_size=1"
            )
    ignored = []
    for name, module in modules:
        if hasattr(module, "expert_parallel"):
            raise ValueError(f"{name} is already expert-parallel; apply_expert_parallel once per model")
        experts_structure(module)  # a structure moefuse cannot compute is refused here, by name
        num_experts = module.gate_up_proj.shape[0]
        if num_experts % ep_size:
            raise ValueError(
                f"{name} has {num_experts} experts, not divisible by ep_size={ep_size}; pick an ep_size that "
                f"divides {num_experts}"
            )
        # The stacks and the per-expert biases; a post-expert norm's weight (a submodule's) stays replicated.
        param_names = tuple(
            n for n, p in module.named_parameters(recurse=False) if p.dim() and p.shape[0] == num_experts
        )
        shard = ExpertParallelShard(
            group, replica_group, ep_rank, ep_size, num_experts, divide_factor, param_names
        )
        local = slice(shard.expert_range.start, shard.expert_range.stop)
        for param_name in param_names:
            full = getattr(module, param_name)
            setattr(module, param_name, nn.Parameter(full[local].clone(), requires_grad=full.requires_grad))
            ignored.append(f"{name}.{param_name}" if name else param_name)
        module.expert_parallel = shard
        module.forward = types.MethodType(_expert_parallel_forward, module)
    # DDP must not average expert gradients: ranks hold different experts.
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return model


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The expert-parallel parameters of ``model``: pass them as ``fully_shard(..., ignored_params=...)``."""
    return {
        p
        for _, module in experts_modules(model)
        if hasattr(module, "expert_parallel")
        for p in (getattr(module, n) for n in module.expert_parallel.param_names)
    }


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) of an expert-parallel model after DDP/FSDP2 synchronised the
    dense gradients: the expert gradients, which differ between EP ranks, are counted once per EP group, so
    every rank finds the same norm and clips its dense replicas alike. Returns the total norm."""
    experts = expert_parameters(model)
    dense = [p for p in model.parameters() if p.grad is not None and p not in experts]
    local = [p for p in experts if p.grad is not None]
    dense_norm = torch.nn.utils.get_total_norm([p.grad for p in dense])
    if hasattr(dense_norm, "full_tensor"):  # FSDP2's DTensor gradients
        dense_norm = dense_norm.full_tensor()
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in local]).to(dense_norm) ** 2
    groups = {
        id(m.expert_parallel.group): m.expert_parallel.group
        for _, m in experts_modules(model)
        if hasattr(m, "expert_parallel")
    }
    for group in groups.values():
        dist.all_reduce(expert_sq, group=group)
    total = (dense_norm**2 + expert_sq).sqrt()
    # A Python float scales plain and DTensor gradients alike (torch's foreach clipping cannot mix them).
    coefficient = min(1.0, max_norm / (float(total) + 1e-6))
    if coefficient < 1.0:
        for p in dense + local:
            p.grad.mul_(coefficient)
    return total


def init_expert_parallel_mesh(ep_size: int, device_type: str | None = None) -> DeviceMesh:
    """The ``("dp", "ep")`` mesh of all ranks (``torchrun`` sets them up): ``ep_size`` ranks share the experts,
    ``world_size / ep_size`` replicas of that split. Initialises the process group (NCCL on CUDA, gloo on CPU)
    if needed."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    world_size = dist.get_world_size()
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(
            f"ep_size={ep_size} must divide the {world_size} processes; launch with "
            f"torchrun --nproc-per-node a multiple of {ep_size}"
        )
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
