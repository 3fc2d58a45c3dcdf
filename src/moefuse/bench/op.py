"""Level ``op``: one grouped GEMM (an experts projection over routed rows) and its backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import moe_fused_linear, moe_fused_linear_reference
from .implementations import Implementation
from .runner import BenchContext, Case

DESCRIPTION = "one grouped GEMM of the experts (gate_up or down projection) and its backward"
FLOPS_FORMULA = (
    "R = tokens * top_k routed rows; fwd = 2 * R * in * out (gate_up: in = hidden, out = 2 * moe_intermediate; "
    "down: in = moe_intermediate, out = hidden); fwd+bwd = 3 * fwd (forward, input gradient, weight gradient)"
)
MODES = ("fwd", "fwd+bwd")


def torch_grouped_mm(x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` called directly, as Transformers' ``grouped_mm`` experts call it."""
    return F.grouped_mm(x, weight.transpose(1, 2), offs=torch.cumsum(m_sizes, 0, dtype=torch.int32))


# Each takes (rows [R, in] grouped by expert, weight [E, out, in], m_sizes [E]) → [R, out].
OP_IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "moefuse": moe_fused_linear,
    "grouped_mm": torch_grouped_mm,
    "eager": moe_fused_linear_reference,  # a per-expert F.linear loop, as Transformers' eager experts
}


def unsupported(implementation: Implementation) -> str | None:
    """Why the op level cannot run ``implementation`` (``None`` when it can)."""
    if implementation.model_level_only:
        return f"the op level runs no whole model ({implementation.model_level_only}: the model level)"
    if implementation.experts in OP_IMPLEMENTATIONS:
        return None
    return f"the op level compares {', '.join(OP_IMPLEMENTATIONS)} only"


class GroupedGemmWorkload:
    def __init__(
        self, fn, x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, grad_out: torch.Tensor
    ):
        self.fn, self.x, self.weight, self.m_sizes, self.grad_out = fn, x, weight, m_sizes, grad_out

    def _forward_backward(self) -> torch.Tensor:
        self.x.grad = self.weight.grad = None
        out = self.fn(self.x, self.weight, self.m_sizes)
        out.backward(self.grad_out)
        return out

    def check_tensors(self) -> dict[str, torch.Tensor]:
        out = self._forward_backward()
        tensors = {"output": out.detach(), "grad input": self.x.grad, "grad weight": self.weight.grad}
        self.close()
        return tensors

    def perturbed_check_tensors(self) -> None:
        return None  # one GEMM: correct kernels differ by rounding only

    def run(self, mode: str) -> None:
        if mode == "fwd":
            self.fn(self.x, self.weight, self.m_sizes)
        else:
            self._forward_backward()

    def flops(self, mode: str) -> float:
        forward = 2 * self.x.shape[0] * self.weight.shape[1] * self.weight.shape[2]
        return forward * (1 if mode == "fwd" else 3)

    def details(self) -> dict:
        return {"rows": self.x.shape[0]}

    def close(self) -> None:
        self.x.grad = self.weight.grad = None


def random_m_sizes(tokens: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Rows per expert when each token picks ``top_k`` distinct experts uniformly at random."""
    choices = torch.rand(tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices
    return torch.bincount(choices.flatten(), minlength=num_experts)


def cases(ctx: BenchContext, tokens: int) -> list[Case]:
    shape = ctx.shape
    generator = torch.Generator().manual_seed(ctx.seed)
    m_sizes = random_m_sizes(tokens, shape.num_experts, shape.top_k, generator)
    rows = int(m_sizes.sum())
    on_device = m_sizes.to(ctx.device)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * scale).to(ctx.device, ctx.dtype)

    result = []
    for projection, (out_features, in_features) in shape.projections().items():
        x = randn(rows, in_features).requires_grad_()
        weight = randn(shape.num_experts, out_features, in_features, scale=in_features**-0.5).requires_grad_()
        grad_out = randn(rows, out_features)
        for impl in ctx.implementations:
            fn = OP_IMPLEMENTATIONS[impl.experts]
            result.append(
                Case(
                    projection,
                    impl,
                    lambda fn=fn, x=x, w=weight, g=grad_out: GroupedGemmWorkload(fn, x, w, on_device, g),
                )
            )
    return result
