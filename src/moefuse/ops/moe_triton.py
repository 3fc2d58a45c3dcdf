"""The experts on the Triton kernels: one autograd function for the whole SwiGLU experts block, LoRA included.

Forward: the gather of token rows is fused into the gate/up GEMM's loads, SwiGLU into its epilogue, and the
routing-weight multiply and the scatter of each row to its ``(token, k)`` slot into the down GEMM's epilogue (a
sum over ``k`` then combines them; no atomics anywhere, so results repeat bit for bit). A LoRA adapter adds, per projection,
one thin grouped GEMM ``t = x·Aᵀ``; ``t·Bᵀ`` is computed in the base GEMM's epilogue (a rank-deep ``tl.dot``
per tile), so neither ``W + B·A`` nor the ``[rows, out]`` LoRA term is ever written to memory. Saved for
backward: the pre-activations ``[S, 2I]``, ``h [S, I]`` (already times the routing weight when the down weight
is trained: its gradient then reads it as is) and the thin ``t``s (plus the dropout masks when dropout is on);
nothing of size ``[S, H]``.

Backward computes only what is asked for: with frozen base weights (LoRA) there is no base ``dW``. 4-bit base
weights (:mod:`moefuse.quant`) are dequantised for each GEMM that reads them (:func:`~moefuse.ops.dequantize_4bit.dense`).

On Hopper in bf16, products with nothing of ours in their epilogue run on ``torch.nn.functional.grouped_mm``
(CUTLASS) where it beat the Triton kernels when measured: the base weights' gradients
(:func:`weight_grad_on_grouped_mm`) and, at long per-expert batches, the combined products of full fine-tuning
(:func:`combine_on_grouped_mm`). The measurements behind each switch: docs/measurements.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import triton_gemm as tg
from .backend import device_capability
from .dequantize_4bit import dense
from .grouped_gemm import HAS_GROUPED_MM, grouped_mm, grouped_mm_supports, grouped_mm_weight_grad
from .lora import ExpertsLora, LoraWeights, down_factors, gate_up_factors
from .routing import ExpertRouting


def lora_dropout_p(adapter: ExpertsLora) -> float | None:
    """The dropout probability the fused path applies for ``adapter``, or ``None`` when it cannot (a custom
    callable: the composed path runs it as given)."""
    dropout = adapter.dropout
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return 0.0
    if isinstance(dropout, torch.nn.Dropout):
        return dropout.p if dropout.training else 0.0
    return None


def _mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT-style inverted dropout mask: 0 or ``1 / (1 - p)`` per element."""
    return F.dropout(torch.ones_like(like), p, training=True)


def _on_hopper_bf16(t: torch.Tensor) -> bool:
    return (
        HAS_GROUPED_MM
        and t.is_cuda
        and t.dtype == torch.bfloat16
        and device_capability(t.device.index) >= (9, 0)
    )


def _rows_per_expert(rows: int, routing: ExpertRouting) -> int:
    return rows // max(1, routing.num_experts)


# Rows per expert from which a combined product runs on grouped_mm (see combine_on_grouped_mm).
GROUPED_MM_COMBINE_ROWS = 1024


def combine_on_grouped_mm(t: torch.Tensor, rows_per_expert: int) -> bool:
    """Whether :func:`combine` runs its product on ``torch.nn.functional.grouped_mm`` (CUTLASS, grouped output)
    and sums with :meth:`ExpertRouting.token_sums`: on Hopper in bf16, from 1024 rows per expert, where it
    measured ahead of the Triton kernel with its store to each row's ``(token, k)`` slot. Below 1024 rows the two
    were level or the Triton kernel ahead, so the Triton kernels stay there (see docs/measurements.md)."""
    return rows_per_expert >= GROUPED_MM_COMBINE_ROWS and _on_hopper_bf16(t)


