"""Launchers of the grouped GEMMs on 4-bit expert weights, with the signatures of :mod:`moefuse.ops.triton_gemm`'s.

Each takes an :class:`~moefuse.quant.ExpertWeights4bit` where the dense launcher takes a weight tensor (a
``transpose(1, 2)`` view reads the input-gradient orientation), so the experts' autograd runs on either. Two ways
to run them, chosen by :func:`gemm_mode` (``MOEFUSE_4BIT_GEMM=fused|dequantize|auto``, or :func:`set_gemm_mode`):

- ``fused``: the 4-bit kernels of :mod:`moefuse.kernels.grouped_gemm_4bit`, which dequantise each weight tile in
  registers (weights read at half a byte per value);
- ``dequantize``: the stack is dequantised into a temporary dense copy (one Triton kernel), the dense kernel runs
  on it and the copy is freed (one projection's stack at a time, never kept for backward).

``auto`` takes ``dequantize``, which measured ahead of ``fused`` at every batch size tried
(``benchmarks/quant_gemm.py``; figures in docs/measurements.md): in the fused kernels each row tile dequantises its
weight tiles again (about ten instructions per value against the dot's share), so the cost grows with the tokens
while the dequantise pass is paid once per stack.
"""

from __future__ import annotations

import os

import torch
import triton

from ..kernels import grouped_gemm_4bit as kernels
from ..quant.tensor import ExpertWeights4bit
from . import triton_gemm as dense
from .triton_gemm import LoraTerm, WeightOperands

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


def _weight(w: ExpertWeights4bit, layouts: bool) -> WeightOperands:
    """``w`` as the 4-bit kernels take it; ``layouts``: the kernel reads either orientation (it takes the stored
    ``K`` and ``TRANSPOSED``), as the grouped GEMM does and the gate/up kernel does not."""
    flags = dict(BLOCKSIZE=w.blocksize, NESTED=w.nested)
    if layouts:
        flags["TRANSPOSED"] = w.transposed
    return WeightOperands(_quant_args(w), (w.stored_shape[2],) if layouts else (), _quant_strides(w), flags)


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
    if not _fused():
        where = dict(a_index=a_index, out=out, out_index=out_index, row_scale=row_scale, lora=lora)
        return dense.grouped_gemm(a, dequantize(b), m_sizes, **where)
    return dense.launch_grouped_gemm(
        kernels.grouped_gemm_4bit_kernel,
        b,
        _weight(b, True),
        a,
        m_sizes,
        a_index,
        out,
        out_index,
        row_scale,
        lora,
    )


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
        weight = dequantize(gate_up_proj)
        return dense.gate_up_swiglu(
            x, weight, m_sizes, x_index, store_gate_up=store_gate_up, lora=lora, row_scale=row_scale
        )
    return dense.launch_gate_up_swiglu(
        kernels.gate_up_swiglu_4bit_kernel,
        gate_up_proj,
        _weight(gate_up_proj, False),
        x,
        m_sizes,
        x_index,
        store_gate_up,
        lora,
        row_scale,
    )


def swiglu_backward(
    grad_out: torch.Tensor,
    down_proj: ExpertWeights4bit,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    m_sizes: torch.Tensor,
    grad_index: torch.Tensor,
    lora: LoraTerm | None = None,
    *,
    d_scale_out: torch.Tensor | None = None,
    d_scale_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moefuse.ops.triton_gemm.swiglu_backward` with the 4-bit ``down_proj [E, H, I]``."""
    return dense.swiglu_backward(
        grad_out,
        down_proj,
        gate_up,
        row_scale,
        m_sizes,
        grad_index,
        lora,
        gemm=grouped_gemm,
        d_scale_out=d_scale_out,
        d_scale_index=d_scale_index,
    )
