"""The experts on the Triton kernels: the whole gated experts block (SwiGLU, GeGLU, GPT-OSS's clamped SwiGLU; biases;
gate and up rows stacked or interleaved), LoRA included, as one PyTorch operator.

Forward: the gather of token rows is fused into the gate/up GEMM's loads, the gated activation into its epilogue, and the
routing-weight multiply and the scatter of each row to its ``(token, k)`` slot into the down GEMM's epilogue (a
sum over ``k`` then combines them; no atomics anywhere, so results repeat bit for bit). A LoRA adapter adds, per
projection, one thin grouped GEMM ``t = x·Aᵀ``; ``t·Bᵀ`` is computed in the base GEMM's epilogue (a rank-deep
``tl.dot`` per tile), so neither ``W + B·A`` nor the ``[rows, out]`` LoRA term is ever written to memory. Saved
for backward (:class:`Saved`): the pre-activations ``[S, 2I]``, ``h [S, I]`` (already times the routing weight
when the down weight is trained: its gradient then reads it as is) and the thin ``t``s (plus the dropout masks
when dropout is on).

Backward computes only what is asked for: with frozen base weights (LoRA) there is no base ``dW``. 4-bit base
weights (:mod:`moefuse.quant`) are dequantised for each GEMM that reads them
(:func:`~moefuse.ops.dequantize_4bit.dense`).

Dense weights run as the custom operators ``moefuse::experts`` and ``moefuse::experts_backward`` (so
``torch.compile`` keeps them in its graph and CUDA graphs can capture them); 4-bit weights run as an eager
autograd function. Both follow the :class:`~moefuse.ops.plan.ExpertsPlan` they are given, which also says which
products run on ``torch.nn.functional.grouped_mm`` (CUTLASS) instead of the Triton kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import triton_gemm as tg
from .dequantize_4bit import dense
from .gating import Gating
from .grouped_gemm import grouped_mm, grouped_mm_weight_grad
from .lora import ExpertsLora, LoraWeights, down_factors, gate_up_factors
from .plan import ExpertsPlan
from .routing import ExpertRouting, route


def _mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT-style inverted dropout mask: 0 or ``1 / (1 - p)`` per element."""
    return F.dropout(torch.ones_like(like), p, training=True)


