"""The experts' plan: every choice of how one :func:`moefuse.fused_experts` call runs, made once.

:func:`plan_experts` reads the settings (:mod:`moefuse.settings`) and the operands' devices, dtypes, shapes and
structure, never their values (so it costs no host sync), and returns a frozen :class:`ExpertsPlan`. The ops below
take the plan and follow it; none of them decides again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.tensor import is_4bit
from ..settings import Settings, settings
from .backend import device_capability, use_triton
from .gating import SWIGLU, Gating
from .grouped_gemm import HAS_GROUPED_MM, grouped_mm_supports
from .lora import ExpertsLora

# Why a call runs composed (grouped GEMMs with PyTorch ops between them) instead of the fused Triton path.
NOT_TRITON = "the PyTorch backend runs these tensors"
NOT_GATED = (
    "the experts' gating is not one the fused kernels compute (act(gate) * up with SiLU or GELU-tanh, or a clamped "
    "SwiGLU as GPT-OSS's) or they apply a norm after each expert"
)
SEVERAL_ADAPTERS = "several LoRA adapters"
CUSTOM_DROPOUT = "a LoRA dropout that is not nn.Dropout"


@dataclass(frozen=True)
class ExpertsPlan:
    """How one experts call runs.

    Attributes:
        backend: ``"triton"`` or ``"torch"``: the grouped GEMMs and the routing.
        fused: the whole block is one Triton autograd function (gather, SwiGLU, LoRA and combine in the GEMMs'
            epilogues); otherwise it runs composed.
        composed_because: why it runs composed (empty when fused).
        gating: the fused path's gated activation (:class:`~moefuse.ops.gating.Gating`; ``None`` when composed: the
            composed path calls the experts' own functions).
        weights: ``"dense"`` or ``"4bit"`` (each 4-bit stack dequantised for the GEMMs that read it).
        lora: ``"none"``, ``"fused"`` (one adapter, its terms in the epilogues) or ``"composed"``.
        lora_dropout: the fused path's LoRA dropout probability (0 without dropout).
        prescaled_h: ``h`` is stored times the routing weight (the down weight is trained, no LoRA reads ``h`` and no
            bias joins the down GEMM),
            so the down GEMM and its weight gradient need no row scale.
        combine_on_grouped_mm: the forward's down GEMM and combine run on ``grouped_mm`` then a token sum (only
            with ``prescaled_h``: nothing then joins that GEMM's epilogue).
        input_grad_on_grouped_mm: the input gradient's GEMM and combine run on ``grouped_mm`` (no gate/up LoRA).
        weight_grad_on_grouped_mm: the base weights' gradients run on ``grouped_mm``.
    """

    backend: str
    fused: bool
    composed_because: str
    gating: Gating | None
    weights: str
    lora: str
    lora_dropout: float
    prescaled_h: bool
    combine_on_grouped_mm: bool
    input_grad_on_grouped_mm: bool
    weight_grad_on_grouped_mm: bool

    def describe(self) -> str:
        """One line for ``moefuse info`` and benchmark reports."""
        if not self.fused:
            return f"{self.backend}, composed ({self.composed_because}); weights {self.weights}, LoRA {self.lora}"
        on_grouped_mm = [
            name
            for name, chosen in (
                ("forward combine", self.combine_on_grouped_mm),
                ("input gradient", self.input_grad_on_grouped_mm),
                ("weight gradients", self.weight_grad_on_grouped_mm),
            )
            if chosen
        ]
        cutlass = f"; on grouped_mm: {', '.join(on_grouped_mm)}" if on_grouped_mm else ""
        return f"triton, fused ({self.gating}); weights {self.weights}, LoRA {self.lora}{cutlass}"


def lora_dropout_p(adapter: ExpertsLora) -> float | None:
    """The dropout probability the fused path applies for ``adapter``, or ``None`` when it cannot (a custom
    callable: the composed path runs it as given)."""
    dropout = adapter.dropout
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return 0.0
    if isinstance(dropout, torch.nn.Dropout):
        return dropout.p if dropout.training else 0.0
    return None


def grouped_mm_competes(t: torch.Tensor, weights_dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` (CUTLASS) is a candidate for the products with nothing of moefuse's in their epilogue:
    on Hopper in bf16, where it measured ahead of the Triton kernels from the settings' batch sizes on."""
    return (
        HAS_GROUPED_MM
        and t.is_cuda
        and t.dtype == weights_dtype == torch.bfloat16
        and device_capability(t.device.index) >= (9, 0)
    )


def plan_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    *,
    gating: Gating | None = SWIGLU,
    biases: bool = False,
    lora: Sequence[ExpertsLora] = (),
    config: Settings | None = None,
) -> ExpertsPlan:
    """The plan of one experts call on these operands.

    Args:
        hidden_states: ``[T, H]``.
        gate_up_proj: ``[E, 2I, H]``, dense or 4-bit.
        down_proj: ``[E, H, I]``, dense or 4-bit.
        top_k: experts per token.
        gating: the experts' gated activation where the kernels compute it (no post-expert norm); ``None``
            otherwise.
        biases: the experts have biases (the down bias keeps the routing weight out of ``h``).
        lora: the LoRA adapters on the projections.
        config: the settings to plan with (default: those in force).
    """
    config = config or settings()
    four_bit = is_4bit(gate_up_proj) or is_4bit(down_proj)
    backend = "triton" if use_triton(hidden_states) else "torch"
    dropout = lora_dropout_p(lora[0]) if len(lora) == 1 else 0.0
    composed_because = next(
        (
            reason
            for reason, applies in (
                (NOT_TRITON, backend != "triton"),
                (NOT_GATED, gating is None),
                (SEVERAL_ADAPTERS, len(lora) > 1),
                (CUSTOM_DROPOUT, dropout is None),
            )
            if applies
        ),
        "",
    )
    fused = not composed_because
    adapter = lora[0] if len(lora) == 1 else None
    down_lora = adapter is not None and adapter.down is not None
    gate_up_lora = adapter is not None and any(
        w is not None for w in (adapter.gate, adapter.up, adapter.gate_up)
    )
    prescaled_h = fused and down_proj.requires_grad and not down_lora and not biases
    rows_per_expert = hidden_states.shape[0] * top_k // max(1, gate_up_proj.shape[0])
    cutlass = fused and grouped_mm_competes(hidden_states, gate_up_proj.dtype)

    def on_grouped_mm(threshold: int, weight: torch.Tensor | None = None) -> bool:
        if not (cutlass and rows_per_expert >= threshold):
            return False
        return weight is None or four_bit or grouped_mm_supports(weight)

    return ExpertsPlan(
        backend=backend,
        fused=fused,
        composed_because=composed_because,
        gating=gating if fused else None,
        weights="4bit" if four_bit else "dense",
        lora="none" if not lora else ("fused" if fused else "composed"),
        lora_dropout=dropout or 0.0,
        prescaled_h=prescaled_h,
        combine_on_grouped_mm=prescaled_h
        and on_grouped_mm(config.grouped_mm_combine_rows, down_proj.transpose(1, 2)),
        input_grad_on_grouped_mm=not gate_up_lora
        and on_grouped_mm(config.grouped_mm_combine_rows, gate_up_proj),
        weight_grad_on_grouped_mm=on_grouped_mm(config.grouped_mm_weight_grad_rows),
    )
