"""The gated activations the fused kernels compute in the gate/up GEMM's epilogue, as data.

A :class:`Gating` is frozen: the plan carries it, the kernels take its fields as constants, and calling it runs
its PyTorch reference twin (the composed path's gate function). One formula covers SwiGLU, GeGLU and the clamped
SwiGLU of GPT-OSS (``alpha``, ``limit``, ``up + 1``) and DeepSeek-V4 (``limit``)::

    h = act(min(gate, limit)) * (clamp(up, -limit, limit) + up_shift)

with ``act(x) = x * sigmoid(alpha * x)`` (SiLU at ``alpha = 1``) or GELU's tanh form; gate and up are the rows of
``gate_up_proj`` stacked (all gate rows, then all up rows) or interleaved (gate, up, gate, up, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The activations the fused kernels compute.
ACTIVATIONS = ("silu", "gelu_tanh")

# Transformers' activation classes (transformers.activations) by the name the kernels give their function.
_TRANSFORMERS_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",  # gelu_pytorch_tanh
    "PytorchGELUTanh": "gelu_tanh",  # its name before Transformers 5
    "NewGELUActivation": "gelu_tanh",  # gelu_new: the same formula
}


def activation_name(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The fused kernels' name for ``act_fn`` (one of :data:`ACTIVATIONS`), or ``None`` when they do not compute
    it: SiLU as ``F.silu``, ``nn.SiLU`` or Transformers' ``SiLUActivation``; GELU's tanh form as
    ``nn.GELU(approximate="tanh")`` or Transformers' ``GELUTanh`` / ``NewGELUActivation``."""
    if act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU):
        return "silu"
    if isinstance(act_fn, torch.nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else None
    return _TRANSFORMERS_ACTIVATIONS.get(type(act_fn).__name__)


@dataclass(frozen=True)
class Gating:
    """``[S, 2I] -> [S, I]``: ``act(min(gate, limit)) * (clamp(up, -limit, limit) + up_shift)`` (module docstring).

    Attributes:
        activation: one of :data:`ACTIVATIONS`.
        alpha: the sigmoid's slope in ``x * sigmoid(alpha * x)`` (SiLU only).
        limit: the clamp of gate (above) and up (both sides); ``inf``: no clamp.
        up_shift: added to the clamped up.
        interleaved: gate and up rows alternate (GPT-OSS) instead of all gate rows, then all up rows.
    """

    activation: str = "silu"
    alpha: float = 1.0
    limit: float = math.inf
    up_shift: float = 0.0
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Gating.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation != "silu" and self.alpha != 1.0:
            raise ValueError(
                f"Gating.alpha applies to silu only, got alpha={self.alpha} with {self.activation}"
            )
        if not self.limit > 0:
            raise ValueError(f"Gating.limit must be positive (inf: no clamp), got {self.limit}")

    @property
    def clamped(self) -> bool:
        return math.isfinite(self.limit)

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` columns of the gate/up GEMM's output ``[..., 2I]``."""
        gate, up = halves(gate_up, gate_up.dim() - 1, self.interleaved).unbind(-2)
        return gate, up

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The reference twin of the kernels' epilogue, in PyTorch ops (differentiable)."""
        gate, up = self.split(gate_up)
        if self.clamped:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        if self.activation == "silu":
            act = gate * torch.sigmoid(gate * self.alpha) if self.alpha != 1.0 else F.silu(gate)
        else:
            act = F.gelu(gate, approximate="tanh")
        return act * (up + self.up_shift) if self.up_shift else act * up

    def __str__(self) -> str:
        parts = [self.activation]
        if self.alpha != 1.0:
            parts.append(f"alpha {self.alpha:g}")
        if self.clamped:
            parts.append(f"limit {self.limit:g}")
        if self.up_shift:
            parts.append(f"up + {self.up_shift:g}")
        if self.interleaved:
            parts.append("interleaved")
        return ", ".join(parts)


# SiLU-gated experts, gate rows then up rows: Transformers' default gating.
SWIGLU = Gating()


def gating_of(
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Gating | None:
    """The gating the fused kernels compute for experts gated by ``gate_fn`` (when it is a :class:`Gating`) or
    by ``act_fn(gate) * up`` (``act_fn`` one they compute, :func:`activation_name`), or ``None``."""
    if gate_fn is not None:
        return gate_fn if isinstance(gate_fn, Gating) else None
    name = activation_name(act_fn if act_fn is not None else F.silu)
    return None if name is None else Gating(name)


def halves(t: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    """A view of ``t`` with its ``2I`` gate/up dimension ``dim`` as ``(2, I)``: gate at index 0, up at 1, whichever
    the layout (the kernels read both halves through its strides)."""
    size = t.shape[dim]
    if interleaved:
        return t.unflatten(dim, (size // 2, 2)).transpose(dim, dim + 1)
    return t.unflatten(dim, (2, size // 2))


def recognise_gate(
    gate_fn: Callable[[torch.Tensor], torch.Tensor], candidates: list[Gating]
) -> Gating | None:
    """The first of ``candidates`` that computes what ``gate_fn`` does, checked on probe values in fp64 on the CPU
    (spread past any candidate's limit, so the clamps are checked too), or ``None``. How a family's own gate
    function (a Transformers experts class's ``_apply_gate``) is found to be one the kernels compute: by what it
    returns, not by its name."""
    generator = torch.Generator().manual_seed(0)
    spread = max((c.limit for c in candidates if c.clamped), default=4.0) * 2
    probe = torch.randn(4, 2 * 24, dtype=torch.float64, generator=generator) * spread
    try:
        with torch.no_grad():
            expected = gate_fn(probe)
    except Exception:  # noqa: BLE001 - a gate that cannot run on a probe is not one the kernels compute
        return None
    for candidate in candidates:
        got = candidate(probe)
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-10, atol=1e-12):
            return candidate
    return None