def combine(
    a: torch.Tensor,
    weight: torch.Tensor,
    routing: ExpertRouting,
    *,
    on_grouped_mm: bool = False,
    row_scale: torch.Tensor | None = None,
    lora: tg.LoraTerm | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, N]``: each token's ``K`` rows of ``row_scale * (a @ weight[e]ᵀ + lora + bias[e])`` summed, ``a [S, K']``
    in grouped order, ``weight [E, N, K']`` (any strides) dense or 4-bit.

    The GEMM's epilogue stores every row at its slot ``t * K + k`` of a ``[T, K, N]`` buffer, then one sum over
    ``K``: no atomics, so results repeat bit for bit. ``on_grouped_mm`` (the plan's choice, taken only where nothing
    joins the epilogue: no row scale, LoRA or bias) runs the product on ``grouped_mm`` in grouped order and
    :meth:`ExpertRouting.token_sums` sums it."""
    weight = dense(weight)
    if on_grouped_mm:
        return routing.token_sums(grouped_mm(a, weight.transpose(1, 2), routing.m_sizes, routing.offsets))
    num_tokens = routing.inverse.numel() // routing.top_k
    width = weight.shape[1]
    slots = torch.empty(num_tokens * routing.top_k, width, device=a.device, dtype=weight.dtype)
    tg.grouped_gemm(
        a,
        weight,
        routing.m_sizes,
        row_scale=row_scale,
        lora=lora,
        bias=bias,
        out=slots,
        out_index=routing.sorted_slots,
    )
    return slots.view(num_tokens, routing.top_k, width).sum(dim=1)


def base_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: ExpertRouting,
    *,
    on_grouped_mm: bool = False,
    gather_a: bool = False,
    gather_b: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~moefuse.ops.triton_gemm.grouped_weight_grad` for an expert stack's gradient ``[E, N, K]``, ``a`` or
    ``b`` read through ``routing.token_index`` when gathered. ``on_grouped_mm`` (the plan's choice; not with a row
    scale) copies a gathered operand into grouped order (a transient ``[rows, ·]``, :meth:`ExpertRouting.grouped`)
    and runs the product on ``grouped_mm``."""
    m_sizes, token_index = routing.m_sizes, routing.token_index
    if on_grouped_mm and row_scale is None:
        a_rows = routing.grouped(a) if gather_a else a
        b_rows = routing.grouped(b) if gather_b else b
        return grouped_mm_weight_grad(a_rows, b_rows, m_sizes, routing.offsets)
    return tg.grouped_weight_grad(
        a,
        b,
        m_sizes,
        a_index=token_index if gather_a else None,
        b_index=token_index if gather_b else None,
        row_scale=row_scale,
    )


def bias_grad(
    rows: torch.Tensor,
    routing: ExpertRouting,
    *,
    gather: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A per-expert bias's gradient ``[E, N]``: each expert's sum of its rows of ``rows`` (``[S, N]`` in grouped
    order, or ``[T, N]`` read through ``routing.token_index`` when gathered), times ``row_scale``. The weight
    gradient's kernel with a column of ones, ``1ᵀ·rows`` per expert: deterministic, no atomics."""
    grouped_rows = routing.token_index.numel()
    ones = rows.new_ones(()).expand(grouped_rows, 1)
    grad = tg.grouped_weight_grad(
        ones,
        rows,
        routing.m_sizes,
        b_index=routing.token_index if gather else None,
        row_scale=row_scale,
        out=rows.new_empty(routing.m_sizes.numel(), 1, rows.shape[1]),
    )
    return grad.squeeze(1)


class Saved(NamedTuple):
    """What the forward keeps for the backward (``None`` where not needed): nothing of size ``[S, H]`` but the
    dropout mask of the gate/up LoRA's input."""

    scale: torch.Tensor  # [S] each grouped row's routing weight
    gate_up: torch.Tensor | None  # [S, 2I] pre-activations (when a gradient will be taken)
    h: torch.Tensor  # [S, I] act(gate) * up, times the routing weight when plan.prescaled_h
    gate_up_a: torch.Tensor | None  # [E, r_gate + r_up, H] scaled A factors of gate and up, stacked
    gate_up_b: torch.Tensor | None  # [E, 2I, r_gate + r_up] block-diagonal B factors
    t: torch.Tensor | None  # [S, r_gate + r_up] x·(s·A)ᵀ
    x_mask: torch.Tensor | None  # [S, H] dropout mask of the gate/up LoRA's input
    down_a: torch.Tensor | None  # [E, r_down, I] scaled A factor of down
    down_b: torch.Tensor | None  # [E, H, r_down]
    td: torch.Tensor | None  # [S, r_down] h·(s·A)ᵀ
    h_mask: torch.Tensor | None  # [S, I] dropout mask of the down LoRA's input


def experts_forward(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_weights: torch.Tensor,
    routing: ExpertRouting,
    adapter: ExpertsLora | None,
    plan: ExpertsPlan,
    store_gate_up: bool,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Saved]:
    """The experts' output ``[T, H]`` (in ``hidden_states``' dtype) and what its backward needs; the biases
    (``[E, 2I]`` laid out as ``gate_up_proj``'s rows, ``[E, H]``) join the GEMMs' epilogues."""
    token_index, m_sizes = routing.token_index, routing.m_sizes
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
        if plan.lora_dropout > 0:  # each (token, expert) row its own mask, as PEFT's per-expert Linear layers
            rows = x[token_index]
            x_mask = _mask(rows, plan.lora_dropout)
            t = tg.grouped_gemm(rows * x_mask, gate_up_a, m_sizes)
        else:
            t = tg.grouped_gemm(x, gate_up_a, m_sizes, a_index=token_index)
        gate_up_lora = tg.LoraTerm(t, gate_up_b)
    h, gate_up = tg.gate_up_glu(
        x,
        dense(gate_up_proj),
        m_sizes,
        token_index,
        store_gate_up=store_gate_up,
        gating=plan.gating,
        lora=gate_up_lora,
        bias=gate_up_bias,
        row_scale=scale if plan.prescaled_h else None,
    )

    down_lora = td = h_mask = None
    if down_a is not None:
        h_mask = _mask(h, plan.lora_dropout) if plan.lora_dropout > 0 else None
        td = tg.grouped_gemm(h if h_mask is None else h * h_mask, down_a, m_sizes)
        down_lora = tg.LoraTerm(td, down_b)
    out = combine(
        h,
        down_proj,
        routing,
        on_grouped_mm=plan.combine_on_grouped_mm,
        row_scale=None if plan.prescaled_h else scale,
        lora=down_lora,
        bias=down_bias,
    )
    saved = Saved(scale, gate_up, h, gate_up_a, gate_up_b, t, x_mask, down_a, down_b, td, h_mask)
    return out.to(hidden_states.dtype), saved


class FactorSpec(NamedTuple):
    """The LoRA factors' ranks (0: the projection is not adapted), scalings and dtype: what the backward
    allocates their gradients by (their values are not kept, so an optimizer step may update them in place).
    ``stacked_gate_up``: the first pair is gate_up's (``B [E, 2I, r]``), not gate's."""

    ranks: tuple[int, int, int]  # gate (or gate_up), up, down
    scalings: tuple[float, float, float]
    dtype: torch.dtype
    stacked_gate_up: bool = False

    @classmethod
    def of(cls, adapter: ExpertsLora | None, default: torch.dtype) -> FactorSpec:
        projections = _projections(adapter)
        present = [w.lora_A.dtype for w in projections if w is not None]
        return cls(
            tuple(0 if w is None else w.lora_A.shape[1] for w in projections),
            tuple(0.0 if w is None else float(w.scaling) for w in projections),
            present[0] if present else default,
            adapter is not None and adapter.gate_up is not None,
        )

    def gate_up_rows(self, intermediate: int) -> tuple[slice, slice]:
        """The rows of ``gate_up_proj`` (and columns of the gate/up output) that the first and second pair adapt."""
        if self.stacked_gate_up:
            return slice(0, 2 * intermediate), slice(0, 0)
        return slice(0, intermediate), slice(intermediate, 2 * intermediate)


def experts_backward(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: ExpertRouting,
    saved: Saved,
    factors: FactorSpec,
    weights_dtype: torch.dtype,
    needs: Sequence[bool],
    plan: ExpertsPlan,
    down_bias: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """Gradients of ``(hidden_states, gate_up_proj, down_proj, top_k_weights, gate A, gate B, up A, up B, down A,
    down B, gate_up_bias, down_bias)``, each only where ``needs`` says (``None`` elsewhere)."""
    m_sizes, token_index = routing.m_sizes, routing.token_index
    x = hidden_states.to(gate_up_proj.dtype)
    grad_out = grad_out.to(down_proj.dtype)
    scale, gate_up, h = saved.scale, saved.gate_up, saved.h
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    grad: list[torch.Tensor | None] = [None] * 12
    gate_up_rows = factors.gate_up_rows(inter)
    factor_shapes = lora_factor_shapes(gate_up_proj.shape, factors.ranks, factors.stacked_gate_up)

    def factor_grad(i: int) -> torch.Tensor:
        return x.new_empty(factor_shapes[i], dtype=factors.dtype)

    # Down projection: its LoRA's gradient reaching h, (dY·B)·(s·A), joins the epilogue of the GEMM dY·W.
    h_lora_grad = None
    if saved.down_a is not None:
        down_a, down_b, h_mask = saved.down_a, saved.down_b, saved.h_mask
        u = tg.grouped_gemm(grad_out, down_b.transpose(1, 2), m_sizes, a_index=token_index)  # dY·B
        h_lora_grad = tg.LoraTerm(u, down_a.transpose(1, 2), h_mask)
        h_lora = h if h_mask is None else h * h_mask
        if needs[8]:  # d(s·A) / dA = s: folded into the rows' routing weights
            grad[8] = tg.grouped_weight_grad(
                u, h_lora, m_sizes, row_scale=scale * factors.scalings[2], out=factor_grad(4)
            )
        if needs[9]:  # td = h·(s·A)ᵀ already holds the scaling
            grad[9] = tg.grouped_weight_grad(
                grad_out, saved.td, m_sizes, a_index=token_index, row_scale=scale, out=factor_grad(5)
            )
    # The routing weights' gradient comes out of the activation's row kernel in their (token, k) order and dtype.
    weights_grad = x.new_empty(x.shape[0] * routing.top_k, dtype=weights_dtype) if needs[3] else None
    d_gate_up, _ = tg.glu_backward(
        grad_out,
        dense(down_proj),
        gate_up,
        scale,
        m_sizes,
        token_index,
        lora=h_lora_grad,
        gating=plan.gating,
        down_bias=down_bias if needs[3] else None,
        d_scale_out=weights_grad,
        d_scale_index=routing.sorted_slots,
    )
    if needs[3]:
        grad[3] = weights_grad.view(x.shape[0], routing.top_k)
    if needs[10]:  # d_gate_up's columns are laid out as the bias
        grad[10] = bias_grad(d_gate_up, routing)
    if needs[11]:  # the down bias's rows are scaled by the routing weights, as the GEMM's
        grad[11] = bias_grad(grad_out, routing, gather=True, row_scale=scale)

    # Gate/up projection.
    x_lora_grad = None
    if saved.gate_up_a is not None:
        x_mask = saved.x_mask
        x_rows = x[token_index] * x_mask if x_mask is not None else x
        x_index = None if x_mask is not None else token_index
        dt = tg.grouped_gemm(d_gate_up, saved.gate_up_b.transpose(1, 2), m_sizes)  # dG·B
        d_a = None
        if needs[4] or needs[6]:  # one dtᵀ·x for both A factors, split by their columns
            d_a = tg.grouped_weight_grad(
                dt,
                x_rows,
                m_sizes,
                b_index=x_index,
                out=dt.new_empty(num_experts, dt.shape[1], hidden, dtype=torch.float32),
            )
        col = 0
        for i in range(2):  # gate (or gate_up), up
            rank = factors.ranks[i]
            if not rank:
                continue
            if needs[4 + 2 * i]:
                grad[4 + 2 * i] = torch.mul(
                    d_a[:, col : col + rank], factors.scalings[i], out=factor_grad(2 * i)
                )
            if needs[5 + 2 * i]:
                grad[5 + 2 * i] = tg.grouped_weight_grad(
                    d_gate_up[:, gate_up_rows[i]],
                    saved.t[:, col : col + rank],
                    m_sizes,
                    out=factor_grad(2 * i + 1),
                )
            col += rank
        if needs[0]:  # (dG·B)·(s·A) joins the input gradient's epilogue
            x_lora_grad = tg.LoraTerm(dt, saved.gate_up_a.transpose(1, 2), x_mask)
    # The input gradient first, then the weight gradients: the combine's [T·K, H] slots are freed before the
    # [E, ...] weight gradients exist (a lower peak).
    if needs[0]:
        grad[0] = combine(
            d_gate_up,
            gate_up_proj.transpose(1, 2),
            routing,
            on_grouped_mm=plan.input_grad_on_grouped_mm,
            lora=x_lora_grad,
        ).to(hidden_states.dtype)
    if needs[1]:
        grad[1] = base_weight_grad(
            d_gate_up, x, routing, on_grouped_mm=plan.weight_grad_on_grouped_mm, gather_b=True
        )
    d_gate_up = None  # freed before the down weight gradient is allocated
    if needs[2]:
        grad[2] = base_weight_grad(
            grad_out,
            h,
            routing,
            on_grouped_mm=plan.weight_grad_on_grouped_mm,
            gather_a=True,
            row_scale=None if plan.prescaled_h else scale,
        )
    return grad


def _projections(adapter: ExpertsLora | None) -> tuple[LoraWeights | None, ...]:
    """The adapter's three pairs as the operator takes them: gate (or gate_up, which excludes gate and up), up,
    down."""
    if adapter is None:
        return (None, None, None)
    return (adapter.gate if adapter.gate_up is None else adapter.gate_up, adapter.up, adapter.down)


def lora_factor_shapes(
    gate_up_shape: Sequence[int], ranks: Sequence[int], stacked_gate_up: bool
) -> list[tuple[int, int, int]]:
    """The shapes of ``(gate A, gate B, up A, up B, down A, down B)`` (gate's B ``[E, 2I, r]`` when it is the
    stacked gate_up pair)."""
    num_experts, two_i, hidden = gate_up_shape
    inter = two_i // 2
    first_rows = two_i if stacked_gate_up else inter
    return [
        (num_experts, ranks[0], hidden),
        (num_experts, first_rows, ranks[0]),
        (num_experts, ranks[1], hidden),
        (num_experts, inter, ranks[1]),
        (num_experts, ranks[2], inter),
        (num_experts, hidden, ranks[2]),
    ]


def _factor_tensors(adapter: ExpertsLora | None) -> tuple[torch.Tensor | None, ...]:
    """``(gate A, gate B, up A, up B, down A, down B)`` of ``adapter`` (``None`` where not adapted): inputs of the
    autograd node, so the graph reaches them; their gradients are computed here, in their own dtype."""
    return tuple(
        f for w in _projections(adapter) for f in ((None, None) if w is None else (w.lora_A, w.lora_B))
    )


# The dense experts as PyTorch custom operators: torch.compile keeps them whole in its graphs (no graph break)
# and never traces into the kernels' launches; CUDA graphs can capture them, as they never sync with the host.
# The forward returns the routing and what the backward needs, so the backward is an operator of its own. Eager
# calls take the same two functions through an autograd function (_EagerExperts), without the operators' dispatch.
_FORWARD_OUTPUTS = ("out", "m_sizes", "sorted_slots", "token_index", "inverse", "offsets", *Saved._fields)
_GRADIENTS = (
    "hidden_states",
    "gate_up_proj",
    "down_proj",
    "top_k_weights",
    *(f"grad_{n}" for n in range(6)),
    "gate_up_bias",
    "down_bias",
)


@functools.lru_cache(maxsize=64)  # built on every call from a handful of distinct argument sets
def _fused_plan(
    gating: tuple,
    lora_dropout: float,
    prescaled_h: bool,
    combine_on_grouped_mm: bool = False,
    input_grad_on_grouped_mm: bool = False,
    weight_grad_on_grouped_mm: bool = False,
) -> ExpertsPlan:
    """The plan of the fused path from the choices an operator receives as its arguments (``gating``: the
    :class:`Gating`'s fields in order)."""
    return ExpertsPlan(
        backend="triton",
        fused=True,
        composed_because="",
        gating=Gating(*gating),
        weights="dense",
        lora="fused",
        lora_dropout=lora_dropout,
        prescaled_h=prescaled_h,
        combine_on_grouped_mm=combine_on_grouped_mm,
        input_grad_on_grouped_mm=input_grad_on_grouped_mm,
        weight_grad_on_grouped_mm=weight_grad_on_grouped_mm,
    )


def _adapter(
    factors: Sequence[torch.Tensor | None], scalings: Sequence[float], two_i: int
) -> ExpertsLora | None:
    """The adapter an operator receives as six optional factor tensors and three scalings (the first pair is
    gate_up's where its B has all ``two_i`` rows of ``gate_up_proj``)."""
    gate, up, down = (
        None if factors[2 * i] is None else LoraWeights(factors[2 * i], factors[2 * i + 1], scalings[i])
        for i in range(3)
    )
    if gate is None and up is None and down is None:
        return None
    if _stacked_gate_up(factors, two_i):
        return ExpertsLora(gate_up=gate, down=down)
    return ExpertsLora(gate, up, down)


def _empty_if_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


_EXPERTS_SCHEMA = (
    "(Tensor hidden_states, Tensor gate_up_proj, Tensor down_proj, Tensor top_k_index, "
    "Tensor top_k_weights, Tensor? gate_a, Tensor? gate_b, Tensor? up_a, Tensor? up_b, Tensor? down_a, "
    "Tensor? down_b, Tensor? gate_up_bias, Tensor? down_bias, float[] scalings, str activation, float alpha, "
    "float limit, float up_shift, bool interleaved, float lora_dropout, bool store_gate_up, bool prescaled_h, "
    "bool combine_on_grouped_mm, bool input_grad_on_grouped_mm, bool weight_grad_on_grouped_mm) "
    f"-> ({', '.join(['Tensor'] * len(_FORWARD_OUTPUTS))})"
)


def _experts_forward_parts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_a: torch.Tensor | None,
    gate_b: torch.Tensor | None,
    up_a: torch.Tensor | None,
    up_b: torch.Tensor | None,
    down_a: torch.Tensor | None,
    down_b: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    scalings: Sequence[float],
    activation: str,
    alpha: float,
    limit: float,
    up_shift: float,
    interleaved: bool,
    lora_dropout: float,
    store_gate_up: bool,
    prescaled_h: bool,
    combine_on_grouped_mm: bool,
    input_grad_on_grouped_mm: bool,
    weight_grad_on_grouped_mm: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Saved]:
    """The fused experts' forward (:func:`experts_forward`) on the operator's arguments: ``(out, routing tensors,
    Saved)``."""
    routing = route(top_k_index, gate_up_proj.shape[0], on_triton=True)
    adapter = _adapter((gate_a, gate_b, up_a, up_b, down_a, down_b), scalings, gate_up_proj.shape[1])
    gating = (activation, alpha, limit, up_shift, interleaved)
    plan = _fused_plan(gating, lora_dropout, prescaled_h, combine_on_grouped_mm)
    out, saved = experts_forward(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_weights,
        routing,
        adapter,
        plan,
        store_gate_up,
        gate_up_bias,
        down_bias,
    )
    routing_tensors = (
        routing.m_sizes,
        routing.sorted_slots,
        routing.token_index,
        routing.inverse,
        routing.offsets,
    )
    return out, routing_tensors, saved


@torch.library.custom_op("moefuse::experts", mutates_args=(), schema=_EXPERTS_SCHEMA)
def _experts_op(*args) -> tuple[torch.Tensor, ...]:
    """:func:`_experts_forward_parts` as one tuple of tensors: an empty one for each ``Saved`` field that is
    ``None``."""
    out, routing_tensors, saved = _experts_forward_parts(*args)
    return (out, *routing_tensors, *(_empty_if_none(t, out) for t in saved))


@_experts_op.register_fake
def _(
    hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_a, gate_b, up_a, up_b, down_a,
    down_b, gate_up_bias, down_bias, scalings, activation, alpha, limit, up_shift, interleaved, lora_dropout,
    store_gate_up, prescaled_h, combine_on_grouped_mm, input_grad_on_grouped_mm, weight_grad_on_grouped_mm,
):  # fmt: skip
    num_experts, two_i, hidden = gate_up_proj.shape
    inter, rows, dtype = two_i // 2, top_k_index.numel(), gate_up_proj.dtype
    ranks = _ranks((gate_a, gate_b, up_a, up_b, down_a, down_b))
    gate_up_rank, down_rank = ranks[0] + ranks[1], ranks[2]
    shapes = Saved(
        scale=(rows,),
        gate_up=(rows, two_i),
        h=(rows, inter),
        gate_up_a=(num_experts, gate_up_rank, hidden),
        gate_up_b=(num_experts, two_i, gate_up_rank),
        t=(rows, gate_up_rank),
        x_mask=(rows, hidden),
        down_a=(num_experts, down_rank, inter),
        down_b=(num_experts, hidden, down_rank),
        td=(rows, down_rank),
        h_mask=(rows, inter),
    )
    present = _saved_present(ranks, lora_dropout, store_gate_up)
    saved = [
        hidden_states.new_empty(
            shape if there else (0,), dtype=top_k_weights.dtype if name == "scale" else dtype
        )
        for name, shape, there in zip(Saved._fields, shapes, present, strict=True)
    ]
    index = top_k_index.new_empty(rows, dtype=torch.long)
    return (
        torch.empty_like(hidden_states),
        top_k_index.new_empty(num_experts, dtype=torch.long),
        index,
        torch.empty_like(index),
        torch.empty_like(index),
        top_k_index.new_empty(num_experts, dtype=torch.int32),
        *saved,
    )


_EXPERTS_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor hidden_states, Tensor gate_up_proj, Tensor down_proj, Tensor? down_bias, "
    "Tensor m_sizes, "
    "Tensor sorted_slots, Tensor token_index, Tensor inverse, Tensor offsets, int top_k, Tensor?[] saved, int[] ranks, "
    "bool stacked_gate_up, float[] scalings, ScalarType factor_dtype, ScalarType weights_dtype, bool[] needs, "
    "str activation, float alpha, float limit, float up_shift, bool interleaved, float lora_dropout, "
    "bool prescaled_h, bool input_grad_on_grouped_mm, bool weight_grad_on_grouped_mm) "
    f"-> ({', '.join(['Tensor'] * len(_GRADIENTS))})"
)


def _experts_backward_parts(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
    m_sizes: torch.Tensor,
    sorted_slots: torch.Tensor,
    token_index: torch.Tensor,
    inverse: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    saved: Sequence[torch.Tensor | None],
    ranks: Sequence[int],
    stacked_gate_up: bool,
    scalings: Sequence[float],
    factor_dtype: torch.dtype,
    weights_dtype: torch.dtype,
    needs: Sequence[bool],
    activation: str,
    alpha: float,
    limit: float,
    up_shift: float,
    interleaved: bool,
    lora_dropout: float,
    prescaled_h: bool,
    input_grad_on_grouped_mm: bool,
    weight_grad_on_grouped_mm: bool,
) -> list[torch.Tensor | None]:
    """The fused experts' backward (:func:`experts_backward`) on the operator's arguments: one gradient per
    differentiable input, ``None`` where ``needs`` asks none."""
    routing = ExpertRouting(m_sizes, sorted_slots, token_index, inverse, top_k, offsets, on_triton=True)
    plan = _fused_plan(
        (activation, alpha, limit, up_shift, interleaved), lora_dropout, prescaled_h,
        input_grad_on_grouped_mm=input_grad_on_grouped_mm, weight_grad_on_grouped_mm=weight_grad_on_grouped_mm,
    )  # fmt: skip
    grads = experts_backward(
        grad_out,
        hidden_states,
        gate_up_proj,
        down_proj,
        routing,
        Saved(*saved),
        FactorSpec(tuple(ranks), tuple(scalings), factor_dtype, stacked_gate_up),
        weights_dtype,
        needs,
        plan,
        down_bias,
    )
    return grads


@torch.library.custom_op("moefuse::experts_backward", mutates_args=(), schema=_EXPERTS_BACKWARD_SCHEMA)
def _experts_backward_op(*args) -> tuple[torch.Tensor, ...]:
    """:func:`_experts_backward_parts` as one tuple of tensors: an empty one where ``needs`` asks none."""
    grad_out = args[0]
    return tuple(_empty_if_none(g, grad_out) for g in _experts_backward_parts(*args))


@_experts_backward_op.register_fake
def _(
    grad_out, hidden_states, gate_up_proj, down_proj, down_bias, m_sizes, sorted_slots, token_index, inverse, offsets,
    top_k, saved, ranks, stacked_gate_up, scalings, factor_dtype, weights_dtype, needs, activation, alpha, limit,
    up_shift, interleaved, lora_dropout, prescaled_h, input_grad_on_grouped_mm, weight_grad_on_grouped_mm,
):  # fmt: skip
    tokens = hidden_states.shape[0]
    shapes = [
        (tuple(hidden_states.shape), hidden_states.dtype),
        (tuple(gate_up_proj.shape), gate_up_proj.dtype),
        (tuple(down_proj.shape), down_proj.dtype),
        ((tokens, top_k), weights_dtype),
        *((shape, factor_dtype) for shape in lora_factor_shapes(gate_up_proj.shape, ranks, stacked_gate_up)),
        (tuple(gate_up_proj.shape[:2]), gate_up_proj.dtype),  # the biases' gradients: in the weights' dtype
        ((gate_up_proj.shape[0], gate_up_proj.shape[2]), down_proj.dtype),
    ]
    return tuple(
        grad_out.new_empty(shape if need else (0,), dtype=dtype)
        for need, (shape, dtype) in zip(needs, shapes, strict=True)
    )


def _ranks(factors: Sequence[torch.Tensor | None]) -> tuple[int, int, int]:
    """Gate, up and down LoRA ranks from the six optional factors (0: not adapted)."""
    return tuple(0 if factors[2 * i] is None else factors[2 * i].shape[1] for i in range(3))


def _stacked_gate_up(factors: Sequence[torch.Tensor | None], two_i: int) -> bool:
    """Whether the first pair of the six optional factors is gate_up's: its B has all ``2I`` rows."""
    return factors[1] is not None and factors[1].shape[1] == two_i


def _saved_present(ranks: Sequence[int], lora_dropout: float, store_gate_up: bool) -> tuple[bool, ...]:
    """Which :class:`Saved` fields the forward fills (an operator returns an empty tensor for the others)."""
    gate_up, down, dropout = ranks[0] + ranks[1] > 0, ranks[2] > 0, lora_dropout > 0
    return tuple(
        Saved(
            scale=True,
            gate_up=store_gate_up,
            h=True,
            gate_up_a=gate_up,
            gate_up_b=gate_up,
            t=gate_up,
            x_mask=gate_up and dropout,
            down_a=down,
            down_b=down,
            td=down,
            h_mask=down and dropout,
        )
    )


def _save_context(ctx, inputs: tuple, routing_and_saved: Sequence[torch.Tensor | None]) -> None:
    """Keep what :func:`_backward` reads: the inputs it needs, the routing and saved tensors, the choices."""
    hidden_states, gate_up_proj, down_proj, _, top_k_weights, *factors, _, down_bias = inputs[:13]
    scalings, *gating, lora_dropout, store_gate_up, prescaled_h, _, input_grad_choice, weight_grad_choice = (
        inputs[13:]
    )
    ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, down_bias, *routing_and_saved)
    ctx.set_materialize_grads(False)
    ctx.top_k = inputs[3].shape[-1]
    present = [f.dtype for f in factors if f is not None]
    ctx.ranks = _ranks(factors)
    ctx.stacked_gate_up = _stacked_gate_up(factors, gate_up_proj.shape[1])
    ctx.present = _saved_present(ctx.ranks, lora_dropout, store_gate_up)
    ctx.scalings = tuple(scalings)
    ctx.factor_dtype = present[0] if present else gate_up_proj.dtype
    ctx.weights_dtype = top_k_weights.dtype
    ctx.choices = (*gating, lora_dropout, prescaled_h, input_grad_choice, weight_grad_choice)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _save_context(ctx, inputs, output[1:])
    # The routing and saved tensors are outputs only to reach the backward: autograd would otherwise build a zero
    # gradient of each one's size in every backward (``out`` alone takes a gradient, so it is never None).
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out: torch.Tensor, backward: Callable[..., Sequence] = _experts_backward_op) -> tuple:
    """The gradients of the forward's inputs; ``backward`` computes them (the operator, or
    :func:`_experts_backward_parts` called directly)."""
    hidden_states, gate_up_proj, down_proj, down_bias, *routing_and_saved = ctx.saved_tensors
    routing_tensors, saved = routing_and_saved[:5], routing_and_saved[5:]
    saved = [t if present else None for t, present in zip(saved, ctx.present, strict=True)]
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[4], *n[5:13]]  # top_k_index (input 3) takes no gradient
    grads = backward(
        grad_out,
        hidden_states,
        gate_up_proj,
        down_proj,
        down_bias,
        *routing_tensors,
        ctx.top_k,
        saved,
        list(ctx.ranks),
        ctx.stacked_gate_up,
        list(ctx.scalings),
        ctx.factor_dtype,
        ctx.weights_dtype,
        needs,
        *ctx.choices,
    )
    grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*grads[:3], None, grads[3], *grads[4:], *([None] * 12))


