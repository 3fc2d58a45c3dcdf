"""Level ``block``: the model's sparse MoE block (router + experts) with each experts implementation."""

from __future__ import annotations

import copy

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from .implementations import Implementation, set_experts_implementation
from .runner import BenchContext, Case

DESCRIPTION = "the model's sparse MoE block (router + experts)"
FLOPS_FORMULA = (
    "routed experts' GEMMs only (router, shared experts and elementwise work not counted): "
    "fwd = 2 * tokens * top_k * P_expert, P_expert = gate_up_rows * hidden + hidden * moe_intermediate "
    "(= 6 * T * K * H * I for gated experts); fwd+bwd = 3 * fwd (forward, input gradient, weight gradient)"
)
MODES = ("fwd", "fwd+bwd")


def unsupported(implementation: Implementation) -> str | None:
    """Why the block level cannot run ``implementation`` (``None`` when it can)."""
    if implementation.model_level_only:
        return f"the block level runs no whole model ({implementation.model_level_only}: the model level)"
    return None


def randomize_(module: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic random weights from ``seed``: matrices N(0, std), norm weights and scales 1 (Gemma 4's router
    scales its input and each expert's weight), biases 0, as the models initialise them, so activations keep
    their scale through the layers and routing spreads over experts."""
    generator = None
    with torch.no_grad():
        for name, param in module.named_parameters():
            if generator is None:
                generator = torch.Generator(param.device).manual_seed(seed)
            if param.dim() >= 2:
                param.normal_(0.0, std, generator=generator)
            else:
                param.fill_(1.0 if "norm" in name or name.rsplit(".", 1)[-1].endswith("scale") else 0.0)


class LayerRoutedExperts(torch.nn.Module):
    """The router and experts of a decoder layer that holds them itself (Gemma 4's, beside a dense MLP) as one
    block: the layer's own ``experts(x, top_k_index, top_k_weights)`` on what its ``router(x)`` returns
    (Transformers' routers return ``(scores, top_k_weights, top_k_index)``). The layer's norms around the experts
    are left out, as the FLOP count leaves out elementwise work."""

    def __init__(self, router: torch.nn.Module, experts: torch.nn.Module):
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = self.router(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(hidden_states.shape)


def _build_block(ctx: BenchContext) -> torch.nn.Module:
    block_class = ctx.shape.block_class
    if not (isinstance(block_class, type) and issubclass(block_class, GradientCheckpointingLayer)):
        return block_class(ctx.config)
    layer = block_class(ctx.config, 0)  # decoder layers take their index
    if not all(isinstance(getattr(layer, name, None), torch.nn.Module) for name in ("router", "experts")):
        raise SystemExit(
            f"moefuse bench: model type '{ctx.config.model_type}' keeps its experts on the decoder layer "
            f"({block_class.__name__}) without a router module beside them in its first layer, so the block "
            "level cannot time them apart; use --level op (the experts) or --level model"
        )
    return LayerRoutedExperts(layer.router, layer.experts)


def random_block(ctx: BenchContext) -> torch.nn.Module:
    """The config's MoE block (router + experts) on the device, in ``ctx.dtype``, with random weights from
    ``ctx.seed``."""
    with torch.device(ctx.device):
        block = _build_block(ctx)
    block.to(ctx.dtype)
    randomize_(block, ctx.seed, getattr(ctx.config, "initializer_range", 0.02))
    return block


class BlockWorkload:
    """Forward (with autograd recording, as in training) or forward+backward of the shared block."""

    def __init__(
        self,
        block: torch.nn.Module,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        flops_forward: float,
        implementation: Implementation,
    ):
        self.block, self.x, self.grad_out, self.flops_forward = block, x, grad_out, flops_forward
        self.forward = implementation.compile(block)

    def _forward(self) -> torch.Tensor:
        out = self.forward(self.x)
        return out[0] if isinstance(out, tuple) else out  # some blocks also return the router logits

    def _forward_backward(self) -> torch.Tensor:
        self.x.grad = None
        self.block.zero_grad(set_to_none=True)
        out = self._forward()
        out.backward(self.grad_out)
        return out

    def check_tensors(self) -> dict[str, torch.Tensor]:
        out = self._forward_backward()
        grads = {f"grad {name}": p.grad for name, p in self.block.named_parameters() if p.grad is not None}
        tensors = {"output": out.detach(), "grad input": self.x.grad, **grads}
        self.close()  # the returned tensors are the caller's now; timing starts without gradients held
        return tensors

    def perturbed_check_tensors(self) -> dict[str, torch.Tensor] | None:
        """The reference's own rounding, as the check's noise floor: the same block and inputs in fp32 (``None``
        where they already are). A gradient summed over many rows (an expert bias's) carries a large part of it
        in bf16, for every implementation."""
        if self.x.dtype == torch.float32:
            return None
        block = copy.deepcopy(self.block).float()
        x = self.x.detach().float().requires_grad_()
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(self.grad_out.float())
        grads = {f"grad {name}": p.grad for name, p in block.named_parameters() if p.grad is not None}
        return {"output": out.detach(), "grad input": x.grad, **grads}

    def run(self, mode: str) -> None:
        if mode == "fwd":
            self._forward()
        else:
            self._forward_backward()

    def flops(self, mode: str) -> float:
        return self.flops_forward * (1 if mode == "fwd" else 3)

    def details(self) -> dict:
        return {}

    def close(self) -> None:
        self.x.grad = None
        self.block.zero_grad(set_to_none=True)
        if self.forward is not self.block:
            torch._dynamo.reset()  # the next implementation compiles afresh


def cases(ctx: BenchContext, tokens: int) -> list[Case]:
    block = random_block(ctx)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed + 1)
    hidden = ctx.shape.hidden
    x = torch.randn(1, tokens, hidden, generator=generator, device=ctx.device).to(ctx.dtype).requires_grad_()
    grad_out = torch.randn(1, tokens, hidden, generator=generator, device=ctx.device).to(ctx.dtype)
    flops_forward = 2 * tokens * ctx.shape.top_k * ctx.shape.expert_params

    def make(implementation: Implementation) -> BlockWorkload:
        # One block, one set of weights and inputs: only the experts implementation changes between cases.
        set_experts_implementation(block, implementation)
        return BlockWorkload(block, x, grad_out, flops_forward, implementation)

    return [Case("", impl, lambda impl=impl: make(impl)) for impl in ctx.implementations]
