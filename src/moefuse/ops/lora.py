"""LoRA terms of grouped expert projections, computed without materialising ``W + B·A``.

For a projection with per-expert weights ``W [E, out, in]``, one adapter holds ``lora_A [E, r, in]`` and
``lora_B [E, out, r]`` (each expert's PEFT ``nn.Linear`` factors, stacked) and adds
``scaling * lora_B[e] @ lora_A[e] @ dropout(x)`` to expert ``e``'s output. Here that is two thin grouped
GEMMs, ``t = dropout(x)·Aᵀ`` then ``t·Bᵀ``, on the rows already grouped for the base GEMM; their autograd
gives ``dA``, ``dB`` and ``dx`` and nothing for the frozen base weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .grouped_gemm import moe_fused_linear


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's factors on one projection of every expert: ``W[e] + scaling * lora_B[e] @ lora_A[e]``."""

    lora_A: torch.Tensor  # [E, r, in]
    lora_B: torch.Tensor  # [E, out, r]
    scaling: float = 1.0

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` per expert, ``[E, out, in]`` (for merging and references, never in a forward)."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling


@dataclass(frozen=True)
class ExpertsLora:
    """One LoRA adapter on the experts; a projection left ``None`` is not adapted.

    Gate and up are adapted either apart (``gate`` and ``up``, each ``[E, I, in]``'s factors) or together
    (``gate_up``: one ``lora_A [E, r, in]`` for both and ``lora_B [E, 2I, r]``, gate rows first: the LoRA PEFT's
    ``target_parameters`` puts on the stacked ``gate_up_proj``), never both ways at once.
    ``dropout`` is applied to each adapted projection's input (gate and up read the same input and share one
    dropout mask, so their ``A`` factors run as one GEMM).
    """

    gate: LoraWeights | None = None
    up: LoraWeights | None = None
    down: LoraWeights | None = None
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
    gate_up: LoraWeights | None = None

    def __post_init__(self) -> None:
        if self.gate_up is not None and (self.gate is not None or self.up is not None):
            raise ValueError(
                "an experts adapter holds gate_up (gate and up together) or gate/up (apart), not both"
            )


def check_lora_weights(name: str, lora: LoraWeights, weight_shape: tuple[int, int, int]) -> None:
    """Clear errors for factors that do not fit the ``[E, out, in]`` weight they adapt."""
    num_experts, out_features, in_features = weight_shape
    a, b = lora.lora_A, lora.lora_B
    rank = a.shape[1] if a.dim() == 3 else -1
    if (
        a.dim() != 3
        or b.dim() != 3
        or tuple(a.shape) != (num_experts, rank, in_features)
        or tuple(b.shape) != (num_experts, out_features, rank)
    ):
        raise ValueError(
            f"{name} LoRA factors must be lora_A [E, r, in] = [{num_experts}, r, {in_features}] and "
            f"lora_B [E, out, r] = [{num_experts}, {out_features}, r], got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _dropout(adapter: ExpertsLora, x: torch.Tensor) -> torch.Tensor:
    return x if adapter.dropout is None else adapter.dropout(x)


def _thin(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, m_sizes: torch.Tensor, on_triton: bool | None
) -> torch.Tensor:
    t = moe_fused_linear(x, lora_A, m_sizes, on_triton=on_triton)
    return moe_fused_linear(t, lora_B, m_sizes, on_triton=on_triton)


def _scaled(factor: torch.Tensor, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """``out[...] = scaling * factor`` (in ``out``'s dtype): one kernel, or a differentiable copy under autograd."""
    if torch.is_grad_enabled() and factor.requires_grad:
        return out.copy_(factor * scaling)
    return torch.mul(factor, scaling, out=out)


def gate_up_factors(
    adapter: ExpertsLora, intermediate: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapter's gate and up factors as one pair for the ``[rows, 2I]`` gate/up output (``None`` if neither
    is adapted): ``scaling * A`` stacked along the rank, ``[E, r_gate + r_up, in]``, so ``x`` is read once, and
    a block-diagonal ``B [E, 2I, r_gate + r_up]`` (``gate_up``'s own pair as it is); a small copy of the
    factors in ``dtype`` (default theirs), not of ``W``. Differentiable under autograd: gradients reach each
    projection's own factors."""
    if adapter.gate_up is not None:
        return _copied(adapter.gate_up, dtype)
    halves = (adapter.gate, adapter.up)
    present = [h for h in halves if h is not None]
    if not present:
        return None
    first = present[0].lora_A
    num_experts, in_features = first.shape[0], first.shape[2]
    rank = sum(h.lora_A.shape[1] for h in present)
    lora_A = first.new_empty(num_experts, rank, in_features, dtype=dtype or first.dtype)
    lora_B = first.new_zeros(num_experts, 2 * intermediate, rank, dtype=lora_A.dtype)
    col = 0
    for i, half in enumerate(halves):
        if half is None:
            continue
        r = half.lora_A.shape[1]
        _scaled(half.lora_A, half.scaling, lora_A[:, col : col + r])
        lora_B[:, i * intermediate : (i + 1) * intermediate, col : col + r].copy_(half.lora_B)
        col += r
    return lora_A, lora_B


def down_factors(
    adapter: ExpertsLora, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapter's down factors ``(scaling * A [E, r, I], B [E, H, r])`` in ``dtype`` (default theirs), ``None``
    if down is not adapted."""
    return None if adapter.down is None else _copied(adapter.down, dtype)


def _copied(weights: LoraWeights, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scaling * A, B)`` of one pair, copied in ``dtype`` (default theirs)."""
    dtype = dtype or weights.lora_A.dtype
    # B copied even in its own dtype: the experts operator may not return one of its inputs.
    return _scaled(
        weights.lora_A, weights.scaling, weights.lora_A.new_empty(weights.lora_A.shape, dtype=dtype)
    ), weights.lora_B.to(dtype, copy=True)


def gate_up_lora_delta(
    x: torch.Tensor,
    adapter: ExpertsLora,
    intermediate: int,
    m_sizes: torch.Tensor,
    *,
    on_triton: bool | None = None,
) -> torch.Tensor | None:
    """The adapter's term for the ``[rows, 2I]`` gate/up output (gate columns first), ``None`` if neither is adapted."""
    factors = gate_up_factors(adapter, intermediate)
    return None if factors is None else _thin(_dropout(adapter, x), *factors, m_sizes, on_triton)


def down_lora_delta(
    x: torch.Tensor, adapter: ExpertsLora, m_sizes: torch.Tensor, *, on_triton: bool | None = None
) -> torch.Tensor | None:
    """The adapter's term for the down projection's ``[rows, H]`` output, ``None`` if down is not adapted."""
    factors = down_factors(adapter)
    return None if factors is None else _thin(_dropout(adapter, x), *factors, m_sizes, on_triton)