_experts_op.register_autograd(
    lambda ctx, grad_out, *_: _backward(ctx, grad_out), setup_context=_setup_context
)


class _EagerExperts(torch.autograd.Function):
    """The operators' forward and backward, called directly: what eager runs, with the operator's arguments and
    ``out`` alone as its output (the routing and saved tensors stay on ``ctx``). A custom operator's call passes
    PyTorch's dispatcher and its Python autograd wrapper (which rebuilds the schema's argument list once per
    argument), and each of its outputs is one more for autograd: host work repeated for every layer of every
    step. Compiled graphs keep the operators."""

    @staticmethod
    def forward(ctx, *inputs) -> torch.Tensor:
        out, routing_tensors, saved = _experts_forward_parts(*inputs)
        _save_context(ctx, inputs, (*routing_tensors, *saved))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        return _backward(ctx, grad_out, _experts_backward_parts)


def _operator_out(*args) -> torch.Tensor:
    """``out`` of the ``moefuse::experts`` operator (what compiled graphs call)."""
    return _experts_op(*args)[0]


class _Experts4bit(torch.autograd.Function):
    """The fused experts on 4-bit base weights: one autograd function, run eagerly (a 4-bit stack is a tensor
    subclass, which an operator would dequantise on entry)."""

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        routing: ExpertRouting,
        adapter: ExpertsLora | None,
        plan: ExpertsPlan,
        store_gate_up: bool,
        gate_up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None,
        *factors: torch.Tensor
        | None,  # _factor_tensors(adapter): the graph reaches the factors through these
    ) -> torch.Tensor:
        out, saved = experts_forward(
            hidden_states,
            gate_up_proj,
            down_proj,
            top_k_weights,
            routing,
            adapter,
            plan,
            store_gate_up,
            gate_up_bias,
            down_bias,
        )
        ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, down_bias, *saved)
        ctx.routing, ctx.plan = routing, plan
        ctx.factors = FactorSpec.of(adapter, gate_up_proj.dtype)
        ctx.weights_dtype = top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden_states, gate_up_proj, down_proj, down_bias, *saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        grads = experts_backward(
            grad_out,
            hidden_states,
            gate_up_proj,
            down_proj,
            ctx.routing,
            Saved(*saved),
            ctx.factors,
            ctx.weights_dtype,
            [n[0], n[1], n[2], n[3], *n[10:16], n[8], n[9]],
            ctx.plan,
            down_bias,
        )
        return (*grads[:4], None, None, None, None, grads[10], grads[11], *grads[4:10])


