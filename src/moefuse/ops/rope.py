"""Rotary position embedding of queries and keys as Transformers applies it, in one kernel each way on Triton.

``apply_rotary_pos_emb(q, k, cos, sin)`` returns ``x * cos + rotate_half(x) * sin`` for ``x`` in ``q`` and ``k``
(``[B, heads, S, D]``, cos and sin ``[B or 1, S, D]``): the function of Qwen3-MoE's, Qwen2-MoE's, Mixtral's and
OLMoE's modeling code, with the same arguments. On the Triton backend both rotations are one kernel
(:mod:`moefuse.kernels.rope`) and so are their gradients, the products in fp32 and rounded once (Transformers
rounds each product and the sum to the inputs' dtype: within one rounding of it in bf16). Under torch.compile,
elsewhere, and for what the kernel does not take (a rotary part narrower than the head, cos or sin that take a gradient, an odd or
non-power-of-two half), :func:`rope_reference` runs. :func:`fused_rope` puts it into a model family's modeling
code for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .backend import launches_triton
from .launch import launch, next_power_of_2

# Model types whose modeling code applies rotary embeddings with the formula above, under this function name
# (each family tested against its own function).
ROPE_MODEL_TYPES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"})
# Elements a program holds per half-row block: heads rotated at once = this / (D / 2).
_BLOCK_ELEMENTS = 2048


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb`` in PyTorch ops (differentiable)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _head_strides(name: str, t: torch.Tensor) -> dict[str, int]:
    """The batch, head and token strides of ``t [B, heads, S, D]`` as the kernel's ``stride_<name>{b,h,s}``."""
    return dict(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}s"), t.stride()[:3], strict=True))


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rotation (or its transpose) of ``q [B, Hq, S, D]`` and ``k [B, Hk, S, D]``, into tensors of
    their own memory layout."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    batch, q_heads, seq_len, dim = q.shape
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    half = dim // 2
    launch(
        _kernels().rope_kernel,
        lambda meta: (batch * seq_len,),
        q_ptr=q,
        k_ptr=k,
        cos_ptr=cos,
        sin_ptr=sin,
        q_out_ptr=q_out,
        k_out_ptr=k_out,
        seq_len=seq_len,
        q_heads=q_heads,
        k_heads=k.shape[1],
        **_head_strides("q", q),
        **_head_strides("k", k),
        stride_cb=cos.stride(0) if cos.shape[0] > 1 else 0,
        stride_cs=cos.stride(1),
        **_head_strides("qo", q_out),
        **_head_strides("ko", k_out),
        BACKWARD=backward,
        BLOCK_HEADS=max(1, min(next_power_of_2(max(q_heads, k.shape[1])), _BLOCK_ELEMENTS // half)),
        HALF=half,
        num_warps=4,
    )
    return q_out, k_out


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(_unit_last(grad_q), _unit_last(grad_k), cos, sin, backward=True)
        return dq, dk, None, None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernels():
    from ..kernels import rope

    return rope


def _fused_applies(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> bool:
    """Whether the kernel takes these operands (else the reference runs)."""
    dim = q.shape[-1]
    return (
        unsqueeze_dim == 1
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[-1] == dim == k.shape[-1]
        and cos.shape[1] == q.shape[2] == k.shape[2]
        and cos.shape[0] in (1, q.shape[0])
        and q.shape[0] == k.shape[0]
        and dim % 2 == 0
        and next_power_of_2(dim // 2) == dim // 2
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
        and cos.stride() == sin.stride()
        and not (cos.requires_grad or sin.requires_grad)
        and q.dtype == k.dtype
        and launches_triton(q)
    )


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb`` (same arguments, same results up to rounding): one Triton kernel
    each way where it applies, :func:`rope_reference` otherwise."""
    if _fused_applies(q, k, cos, sin, unsqueeze_dim):
        return _RotaryEmbedding.apply(q, k, cos, sin)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)


@contextlib.contextmanager
def fused_rope(model: nn.Module) -> Iterator[bool]:
    """Within the block, the modeling code of ``model``'s layers (a Transformers model, a subclass such as
    ``Qwen3MoeFusedForCausalLM``, or a PEFT model around one) applies rotary embeddings through
    :func:`apply_rotary_pos_emb`. Yields whether it does: only families in :data:`ROPE_MODEL_TYPES` are switched.
    The switch is the modeling module's global function, so every model of that family in the process takes it
    while the block runs; it is put back on exit."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # The modeling modules of the model's layers (its attention's, whatever class wraps the model).
    modules = (
        {sys.modules.get(type(m).__module__) for m in model.modules()}
        if model_type in ROPE_MODEL_TYPES
        else ()
    )
    originals = {m: m.apply_rotary_pos_emb for m in modules if hasattr(m, "apply_rotary_pos_emb")}
    for module in originals:
        module.apply_rotary_pos_emb = apply_rotary_pos_emb
    try:
        yield bool(originals)
    finally:
        for module, original in originals.items():
            module.apply_rotary_pos_emb = original
