"""Launchers of the grouped GEMMs on 4-bit expert weights, with the signatures of :mod:`moefuse.ops.triton_gemm`'s.

Each takes an :class:`~moefuse.quant.ExpertWeights4bit` where the dense launcher takes a weight tensor (a
``transpose(1, 2)`` view reads the input-gradient orientation), so the experts' autograd runs on either. Two ways
to run them, chosen by :func:`gemm_mode` (``MOEFUSE_4BIT_GEMM=fused|dequantize|auto``, or :func:`set_gemm_mode`):

- ``fused``: the 4-bit kernels of :mod:`moefuse.kernels.grouped_gemm_4bit`, which dequantise each weight tile in
  registers (weights read at half a byte per value);
- ``dequantize``: the stack is dequantised into a temporary dense copy (one Triton kernel), the dense kernel runs
  on it and the copy is freed (one projection's stack at a time, never kept for backward).

``auto`` takes ``dequantize``: measured on an H100 (``benchmarks/quant_gemm.py``, Qwen3-30B-A3B dims,
``benchmarks/results/quant_gemm_qwen3-30b-a3b_NVIDIA_H100_80GB_HBM3.json``), the fused kernels run at 0.18-0.38x
of dequantise-then-GEMM's speed at 1024 tokens and 0.06-0.15x at 16384: each row tile dequantises its weight tiles
again (about ten instructions per value against the dot's share), so the cost grows with the tokens while the
dequantise pass is paid once per stack. (The first fused version, per-value gathers, was 13-16x slower.)
"""

from __future__ import annotations

import os

import torch
import triton

from ..kernels import grouped_gemm_4bit as kernels
from ..quant.tensor import ExpertWeights4bit
from . import triton_gemm as dense
from .launch import launch
from .triton_gemm import (
    LoraTerm,
    _experts_pow2,
    _index,
    _LoraOperands,
    _precision,
    _rows_per_expert,
    _tile_grid,
)

GEMM_MODES = ("auto", "fused", "dequantize")
_ENV = "MOEFUSE_4BIT_GEMM"
_forced: str | None = None
_DEQUANTIZE_BLOCK = 1024  # values per program of the dequantisation kernel


def set_gemm_mode(mode: str | None) -> None:
    """Force ``"fused"`` or ``"dequantize"`` (or ``"auto"``) for later calls; ``None`` goes back to the env var."""
    global _forced
    if mode is not None and mode not in GEMM_MODES:
        raise ValueError(f"unknown 4-bit GEMM mode {mode!r}: choose one of {', '.join(GEMM_MODES)}")
    _forced = mode


def gemm_mode() -> str:
    """``"fused"`` or ``"dequantize"``: how the next 4-bit grouped GEMM runs."""
    mode = _forced or os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in GEMM_MODES:
        raise ValueError(f"{_ENV}={mode!r} is not a 4-bit GEMM mode: choose one of {', '.join(GEMM_MODES)}")
    return "dequantize" if mode == "auto" else mode


def _fused() -> bool:
    return gemm_mode() == "fused"


def _quant_args(w: ExpertWeights4bit) -> tuple:
    """The 4-bit operands as the kernels take them (an absent nested statistic gets a never-read placeholder)."""
    nested = w.nested
    return (
        w.packed,
        w.absmax,
        w.nested_absmax if nested else w.absmax,
        w.offset if nested else w.absmax,
        w.code,
        w.nested_code if nested else w.code,
    )


def _quant_strides(w: ExpertWeights4bit) -> tuple[int, int, int]:
    return w.packed.stride(0), w.absmax.stride(0), w.nested_absmax.stride(0) if w.nested else 0