@torch.compiler.disable(reason="moefuse's 4-bit experts run eagerly under torch.compile")
def _fused_experts_4bit(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapter: ExpertsLora | None,
    plan: ExpertsPlan,
    store_gate_up: bool,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    routing = route(top_k_index, gate_up_proj.shape[0], on_triton=True)
    return _Experts4bit.apply(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_weights,
        routing,
        adapter,
        plan,
        store_gate_up,
        gate_up_bias,
        down_bias,
        *_factor_tensors(adapter),
    )


def triton_fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: Sequence[ExpertsLora],
    plan: ExpertsPlan,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated experts (``plan.gating``, biases optional) with at most one LoRA adapter on the Triton kernels, as
    ``plan`` (fused) says. Dense weights: the ``moefuse::experts`` operator under torch.compile, its implementation
    through an autograd function in eager; 4-bit ones: an eager autograd function."""
    adapter = lora[0] if lora else None
    factors = _factor_tensors(adapter)
    inputs = (hidden_states, gate_up_proj, down_proj, top_k_weights, gate_up_bias, down_bias, *factors)
    store_gate_up = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if plan.weights == "4bit":
        return _fused_experts_4bit(
            hidden_states,
            gate_up_proj,
            down_proj,
            top_k_index,
            top_k_weights,
            adapter,
            plan,
            store_gate_up,
            gate_up_bias,
            down_bias,
        )
    gating = plan.gating
    experts = _operator_out if torch.compiler.is_compiling() else _EagerExperts.apply
    return experts(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index,
        top_k_weights,
        *factors,
        gate_up_bias,
        down_bias,
        list(FactorSpec.of(adapter, gate_up_proj.dtype).scalings),
        gating.activation,
        gating.alpha,
        gating.limit,
        gating.up_shift,
        gating.interleaved,
        plan.lora_dropout,
        store_gate_up,
        plan.prescaled_h,
        plan.combine_on_grouped_mm,
        plan.input_grad_on_grouped_mm,
        plan.weight_grad_on_grouped_mm,
    )