def combine(
    a: torch.Tensor,
    weight: torch.Tensor,
    routing: ExpertRouting,
    *,
    row_scale: torch.Tensor | None = None,
    lora: tg.LoraTerm | None = None,
) -> torch.Tensor:
    """``[T, N]``: each token's ``K`` rows of ``row_scale * (a @ weight[e]ᵀ + lora)`` summed, ``a [S, K']`` in
    grouped order, ``weight [E, N, K']`` (any strides) dense or 4-bit.

    The GEMM's epilogue stores every row at its slot ``t * K + k`` of a ``[T, K, N]`` buffer, then one sum over
    ``K``. No atomics, so results repeat bit for bit; the buffer and its sum also measured ahead of fp32 atomic
    adds into ``[T, N]`` (docs/measurements.md). Where
    :func:`combine_on_grouped_mm` says so and nothing joins the epilogue (no row scale, no LoRA, dense weights),
    the product runs on ``grouped_mm`` in grouped order and :meth:`ExpertRouting.token_sums` sums it."""
    weight = dense(weight)
    if (
        row_scale is None
        and lora is None
        and combine_on_grouped_mm(a, _rows_per_expert(a.shape[0], routing))
        and grouped_mm_supports(a, weight.transpose(1, 2))
    ):
        return routing.token_sums(grouped_mm(a, weight.transpose(1, 2), routing.m_sizes, routing.offsets))
    num_tokens = routing.inverse.numel() // routing.top_k
    width = weight.shape[1]
    slots = torch.empty(num_tokens * routing.top_k, width, device=a.device, dtype=weight.dtype)
    tg.grouped_gemm(
        a, weight, routing.m_sizes, row_scale=row_scale, lora=lora, out=slots, out_index=routing.sorted_slots
    )
    return slots.view(num_tokens, routing.top_k, width).sum(dim=1)


# Rows per expert from which the base weights' gradients run on grouped_mm (see weight_grad_on_grouped_mm).
GROUPED_MM_WEIGHT_GRAD_ROWS = 256


def weight_grad_on_grouped_mm(t: torch.Tensor, rows_per_expert: int) -> bool:
    """Whether the base weights' gradients run on ``torch.nn.functional.grouped_mm`` (CUTLASS) instead of the
    Triton kernel: on Hopper in bf16, from 256 rows per expert, where it measured ahead of the Triton kernel
    even with the gathered operands copied into grouped order first (:meth:`ExpertRouting.grouped`). Smaller
    batches were not measured, so the Triton kernel stays there (see docs/measurements.md)."""
    return rows_per_expert >= GROUPED_MM_WEIGHT_GRAD_ROWS and _on_hopper_bf16(t)