def dequantize(w: ExpertWeights4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense stack of ``w`` (its shape and orientation, ``dtype`` default its compute dtype), on the GPU."""
    experts, out_features, in_features = w.stored_shape
    n = out_features * in_features
    out = torch.empty(experts, out_features, in_features, device=w.device, dtype=dtype or w.dtype)
    if out.numel():
        kernels.dequantize_4bit_kernel[(experts, triton.cdiv(n, _DEQUANTIZE_BLOCK))](
            *_quant_args(w),
            out,
            n,
            *_quant_strides(w),
            out.stride(0),
            BLOCKSIZE=w.blocksize,
            NESTED=w.nested,
            BLOCK=_DEQUANTIZE_BLOCK,
        )
    return out.transpose(1, 2) if w.transposed else out


def grouped_gemm(
    a: torch.Tensor,
    b: ExpertWeights4bit,
    m_sizes: torch.Tensor,
    *,
    a_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    lora: LoraTerm | None = None,
) -> torch.Tensor:
    """:func:`moefuse.ops.triton_gemm.grouped_gemm` with the 4-bit weight ``b`` (logical ``[E, N, K]``)."""
    where = dict(a_index=a_index, out=out, out_index=out_index, row_scale=row_scale, lora=lora)
    if not _fused():
        return dense.grouped_gemm(a, dequantize(b), m_sizes, **where)
    num_experts, n, k = b.shape
    rows = a_index.numel() if a_index is not None else a.shape[0]
    if out is None:
        out = a.new_empty(rows, n, dtype=b.dtype)
    if rows == 0:
        return out
    lora_ops = _LoraOperands(lora, out)
    launch(
        kernels.grouped_gemm_4bit_kernel,
        _tile_grid(m_sizes, rows, n),
        a,
        *_quant_args(b),
        out,
        m_sizes,
        _index(a_index, m_sizes),
        _index(out_index, m_sizes),
        _index(row_scale, out),
        *lora_ops.pointers,
        n,
        k,
        b.stored_shape[2],
        num_experts,
        _rows_per_expert(rows, num_experts),
        lora_ops.rank,
        a.stride(0),
        a.stride(1),
        *_quant_strides(b),
        out.stride(0),
        out.stride(1),
        *lora_ops.strides,
        TRANSPOSED=b.transposed,
        BLOCKSIZE=b.blocksize,
        NESTED=b.nested,
        GATHER_A=a_index is not None,
        SCATTER_C=out_index is not None,
        SCALE_ROWS=row_scale is not None,
        **lora_ops.flags,
        PRECISION=_precision(b.dtype),
        E_POW2=_experts_pow2(num_experts),
    )
    return out


def gate_up_swiglu(
    x: torch.Tensor,
    gate_up_proj: ExpertWeights4bit,
    m_sizes: torch.Tensor,
    x_index: torch.Tensor,
    *,
    store_gate_up: bool,
    lora: LoraTerm | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`moefuse.ops.triton_gemm.gate_up_swiglu` with the 4-bit ``gate_up_proj [E, 2I, H]``."""
    if not _fused() or gate_up_proj.transposed:
        return dense.gate_up_swiglu(
            x,
            dequantize(gate_up_proj),
            m_sizes,
            x_index,
            store_gate_up=store_gate_up,
            lora=lora,
            row_scale=row_scale,
        )
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    rows = x_index.numel()
    h = x.new_empty(rows, inter, dtype=gate_up_proj.dtype)
    gate_up = x.new_empty(rows, two_i, dtype=gate_up_proj.dtype) if store_gate_up else None
    if rows == 0:
        return h, gate_up
    lora_ops = _LoraOperands(lora, h)
    launch(
        kernels.gate_up_swiglu_4bit_kernel,
        _tile_grid(m_sizes, rows, inter),
        x,
        *_quant_args(gate_up_proj),
        h if gate_up is None else gate_up,
        h,
        _index(row_scale, h),
        m_sizes,
        x_index,
        *lora_ops.pointers,
        inter,
        hidden,
        num_experts,
        _rows_per_expert(rows, num_experts),
        lora_ops.rank,
        x.stride(0),
        x.stride(1),
        *_quant_strides(gate_up_proj),
        0 if gate_up is None else gate_up.stride(0),
        0 if gate_up is None else gate_up.stride(1),
        h.stride(0),
        h.stride(1),
        *lora_ops.strides,
        BLOCKSIZE=gate_up_proj.blocksize,
        NESTED=gate_up_proj.nested,
        STORE_GATE_UP=store_gate_up,
        SCALE_H=row_scale is not None,
        **lora_ops.flags,
        PRECISION=_precision(gate_up_proj.dtype),
        E_POW2=_experts_pow2(num_experts),
    )
    return h, gate_up


def swiglu_backward(
    grad_out: torch.Tensor,
    down_proj: ExpertWeights4bit,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    m_sizes: torch.Tensor,
    grad_index: torch.Tensor,
    lora: LoraTerm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moefuse.ops.triton_gemm.swiglu_backward` with the 4-bit ``down_proj [E, H, I]``."""
    return dense.swiglu_backward(
        grad_out, down_proj, gate_up, row_scale, m_sizes, grad_index, lora, gemm=grouped_gemm
    )
