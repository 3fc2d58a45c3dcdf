"""The whole experts computation of a top-k MoE block: ``fused_experts`` and its reference.

Layout is Transformers 5.x's: ``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows) and
``down_proj [E, H, I]``. For each token ``t`` and each of its ``K`` chosen experts ``e`` with weight ``w``:
``out[t] += w * down_e(act(gate_e(x_t)) * up_e(x_t))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .gating import Gating, gating_of
from .lora import ExpertsLora, check_lora_weights, down_lora_delta, gate_up_lora_delta
from .moe_4bit import check_frozen, grouped_linear
from .plan import plan_experts
from .routing import check_top_k_index, route


def check_experts_inputs(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    paired: bool = True,
    check_index_range: bool = True,
) -> None:
    """Clear errors for the inputs of :func:`fused_experts` (the index range check costs a host sync on CUDA).

    ``paired``: ``gate_up_proj`` holds gate then up rows ``[E, 2I, H]`` for ``down_proj [E, H, I]``; otherwise
    (a ``gate_fn`` decides what its rows are) only the experts and the hidden size must agree.
    """
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
    if paired and two_i % 2:
        raise ValueError(f"gate_up_proj's second dim must be 2*intermediate (even), got {two_i}")
    if paired and tuple(down_proj.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(
            f"down_proj must be [E, H, I] = {(num_experts, hidden, two_i // 2)} to match gate_up_proj "
            f"{tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}"
        )
    if not paired and tuple(down_proj.shape[:2]) != (num_experts, hidden):
        raise ValueError(
            f"down_proj must be [E, H, I] with (E, H) = {(num_experts, hidden)} to match gate_up_proj "
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
            ("gate_up", (num_experts, two_i, hidden)),
            ("down", tuple(down_proj.shape)),
        ):
            factors = getattr(adapter, name)
            if factors is not None:
                check_lora_weights(name, factors, shape)


def check_experts_biases(
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> None:
    """Clear errors for biases that do not fit the experts' projections (one row per expert)."""
    num_experts, rows, hidden = gate_up_proj.shape
    for name, bias, shape in (
        ("gate_up_bias", gate_up_bias, (num_experts, rows)),
        ("down_bias", down_bias, (num_experts, hidden)),
    ):
        if bias is not None and tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be [E, out] = {shape}, got {tuple(bias.shape)}")


def fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lora: Sequence[ExpertsLora] = (),
    check_index_range: bool = True,
) -> torch.Tensor:
    """Route-sort, gate/up grouped GEMM, gated activation, down grouped GEMM, weighted combine.

    The Triton path fuses gated experts whose gating it computes (``act_fn`` SiLU or GELU's tanh form, or a
    :class:`~moefuse.ops.gating.Gating` as ``gate_fn``), biases included, without ``post_fn``; any other structure
    runs composed: grouped GEMMs with PyTorch ops between them, on every device.

    Args:
        hidden_states: ``[T, H]`` tokens.
        gate_up_proj: ``[E, 2I, H]`` gate rows then up rows of every expert.
        down_proj: ``[E, H, I]``. Either may be frozen 4-bit weights (:class:`moefuse.quant.ExpertWeights4bit`).
        top_k_index: ``[T, K]`` chosen expert ids.
        top_k_weights: ``[T, K]`` routing weights (differentiable: the router learns through them).
        act_fn: activation applied to the gate half (SiLU gives SwiGLU, GELU GeGLU).
        gate_fn: the experts' own gating of the gate/up GEMM's rows ``[S, N] -> [S, I]`` in place of
            ``act_fn(gate) * up``: a :class:`~moefuse.ops.gating.Gating` (which the Triton path fuses), a
            Transformers experts class's ``_apply_gate`` (its layout, e.g. interleaved gate/up columns, and its
            clamps are its own), or the activation of experts without a gate, whose ``gate_up_proj`` is then an up
            projection ``[E, I, H]``. With ``lora``, only gate_up (gate and up together) and down factors.
        gate_up_bias: ``[E, N]`` added to the gate/up GEMM's rows of each expert (before the gating).
        down_bias: ``[E, H]`` added to the down GEMM's rows of each expert.
        post_fn: applied to each expert's output rows ``[S, H]`` before the routing weights (Transformers'
            ``post_expert_norm``).
        lora: LoRA adapters added to the projections (see :mod:`moefuse.ops.lora`), each as two thin
            grouped GEMMs on the grouped rows; ``W + B·A`` is never formed. On the Triton path one adapter
            runs fused (its terms join the base GEMMs' epilogues); several adapters run composed.
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
        paired=gate_fn is None or isinstance(gate_fn, Gating),
        check_index_range=check_index_range,
    )
    if gate_fn is not None and any(a.gate is not None or a.up is not None for a in lora):
        raise ValueError(
            "fused_experts takes gate and up LoRA apart only with act_fn(gate) * up experts: a gate_fn's gate/up "
            "layout is its own; give the adapter gate_up (gate and up together) instead"
        )
    check_experts_lora(lora, gate_up_proj, down_proj)
    check_experts_biases(gate_up_bias, down_bias, gate_up_proj, down_proj)
    check_frozen("gate_up_proj", gate_up_proj)
    check_frozen("down_proj", down_proj)
    plan = plan_experts(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index.shape[-1],
        gating=gating_of(act_fn, gate_fn) if post_fn is None else None,
        biases=gate_up_bias is not None or down_bias is not None,
        lora=lora,
    )
    if plan.fused:
        from .moe_triton import triton_fused_experts

        return triton_fused_experts(
            hidden_states,
            gate_up_proj,
            down_proj,
            top_k_index,
            top_k_weights,
            lora,
            plan,
            gate_up_bias,
            down_bias,
        )
    composed = _composed_on_triton if plan.backend == "triton" else _composed
    return composed(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index,
        top_k_weights,
        act_fn=act_fn,
        gate_fn=gate_fn,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        post_fn=post_fn,
        lora=lora,
        on_triton=plan.backend == "triton",
    )


def _composed(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    lora: Sequence[ExpertsLora],
    on_triton: bool,
) -> torch.Tensor:
    """The composed path: a grouped copy of the rows, then grouped GEMMs (Triton or PyTorch) and PyTorch ops."""
    num_tokens, hidden = hidden_states.shape
    routing = route(top_k_index, gate_up_proj.shape[0], on_triton=on_triton)
    m_sizes = routing.m_sizes
    x = hidden_states[routing.token_index]
    gate_up = grouped_linear(x, gate_up_proj, m_sizes, on_triton=on_triton)
    for adapter in lora:
        delta = gate_up_lora_delta(x, adapter, down_proj.shape[2], m_sizes, on_triton=on_triton)
        gate_up = gate_up if delta is None else gate_up + delta.to(gate_up.dtype)
    # Each grouped row's expert, for the biases' rows.
    biased = gate_up_bias is not None or down_bias is not None
    expert_index = top_k_index.reshape(-1)[routing.sorted_slots] if biased else None
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias[expert_index].to(gate_up.dtype)
    if gate_fn is None:
        gate, up = gate_up.chunk(2, dim=-1)
        h = act_fn(gate) * up
    else:
        h = gate_fn(gate_up)
    y = grouped_linear(h, down_proj, m_sizes, on_triton=on_triton)
    for adapter in lora:
        delta = down_lora_delta(h, adapter, m_sizes, on_triton=on_triton)
        y = y if delta is None else y + delta.to(y.dtype)
    if down_bias is not None:
        y = y + down_bias[expert_index].to(y.dtype)
    if post_fn is not None:
        y = post_fn(y)

    y = y[routing.inverse].view(num_tokens, routing.top_k, hidden)
    out = (y * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    return out.to(hidden_states.dtype)


# The composed path's Triton kernels run eagerly under torch.compile (one graph break): Dynamo would trace into
# their launches. The fused path is an operator (moe_triton.py) and the PyTorch path traces as it is.
_composed_on_triton = torch.compiler.disable(
    _composed, reason="moefuse's composed experts on the Triton kernels run eagerly under torch.compile"
)


def fused_experts_reference(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    lora: Sequence[ExpertsLora] = (),
) -> torch.Tensor:
    """Token-by-expert loop, as Transformers' ``eager`` experts compute it (LoRA as per-expert PEFT ``Linear``s;
    ``gate_fn`` and the biases as in :func:`fused_experts`)."""

    intermediate = down_proj.shape[2]
    # Where each adapted projection's output lies in its weight's output (gate_up_proj's rows: gate, then up).
    columns = {"gate": (0, intermediate), "up": (intermediate, 0), "gate_up": (0, 0), "down": (0, 0)}

    def project(x: torch.Tensor, weight: torch.Tensor, e: int, *which: str) -> torch.Tensor:
        out = F.linear(x, weight[e])
        for adapter in lora:
            for name in which:
                factors = getattr(adapter, name)
                if factors is None:
                    continue
                dropped = (x if adapter.dropout is None else adapter.dropout(x)).to(factors.lora_A.dtype)
                lora_out = F.linear(F.linear(dropped, factors.lora_A[e]), factors.lora_B[e]) * factors.scaling
                out = out + F.pad(lora_out.to(out.dtype), columns[name])
        return out

    out = torch.zeros_like(hidden_states)
    for e in range(gate_up_proj.shape[0]):
        token_idx, k_pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        x = hidden_states[token_idx]
        gate_up = project(x, gate_up_proj, e, "gate", "up", "gate_up")
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[e]
        if gate_fn is None:
            gate, up = gate_up.chunk(2, dim=-1)
            h = act_fn(gate) * up
        else:
            h = gate_fn(gate_up)
        y = project(h, down_proj, e, "down")
        if down_bias is not None:
            y = y + down_bias[e]
        y = y * top_k_weights[token_idx, k_pos, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out
