"""Token exchange between the ranks of an expert-parallel group: ``all_to_all_single`` with variable splits.

Rows sorted by global expert id are already grouped by the rank that owns the expert (rank ``r`` owns experts
``[r * L, (r + 1) * L)``), so one ``all_to_all_single`` sends every rank its rows. The per-(rank, expert)
counts are exchanged first: they give the split sizes both ways and tell each rank which of its local
experts every received row is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0; its backward is the exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad_out, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: rows ``input_splits[r]`` go to rank ``r``, ``output_splits[r]``
    rows come from it."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass(frozen=True)
class DispatchPlan:
    """The split sizes of one dispatch (and, swapped, of its combine).

    Attributes:
        send_splits: rows this rank sends to each rank of the group.
        recv_splits: rows this rank receives from each rank.
        local_expert_index: ``[sum(recv_splits)]`` the local expert (``0 .. L-1``) of every received row;
            received rows come source rank by source rank, each block sorted by expert.
    """

    send_splits: list[int]
    recv_splits: list[int]
    local_expert_index: torch.Tensor


def plan_dispatch(m_sizes: torch.Tensor, group: ProcessGroup) -> DispatchPlan:
    """Exchange the per-expert row counts ``m_sizes [E]`` (``E = L * group size``) and plan the dispatch."""
    ep_size = dist.get_world_size(group)
    send_counts = m_sizes.reshape(ep_size, -1).contiguous()  # [rank, local expert]
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # One host sync for both directions: the collective needs the splits as Python ints.
    splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    num_local = send_counts.shape[1]
    local_ids = torch.arange(num_local, device=m_sizes.device).repeat(ep_size)
    return DispatchPlan(
        send_splits=splits[0],
        recv_splits=splits[1],
        local_expert_index=torch.repeat_interleave(local_ids, recv_counts.reshape(-1)),
    )


def dispatch(rows: torch.Tensor, plan: DispatchPlan, group: ProcessGroup) -> torch.Tensor:
    """Send rows sorted by global expert to the ranks that own the experts."""
    return all_to_all(rows, plan.recv_splits, plan.send_splits, group)


def combine(rows: torch.Tensor, plan: DispatchPlan, group: ProcessGroup) -> torch.Tensor:
    """Send expert outputs back to the ranks their tokens came from (the inverse of :func:`dispatch`)."""
    return all_to_all(rows, plan.send_splits, plan.recv_splits, group)