def base_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: ExpertRouting,
    *,
    gather_a: bool = False,
    gather_b: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~moefuse.ops.triton_gemm.grouped_weight_grad` for an expert stack's gradient ``[E, N, K]``, ``a`` or
    ``b`` read through ``routing.token_index`` when gathered. Where :func:`weight_grad_on_grouped_mm` says so (and
    no row scale is asked), a gathered operand is copied into grouped order (a transient ``[rows, ·]``,
    :meth:`ExpertRouting.grouped`) and the product runs on ``grouped_mm``."""
    m_sizes, token_index = routing.m_sizes, routing.token_index
    rows = token_index.numel() if gather_a or gather_b else a.shape[0]
    if row_scale is None and weight_grad_on_grouped_mm(a, _rows_per_expert(rows, routing)):
        a_rows = routing.grouped(a) if gather_a else a
        b_rows = routing.grouped(b) if gather_b else b
        if grouped_mm_supports(a_rows.t(), b_rows):
            return grouped_mm_weight_grad(a_rows, b_rows, m_sizes, routing.offsets)
    return tg.grouped_weight_grad(
        a,
        b,
        m_sizes,
        a_index=token_index if gather_a else None,
        b_index=token_index if gather_b else None,
        row_scale=row_scale,
    )


def _projections(adapter: ExpertsLora | None) -> tuple[LoraWeights | None, ...]:
    return (None, None, None) if adapter is None else (adapter.gate, adapter.up, adapter.down)


def _factor_tensors(adapter: ExpertsLora | None) -> tuple[torch.Tensor | None, ...]:
    """``(gate A, gate B, up A, up B, down A, down B)`` of ``adapter`` (``None`` where not adapted), the autograd
    function's inputs: their gradients are computed here, in their own dtype (PEFT keeps adapters in fp32)."""
    return tuple(
        f for w in _projections(adapter) for f in ((None, None) if w is None else (w.lora_A, w.lora_B))
    )


class _TritonExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapter: ExpertsLora | None,
        routing: ExpertRouting,
        needs_grad: bool,
        dropout_p: float,
        # _factor_tensors(adapter): the autograd graph reaches the factors through these inputs
        *factors: torch.Tensor | None,
    ) -> torch.Tensor:
        num_tokens, hidden = hidden_states.shape
        m_sizes, token_index = routing.m_sizes, routing.token_index
        dtype = gate_up_proj.dtype
        x = hidden_states.to(dtype)
        scale = top_k_weights.reshape(-1).index_select(0, routing.sorted_slots)
        # The GEMMs run in the base weights' dtype, the scalings folded into the A factors (see lora.py): built
        # here, without autograd, so the step records no graph for them.
        gate_up_a = gate_up_b = down_a = down_b = None
        if adapter is not None:
            gate_up_a, gate_up_b = gate_up_factors(adapter, down_proj.shape[2], dtype) or (None, None)
            down_a, down_b = down_factors(adapter, dtype) or (None, None)

        gate_up_lora = t = x_mask = None
        if gate_up_a is not None:
            if dropout_p > 0:  # each (token, expert) row its own mask, as PEFT's per-expert Linear layers
                rows = x[token_index]
                x_mask = _mask(rows, dropout_p)
                t = tg.grouped_gemm(rows * x_mask, gate_up_a, m_sizes)
            else:
                t = tg.grouped_gemm(x, gate_up_a, m_sizes, a_index=token_index)
            gate_up_lora = tg.LoraTerm(t, gate_up_b)
        # When the down weight's gradient will be taken (and no LoRA reads h), h is stored already multiplied by
        # the routing weight: the down GEMM then needs no row scale, nor does its weight gradient's operand.
        prescaled = down_proj.requires_grad and down_a is None
        h, gate_up = tg.gate_up_swiglu(
            x,
            dense(gate_up_proj),
            m_sizes,
            token_index,
            store_gate_up=needs_grad,
            lora=gate_up_lora,
            row_scale=scale if prescaled else None,
        )

        down_lora = td = h_mask = None
        if down_a is not None:
            h_mask = _mask(h, dropout_p) if dropout_p > 0 else None
            td = tg.grouped_gemm(h if h_mask is None else h * h_mask, down_a, m_sizes)
            down_lora = tg.LoraTerm(td, down_b)
        out = combine(h, down_proj, routing, row_scale=None if prescaled else scale, lora=down_lora)
        ctx.save_for_backward(
            x,
            gate_up_proj,
            down_proj,
            gate_up,
            h,
            scale,
            gate_up_a,
            gate_up_b,
            t,
            x_mask,
            down_a,
            down_b,
            td,
            h_mask,
        )
        # Only the factors' shapes and dtypes: their gradients are allocated like them (saving the factors
        # themselves would make an optimizer step between forward and backward an error).
        ctx.factors = tuple(None if f is None else (f.shape, f.dtype) for f in factors)
        ctx.routing, ctx.weights_dtype = routing, top_k_weights.dtype
        ctx.prescaled = prescaled
        ctx.scalings = tuple(None if w is None else w.scaling for w in _projections(adapter))
        return out.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (
            x,
            gate_up_proj,
            down_proj,
            gate_up,
            h,
            scale,
            gate_up_a,
            gate_up_b,
            t,
            x_mask,
            down_a,
            down_b,
            td,
            h_mask,
        ) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        routing: ExpertRouting = ctx.routing
        m_sizes, token_index = routing.m_sizes, routing.token_index
        grad_out = grad_out.to(down_proj.dtype)
        factors = ctx.factors
        grad = [None] * 8  # the inputs before the factors
        factor_grad = [None] * len(factors)  # gate A, gate B, up A, up B, down A, down B
        factor_needs = needs[8:]
        gate_scaling, up_scaling, down_scaling = ctx.scalings

        # Down projection: its LoRA's gradient reaching h, (dY·B)·(s·A), joins the epilogue of the GEMM dY·W.
        h_lora_grad = None
        if down_a is not None:
            u = tg.grouped_gemm(grad_out, down_b.transpose(1, 2), m_sizes, a_index=token_index)  # dY·B
            h_lora_grad = tg.LoraTerm(u, down_a.transpose(1, 2), h_mask)
            h_lora = h if h_mask is None else h * h_mask
            if factor_needs[4]:  # d(s·A) / dA = s: folded into the rows' routing weights
                factor_grad[4] = tg.grouped_weight_grad(
                    u, h_lora, m_sizes, row_scale=scale * down_scaling, out=_like(factors[4], x)
                )
            if factor_needs[5]:  # td = h·(s·A)ᵀ already holds the scaling
                factor_grad[5] = tg.grouped_weight_grad(
                    grad_out,
                    td,
                    m_sizes,
                    a_index=token_index,
                    row_scale=scale,
                    out=_like(factors[5], x),
                )
        # The routing weights' gradient comes out of SwiGLU's row kernel in their (token, k) order and dtype.
        weights_grad = x.new_empty(x.shape[0] * routing.top_k, dtype=ctx.weights_dtype) if needs[3] else None
        d_gate_up, _ = tg.swiglu_backward(
            grad_out,
            dense(down_proj),
            gate_up,
            scale,
            m_sizes,
            token_index,
            lora=h_lora_grad,
            d_scale_out=weights_grad,
            d_scale_index=routing.sorted_slots,
        )
        if needs[3]:
            grad[3] = weights_grad.view(x.shape[0], routing.top_k)

        # Gate/up projection.
        x_lora_grad = None
        if gate_up_a is not None:
            x_rows = x[token_index] * x_mask if x_mask is not None else x
            x_index = None if x_mask is not None else token_index
            dt = tg.grouped_gemm(d_gate_up, gate_up_b.transpose(1, 2), m_sizes)  # dG·B
            _gate_up_factor_grads(
                factor_grad,
                factor_needs,
                factors,
                (gate_scaling, up_scaling),
                d_gate_up,
                dt,
                t,
                x_rows,
                x_index,
                m_sizes,
            )
            if needs[0]:  # (dG·B)·(s·A) joins the input gradient's epilogue
                x_lora_grad = tg.LoraTerm(dt, gate_up_a.transpose(1, 2), x_mask)
        # The input gradient first, then the weight gradients: the combine's [T·K, H] slots are freed before the
        # [E, ...] weight gradients exist (a lower peak).
        if needs[0]:
            grad[0] = combine(d_gate_up, gate_up_proj.transpose(1, 2), routing, lora=x_lora_grad).to(x.dtype)
        if needs[1]:
            grad[1] = base_weight_grad(d_gate_up, x, routing, gather_b=True)
        d_gate_up = None  # freed before the down weight gradient is allocated
        if needs[2]:
            grad[2] = base_weight_grad(
                grad_out, h, routing, gather_a=True, row_scale=None if ctx.prescaled else scale
            )
        return (*grad, *factor_grad)


def _like(factor: tuple[torch.Size, torch.dtype], device_of: torch.Tensor) -> torch.Tensor:
    """An empty gradient for a factor of this ``(shape, dtype)``."""
    shape, dtype = factor
    return device_of.new_empty(shape, dtype=dtype)


def _gate_up_factor_grads(
    factor_grad: list,
    factor_needs: tuple[bool, ...],
    factors: tuple[tuple[torch.Size, torch.dtype] | None, ...],
    scalings: tuple[float | None, float | None],
    d_gate_up: torch.Tensor,
    dt: torch.Tensor,
    t: torch.Tensor,
    x_rows: torch.Tensor,
    x_index: torch.Tensor | None,
    m_sizes: torch.Tensor,
) -> None:
    """Gradients of the gate and up factors from the stacked ``t = x·(s·A)ᵀ`` and ``dt = dG·B``: each ``B``'s from
    its own columns of ``dG`` and ``t``, each ``A``'s from its columns of one ``dtᵀ·x`` times its scaling."""
    inter = d_gate_up.shape[1] // 2
    d_a = None
    if factor_needs[0] or factor_needs[2]:
        d_a = tg.grouped_weight_grad(
            dt,
            x_rows,
            m_sizes,
            b_index=x_index,
            out=dt.new_empty(m_sizes.numel(), dt.shape[1], x_rows.shape[1], dtype=torch.float32),
        )
    col = 0
    for i, scaling in enumerate(scalings):
        if scaling is None:
            continue
        lora_A, lora_B = factors[2 * i], factors[2 * i + 1]
        rank = lora_A[0][1]
        if factor_needs[2 * i]:
            factor_grad[2 * i] = torch.mul(d_a[:, col : col + rank], scaling, out=_like(lora_A, dt))
        if factor_needs[2 * i + 1]:
            factor_grad[2 * i + 1] = tg.grouped_weight_grad(
                d_gate_up[:, i * inter : (i + 1) * inter],
                t[:, col : col + rank],
                m_sizes,
                out=_like(lora_B, dt),
            )
        col += rank


def triton_fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_weights: torch.Tensor,
    routing: ExpertRouting,
    lora: Sequence[ExpertsLora],
) -> torch.Tensor | None:
    """SwiGLU experts (with at most one LoRA adapter) on the Triton kernels; ``None`` when this path does not
    apply (several adapters, or a dropout that is not ``nn.Dropout``) and the caller must compose instead."""
    if len(lora) > 1:
        return None
    adapter = lora[0] if lora else None
    dropout_p = 0.0 if adapter is None else lora_dropout_p(adapter)
    if dropout_p is None:
        return None
    factors = _factor_tensors(adapter)
    inputs = (hidden_states, gate_up_proj, down_proj, top_k_weights, *factors)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _TritonExperts.apply(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_weights,
        adapter,
        routing,
        needs_grad,
        dropout_p,
        *factors,
    )
