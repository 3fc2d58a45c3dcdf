"""The whole experts computation of a top-k MoE block: ``fused_experts`` and its reference.

Layout is Transformers 5.x's: ``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows) and
``down_proj [E, H, I]``. For each token ``t`` and each of its ``K`` chosen experts ``e`` with weight ``w``:
``out[t] += w * down_e(act(gate_e(x_t)) * up_e(x_t))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .backend import use_triton
from .grouped_gemm import moe_fused_linear
from .lora import ExpertsLora, check_lora_weights, down_lora_delta, gate_up_lora_delta
from .routing import ExpertRouting, check_top_k_index, route


def check_experts_inputs(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    check_index_range: bool = True,
) -> None:
    """Clear errors for the inputs of :func:`fused_experts` (the index range check costs a host sync on CUDA)."""
    if hidden_states.dim() != 2:
        raise ValueError(
            f"hidden_states must be 2-D [tokens, hidden], got shape {tuple(hidden_states.shape)}"
        )
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            "gate_up_proj must be [E, 2*I, H] and down_proj [E, H, I], "
            f"got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    num_experts, two_i, hidden = gate_up_proj.shape
    if two_i % 2:
        raise ValueError(f"gate_up_proj's second dim must be 2*intermediate (even), got {two_i}")
    if tuple(down_proj.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(
            f"down_proj must be [E, H, I] = {(num_experts, hidden, two_i // 2)} to match gate_up_proj "
            f"{tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}"
        )
    if hidden_states.shape[1] != hidden:
        raise ValueError(
            f"hidden_states has {hidden_states.shape[1]} features, the experts expect hidden={hidden}"
        )
    for name, t in (
        ("hidden_states", hidden_states),
        ("gate_up_proj", gate_up_proj),
        ("down_proj", down_proj),
    ):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if gate_up_proj.dtype != down_proj.dtype:
        raise TypeError(
            f"gate_up_proj and down_proj must share a dtype, got {gate_up_proj.dtype} and {down_proj.dtype}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights {tuple(top_k_weights.shape)} must have the shape of top_k_index {tuple(top_k_index.shape)}"
        )
    if not top_k_weights.dtype.is_floating_point:
        raise TypeError(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
    if top_k_index.dim() == 2 and top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"top_k_index has {top_k_index.shape[0]} rows but hidden_states has {hidden_states.shape[0]} tokens"
        )
    if check_index_range:
        check_top_k_index(top_k_index, num_experts)


def check_experts_lora(
    lora: Sequence[ExpertsLora], gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> None:
    """Clear errors for LoRA factors that do not fit the experts' projections."""
    num_experts, two_i, hidden = gate_up_proj.shape
    for adapter in lora:
        for name, shape in (
            ("gate", (num_experts, two_i // 2, hidden)),
            ("up", (num_experts, two_i // 2, hidden)),
            ("down", tuple(down_proj.shape)),
        ):
            factors = getattr(adapter, name)
            if factors is not None:
                check_lora_weights(name, factors, shape)


def is_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``act_fn`` is SiLU (the function, ``nn.SiLU`` or Transformers' ``SiLUActivation``): SwiGLU experts."""
    return act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


class _FusedSwiGLUExperts(torch.autograd.Function):
    """The Triton path: gather fused into the gate/up GEMM, SwiGLU into its epilogue, the routing-weight multiply
    and the combine into the down GEMM's epilogue. Saved for backward: the pre-activations ``[S, 2I]`` and
    ``h [S, I]`` (the down GEMM's input, for its weight gradient), nothing of size ``[S, H]``."""

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        routing: ExpertRouting,
        deterministic: bool,
        needs_grad: bool,
    ) -> torch.Tensor:
        from . import triton_gemm

        num_tokens, hidden = hidden_states.shape
        x = hidden_states.to(gate_up_proj.dtype)
        scale = top_k_weights.reshape(-1)[routing.sorted_slots]
        h, gate_up = triton_gemm.gate_up_swiglu(
            x, gate_up_proj, routing.m_sizes, routing.token_index, store_gate_up=needs_grad
        )
        out = _combine(
            lambda **where: triton_gemm.grouped_gemm(h, down_proj, routing.m_sizes, row_scale=scale, **where),
            routing,
            num_tokens,
            hidden,
            down_proj.dtype,
            deterministic,
        )
        ctx.save_for_backward(x, gate_up_proj, down_proj, gate_up, h, scale)
        ctx.routing, ctx.deterministic, ctx.weights_dtype = routing, deterministic, top_k_weights.dtype
        return out.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from . import triton_gemm

        x, gate_up_proj, down_proj, gate_up, h, scale = ctx.saved_tensors
        routing: ExpertRouting = ctx.routing
        m_sizes, token_index = routing.m_sizes, routing.token_index
        grad_out = grad_out.to(down_proj.dtype)
        d_gate_up, d_scale = triton_gemm.swiglu_backward(
            grad_out, down_proj, gate_up, scale, m_sizes, token_index
        )
        grad_x = grad_gate_up_proj = grad_down_proj = grad_weights = None
        if ctx.needs_input_grad[0]:
            weight_t = gate_up_proj.transpose(1, 2)
            grad_x = _combine(
                lambda **where: triton_gemm.grouped_gemm(d_gate_up, weight_t, m_sizes, **where),
                routing,
                x.shape[0],
                x.shape[1],
                x.dtype,
                ctx.deterministic,
            )
        if ctx.needs_input_grad[1]:
            grad_gate_up_proj = triton_gemm.grouped_weight_grad(d_gate_up, x, m_sizes, b_index=token_index)
        if ctx.needs_input_grad[2]:
            grad_down_proj = triton_gemm.grouped_weight_grad(
                grad_out, h, m_sizes, a_index=token_index, row_scale=scale
            )
        if ctx.needs_input_grad[3]:
            grad_weights = torch.empty_like(d_scale)
            grad_weights[routing.sorted_slots] = d_scale
            grad_weights = grad_weights.view(x.shape[0], routing.top_k).to(ctx.weights_dtype)
        return grad_x, grad_gate_up_proj, grad_down_proj, grad_weights, None, None, None


def _combine(
    gemm: Callable[..., torch.Tensor],
    routing: ExpertRouting,
    num_tokens: int,
    width: int,
    dtype: torch.dtype,
    deterministic: bool,
) -> torch.Tensor:
    """Sum each token's ``K`` expert rows straight from the GEMM's epilogue: atomic adds into an fp32 ``[T, H]``,
    or, deterministic, a store of every row at its slot ``t * K + k`` and a sum over ``K``."""
    if deterministic:
        slots = torch.empty(num_tokens * routing.top_k, width, device=routing.m_sizes.device, dtype=dtype)
        gemm(out=slots, out_index=routing.sorted_slots)
        return slots.view(num_tokens, routing.top_k, width).sum(dim=1)
    total = torch.zeros(num_tokens, width, device=routing.m_sizes.device, dtype=torch.float32)
    gemm(out=total, out_index=routing.token_index, accumulate=True)
    return total.to(dtype)


def fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    lora: Sequence[ExpertsLora] = (),
    deterministic: bool | None = None,
    check_index_range: bool = True,
) -> torch.Tensor:
    """Route-sort, gate/up grouped GEMM, gated activation, down grouped GEMM, weighted combine.

    Args:
        hidden_states: ``[T, H]`` tokens.
        gate_up_proj: ``[E, 2I, H]`` gate rows then up rows of every expert.
        down_proj: ``[E, H, I]``.
        top_k_index: ``[T, K]`` chosen expert ids.
        top_k_weights: ``[T, K]`` routing weights (differentiable: the router learns through them).
        act_fn: activation applied to the gate half (SiLU gives SwiGLU).
        lora: LoRA adapters added to the projections (see :mod:`moefuse.ops.lora`), each as two thin
            grouped GEMMs on the grouped rows; ``W + B·A`` is never formed.
        deterministic: on the Triton path, combine the experts' outputs (and the input gradient) without
            atomics, so results repeat bit for bit; default: ``torch.are_deterministic_algorithms_enabled()``.
        check_index_range: check that every id in ``top_k_index`` is an expert (one host sync on CUDA); a
            caller whose ids come from ``topk`` over the experts may skip it.

    Returns:
        ``[T, H]`` in ``hidden_states``' dtype.
    """
    check_experts_inputs(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index,
        top_k_weights,
        check_index_range=check_index_range,
    )
    check_experts_lora(lora, gate_up_proj, down_proj)
    num_tokens, hidden = hidden_states.shape
    routing = route(top_k_index, gate_up_proj.shape[0])
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()

    if not lora and is_silu(act_fn) and use_triton(hidden_states):
        inputs = (hidden_states, gate_up_proj, down_proj, top_k_weights)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        return _FusedSwiGLUExperts.apply(*inputs, routing, deterministic, needs_grad)

    # The composed path: a grouped copy of the rows, then grouped GEMMs (Triton or PyTorch) and PyTorch ops.
    x = hidden_states[routing.token_index]
    gate_up = moe_fused_linear(x, gate_up_proj, routing.m_sizes)
    for adapter in lora:
        delta = gate_up_lora_delta(x, adapter, down_proj.shape[2], routing.m_sizes)
        gate_up = gate_up if delta is None else gate_up + delta.to(gate_up.dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    h = act_fn(gate) * up
    y = moe_fused_linear(h, down_proj, routing.m_sizes)
    for adapter in lora:
        delta = down_lora_delta(h, adapter, routing.m_sizes)
        y = y if delta is None else y + delta.to(y.dtype)

    y = y[routing.inverse].view(num_tokens, routing.top_k, hidden)
    out = (y * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    return out.to(hidden_states.dtype)


def fused_experts_reference(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    lora: Sequence[ExpertsLora] = (),
) -> torch.Tensor:
    """Token-by-expert loop, as Transformers' ``eager`` experts compute it (LoRA as per-expert PEFT ``Linear``s)."""

    def project(x: torch.Tensor, weight: torch.Tensor, e: int, which: str) -> torch.Tensor:
        out = F.linear(x, weight[e])
        for adapter in lora:
            factors = getattr(adapter, which)
            if factors is not None:
                dropped = (x if adapter.dropout is None else adapter.dropout(x)).to(factors.lora_A.dtype)
                lora_out = F.linear(F.linear(dropped, factors.lora_A[e]), factors.lora_B[e]) * factors.scaling
                out = out + lora_out.to(out.dtype)
        return out

    out = torch.zeros_like(hidden_states)
    intermediate = down_proj.shape[2]
    for e in range(gate_up_proj.shape[0]):
        token_idx, k_pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        x = hidden_states[token_idx]
        gate = project(x, gate_up_proj[:, :intermediate], e, "gate")
        up = project(x, gate_up_proj[:, intermediate:], e, "up")
        y = project(act_fn(gate) * up, down_proj, e, "down") * top_k_weights[token_idx, k_pos, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out
