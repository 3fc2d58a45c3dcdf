"""Routing: group the (token, k) assignments of a top-k router by expert.

Every grouped-GEMM path needs the rows of one expert to be contiguous. ``route`` computes, from
``top_k_index [T, K]``, the order of the ``S = T * K`` assignments sorted by expert, the number of rows
per expert and the inverse order used to bring expert outputs back to their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import use_triton


@dataclass(frozen=True)
class ExpertRouting:
    """Assignments of tokens to experts, grouped by expert.

    Attributes:
        m_sizes: ``[E]`` int64, rows routed to each expert (experts may receive zero rows).
        sorted_slots: ``[S]`` int64, for each grouped row the flat assignment index ``t * K + k``.
        token_index: ``[S]`` int64, for each grouped row the token it came from (``sorted_slots // K``).
        inverse: ``[S]`` int64, for each flat assignment ``t * K + k`` its row in the grouped order (-1 for an id
            out of range, which the Triton path leaves out of every expert).
        top_k: K, assignments per token.
        offsets: ``[E]`` int32, each expert's end row in the grouped order (``m_sizes``' inclusive cumulative sum,
            as ``torch.nn.functional.grouped_mm`` takes its ``offs``): made once here, since on a GPU every
            ``torch.cumsum`` of its own costs host time (a scan's launches and scratch; docs/measurements.md).
        on_triton: the copies and sums below run on the Triton kernels (decided once, by :func:`route`'s caller).
    """

    m_sizes: torch.Tensor
    sorted_slots: torch.Tensor
    token_index: torch.Tensor
    inverse: torch.Tensor
    top_k: int
    offsets: torch.Tensor
    on_triton: bool = False

    @property
    def num_experts(self) -> int:
        return self.m_sizes.numel()

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x[token_index]``: the token rows ``x [T, H]`` copied into grouped order ``[S, H]``.

        On the Triton backend token by token (:func:`~moefuse.kernels.routing.grouped_rows_kernel`): each row of
        ``x`` is read once and stored at its ``K`` grouped rows, where ``index_select`` reads every token ``K``
        times (the comparison: docs/measurements.md).
        """
        if x.dim() != 2 or x.stride(1) != 1 or not self.on_triton:
            return x.index_select(0, self.token_index)
        from ..kernels.routing import grouped_rows_kernel
        from .launch import cdiv, launch

        tokens, width = x.shape
        out = x.new_empty(self.token_index.numel(), width)
        if out.numel() == 0:
            return out
        launch(
            grouped_rows_kernel,
            lambda meta: (cdiv(tokens, meta["BLOCK_T"]), cdiv(width, meta["BLOCK_H"])),
            x_ptr=x,
            grouped_row_ptr=self.inverse,
            out_ptr=out,
            T=tokens,
            H=width,
            top_k=self.top_k,
            stride_x=x.stride(0),
            stride_out=out.stride(0),
            BLOCK_T=GROUPED_ROWS_BLOCK[0],
            BLOCK_H=GROUPED_ROWS_BLOCK[1],
            num_warps=4,
        )
        return out

    def token_sums(self, y: torch.Tensor) -> torch.Tensor:
        """Each token's ``K`` rows of ``y [S, H]`` (grouped order) summed: ``[T, H]``, the combine of expert
        outputs computed in grouped order. Summed in fp32 and rounded once, in ``k`` order; on the Triton backend
        one kernel (:func:`~moefuse.kernels.routing.token_sums_kernel`; its cost: docs/measurements.md)."""
        tokens, width = self.inverse.numel() // max(1, self.top_k), y.shape[1]
        if y.stride(1) != 1 or not self.on_triton:
            return y.index_select(0, self.inverse).view(tokens, self.top_k, width).sum(dim=1)
        from ..kernels.routing import token_sums_kernel
        from .launch import cdiv, launch, next_power_of_2

        out = y.new_empty(tokens, width)
        if out.numel() == 0:
            return out
        block_h = min(TOKEN_SUMS_COLUMNS, next_power_of_2(width))
        launch(
            token_sums_kernel,
            lambda meta: (tokens, cdiv(width, block_h)),
            y_ptr=y,
            grouped_row_ptr=self.inverse,
            out_ptr=out,
            T=tokens,
            H=width,
            stride_y=y.stride(0),
            stride_out=out.stride(0),
            TOP_K=self.top_k,
            BLOCK_T=1,
            BLOCK_H=block_h,
            num_warps=4,
        )
        return out


def check_top_k_index(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Raise a clear error when ``top_k_index`` is not a ``[T, K]`` integer tensor of expert ids in range."""
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be 2-D [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    # A compiled graph cannot read the ids on the host; a compiled model's router picks them in range.
    if top_k_index.numel() == 0 or torch.compiler.is_compiling():
        return
    # One host sync; the Triton routing path validates on the device instead.
    lo, hi = int(top_k_index.min()), int(top_k_index.max())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"top_k_index holds expert id {bad}, outside [0, {num_experts}) for {num_experts} experts"
        )


# Assignments per program of the Triton routing kernels (each sorts its block in registers).
ROUTING_BLOCK = 1024
# Token rows x columns per program of ExpertRouting.grouped's copy; columns per program of its token_sums (one
# token each). Fixed, not tuned: neighbouring sizes measured alike (docs/measurements.md).
GROUPED_ROWS_BLOCK = (16, 256)
TOKEN_SUMS_COLUMNS = 1024


def _route_triton(flat: torch.Tensor, num_experts: int, top_k: int) -> ExpertRouting:
    from ..kernels.routing import routing_count_kernel, routing_scatter_kernel
    from .launch import cdiv, launch, next_power_of_2

    rows, device = flat.numel(), flat.device
    block = min(ROUTING_BLOCK, next_power_of_2(rows))
    bins = next_power_of_2(num_experts + 1)  # one spare bin for padding and ids out of range
    num_blocks = cdiv(rows, block)
    counts = torch.empty(num_blocks, num_experts, device=device, dtype=torch.int32)
    base = torch.empty(num_blocks, bins, device=device, dtype=torch.int32)
    m_sizes = torch.empty(num_experts, device=device, dtype=torch.long)
    offsets = torch.empty(num_experts, device=device, dtype=torch.int32)
    sorted_slots = torch.empty(rows, device=device, dtype=torch.long)
    token_index = torch.empty(rows, device=device, dtype=torch.long)
    inverse = torch.empty(rows, device=device, dtype=torch.long)
    grid = lambda meta: (num_blocks,)  # noqa: E731
    launch(
        routing_count_kernel,
        grid,
        ids_ptr=flat,
        counts_ptr=counts,
        S=rows,
        E=num_experts,
        BLOCK=block,
        BINS=bins,
        num_warps=4,
    )
    launch(
        routing_scatter_kernel,
        grid,
        ids_ptr=flat,
        counts_ptr=counts,
        base_ptr=base,
        m_sizes_ptr=m_sizes,
        offsets_ptr=offsets,
        sorted_slots_ptr=sorted_slots,
        token_index_ptr=token_index,
        grouped_row_ptr=inverse,
        S=rows,
        E=num_experts,
        num_blocks=num_blocks,
        top_k=top_k,
        BLOCK=block,
        BINS=bins,
        CHUNK=max(1, 4096 // bins),
        num_warps=4,
    )
    return ExpertRouting(
        m_sizes=m_sizes,
        sorted_slots=sorted_slots,
        token_index=token_index,
        inverse=inverse,
        top_k=top_k,
        offsets=offsets,
        on_triton=True,
    )


def route(top_k_index: torch.Tensor, num_experts: int, *, on_triton: bool | None = None) -> ExpertRouting:
    """Group the assignments in ``top_k_index [T, K]`` by expert (stable: token order kept inside an expert).

    No host sync. On the Triton backend two kernels (a counting sort, :mod:`moefuse.kernels.routing`); otherwise
    PyTorch ops (a stable sort and a scatter-add; no ``bincount``, whose output size costs a host sync on CUDA).
    Ids outside ``[0, num_experts)`` are the caller's to rule out (:func:`check_top_k_index`). ``on_triton``: the
    experts plan's backend (default: the settings' backend for this device).
    """
    top_k = top_k_index.shape[-1]
    if on_triton is None:
        on_triton = use_triton(top_k_index)
    if top_k_index.numel() and on_triton:
        return _route_triton(top_k_index.reshape(-1), num_experts, top_k)
    flat = top_k_index.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    m_sizes = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(sorted_slots).scatter_(
        0, sorted_slots, torch.arange(flat.numel(), device=flat.device)
    )
    return ExpertRouting(
        m_sizes=m_sizes,
        sorted_slots=sorted_slots,
        token_index=torch.div(sorted_slots, top_k, rounding_mode="floor"),
        inverse=inverse,
        top_k=top_k,
        offsets=torch.cumsum(m_sizes, 0, dtype=torch.int32),
        on_triton=on_triton,
    )


def route_reference(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Plain-Python twin of :func:`route`, for tests."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1).tolist()
    slots = [s for e in range(num_experts) for s, fe in enumerate(flat) if fe == e]
    m_sizes = [sum(1 for fe in flat if fe == e) for e in range(num_experts)]
    device = top_k_index.device
    ends = [sum(m_sizes[: e + 1]) for e in range(num_experts)]
    return ExpertRouting(
        m_sizes=torch.tensor(m_sizes, dtype=torch.long, device=device),
        sorted_slots=torch.tensor(slots, dtype=torch.long, device=device),
        token_index=torch.tensor([s // top_k for s in slots], dtype=torch.long, device=device),
        inverse=torch.tensor([slots.index(s) for s in range(len(flat))], dtype=torch.long, device=device),
        top_k=top_k,
        offsets=torch.tensor(ends, dtype=torch.int32, device=device),
    )
