"""Launchers of the Triton grouped-GEMM kernels: allocate outputs, pick strides and flags, size the grid.

Every launcher takes ``m_sizes [E]`` (rows per expert, on the device) and never reads it on the host: the
grid is an upper bound on the tiles, and the kernels find their own tile (see :mod:`moefuse.kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels import grouped_gemm as kernels
from .gating import SWIGLU, Gating, halves
from .launch import cdiv, launch, next_power_of_2, unit_columns


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless PyTorch's own matmuls allow TF32, as ``torch.mm`` would."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# The row-wise gated-activation backward's block: 8 rows x 256 columns per step. Fixed, not tuned: neighbouring sizes
# measured alike (docs/measurements.md).
_GLU_ROWS, _GLU_COLUMNS = 8, 256


def _experts_pow2(num_experts: int) -> int:
    return max(16, next_power_of_2(num_experts))


def _rows_per_expert(rows: int, num_experts: int) -> int:
    """Average rows per expert, rounded to a power of two: the tuning key that separates 4k- and 16k-token
    batches (whose best tiles differ) without re-tuning for every batch size."""
    return min(4096, next_power_of_2(max(1, rows // max(1, num_experts))))


def _tile_grid(m_sizes: torch.Tensor, rows: int, n: int):
    """The programs of a row-tiled kernel. On a GPU an upper bound (each expert adds at most one partial row
    tile; reading ``m_sizes`` would cost a host sync); in the CPU interpreter the exact count, which is free."""

    def grid(meta: dict) -> tuple[int]:
        block_m = meta["BLOCK_M"]
        if m_sizes.is_cpu:
            m_tiles = int(((m_sizes + block_m - 1) // block_m).sum())
        else:
            m_tiles = cdiv(rows, block_m) + min(m_sizes.numel(), rows)
        return (m_tiles * cdiv(n, meta["BLOCK_N"]),)

    return grid


def _index(index: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The kernels take a pointer for every optional operand; an absent one is never read (its flag is off)."""
    return like if index is None else index


class LoraTerm(NamedTuple):
    """A LoRA adapter's term joining a GEMM's result in the kernel's epilogue: ``t[r] @ b[e(r)]ᵀ`` for each grouped
    row ``r`` (times ``mask[r]``), never written out as ``[rows, N]``."""

    t: torch.Tensor  # [R, rank], grouped order
    b: torch.Tensor  # [E, N, rank], any strides (a transposed view of a factor reads the other orientation)
    mask: torch.Tensor | None = None  # [R, N]: a dropout mask on the term (backward of a dropped-out input)


# A launch's LoRA arguments without a LoRA term, besides its pointers.
_NO_LORA = dict(
    lora_rank=0,
    stride_ltm=0,
    stride_lbe=0,
    stride_lbn=0,
    stride_lbr=0,
    stride_lmm=0,
    HAS_LORA=False,
    LORA_MASK=False,
    LORA_R=16,
)


def _lora_arguments(lora: LoraTerm) -> dict[str, object]:
    """The row kernels' arguments for a LoRA term, by name: pointers, rank, strides and flags."""
    t, b, mask = lora
    t = unit_columns(t)
    mask = None if mask is None else unit_columns(mask)
    return dict(
        lora_t_ptr=t,
        lora_b_ptr=b,
        lora_mask_ptr=t if mask is None else mask,
        lora_rank=t.shape[1],
        stride_ltm=t.stride(0),
        stride_lbe=b.stride(0),
        stride_lbn=b.stride(1),
        stride_lbr=b.stride(2),
        stride_lmm=0 if mask is None else mask.stride(0),
        HAS_LORA=True,
        LORA_MASK=mask is not None,
        LORA_R=max(16, next_power_of_2(t.shape[1])),
    )


def _row_kernel_arguments(
    weight: torch.Tensor, m_sizes: torch.Tensor, rows: int, n: int, lora: LoraTerm | None, like: torch.Tensor
) -> dict[str, object]:
    """What the row-tiled kernels (the grouped GEMM, gate/up) take besides their operands, by name: the sizes of
    ``weight [E, *, K]`` over ``rows`` grouped rows by ``n`` columns, the tuning key, the precision and the
    LoRA term (``like``: the stand-in for its pointers when there is none, never read)."""
    num_experts, _, k = weight.shape
    arguments = {  # a literal: a dict() call with keywords costs more host time, and launchers run on every call
        "m_sizes_ptr": m_sizes,
        "N": n,
        "K": k,
        "num_experts": num_experts,
        "ROWS_PER_EXPERT": _rows_per_expert(rows, num_experts),
        "PRECISION": _precision(weight.dtype),
        "E_POW2": _experts_pow2(num_experts),
        "lora_t_ptr": like,
        "lora_b_ptr": like,
        "lora_mask_ptr": like,
        **_NO_LORA,
    }
    if lora is not None:
        arguments.update(_lora_arguments(lora))
    return arguments


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    a_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    lora: LoraTerm | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[out_row(r)] = row_scale[r] * (a[a_row(r)] @ b[e(r)]ᵀ + lora[r] + bias[e(r)])`` over the
    ``R = m_sizes.sum()`` grouped rows.

    Args:
        a: ``[R, K]`` in grouped order, or any ``[T, K]`` read through ``a_index [R]``.
        b: ``[E, N, K]`` (any strides: a transposed view reads the other orientation).
        m_sizes: ``[E]`` rows per expert.
        a_index: ``a``'s row for each grouped row (gather fused into the loads).
        out: where to write; ``[R, N]`` (new) unless given. With ``out_index``, row ``r`` goes to ``out[out_index[r]]``.
        row_scale: ``[R]`` per-row factor applied in the epilogue.
        lora: a LoRA term added in the epilogue, before the scale (:class:`LoraTerm`).
        bias: ``[E, N]`` each expert's bias, added in the epilogue before the scale.
    """
    n = b.shape[1]
    rows = a_index.numel() if a_index is not None else a.shape[0]
    if out is None:
        out = a.new_empty(rows, n, dtype=b.dtype)
    if rows == 0:
        return out
    launch(
        kernels.grouped_gemm_kernel,
        _tile_grid(m_sizes, rows, n),
        a_ptr=a,
        b_ptr=b,
        c_ptr=out,
        a_index_ptr=_index(a_index, m_sizes),
        c_index_ptr=_index(out_index, m_sizes),
        scale_ptr=_index(row_scale, out),
        bias_ptr=_index(bias, out),
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_be=b.stride(0),
        stride_bn=b.stride(1),
        stride_bk=b.stride(2),
        stride_cm=out.stride(0),
        stride_cn=out.stride(1),
        stride_bias_e=0 if bias is None else bias.stride(0),
        stride_bias_n=0 if bias is None else bias.stride(1),
        GATHER_A=a_index is not None,
        SCATTER_C=out_index is not None,
        SCALE_ROWS=row_scale is not None,
        HAS_BIAS=bias is not None,
        **_row_kernel_arguments(b, m_sizes, rows, n, lora, out),
    )
    return out


def gate_up_glu(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    m_sizes: torch.Tensor,
    x_index: torch.Tensor,
    *,
    store_gate_up: bool,
    gating: Gating = SWIGLU,
    lora: LoraTerm | None = None,
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = gating(gate_up)`` for the grouped rows ``x[x_index]``: ``(h [R, I], gate_up [R, 2I] or None)``, the
    stored pre-activations gate columns then up columns whatever ``gating.interleaved`` says of the weight's rows.
    ``lora`` (its ``b`` ``[E, 2I, rank]``) and ``bias [E, 2I]``, both laid out as ``gate_up_proj``'s rows, join the
    pre-activations; ``h`` is multiplied by ``row_scale [R]`` when given."""
    two_i = gate_up_proj.shape[1]
    inter = two_i // 2
    rows = x_index.numel()
    h = x.new_empty(rows, inter, dtype=gate_up_proj.dtype)
    gate_up = x.new_empty(rows, two_i, dtype=gate_up_proj.dtype) if store_gate_up else None
    if rows == 0:
        return h, gate_up
    w = halves(gate_up_proj, 1, gating.interleaved)  # [E, 2, I, H]
    bias_halves = None if bias is None else halves(bias, 1, gating.interleaved)  # [E, 2, I]
    arguments = _row_kernel_arguments(gate_up_proj, m_sizes, rows, inter, lora, h)
    stride_lbh = 0
    if lora is not None:
        b = halves(lora.b, 1, gating.interleaved)  # [E, 2, I, rank]
        stride_lbh, arguments["stride_lbn"] = b.stride(1), b.stride(2)
    launch(
        kernels.gate_up_glu_kernel,
        _tile_grid(m_sizes, rows, inter),
        x_ptr=x,
        w_ptr=gate_up_proj,
        bias_ptr=_index(bias, h),
        gate_up_ptr=h if gate_up is None else gate_up,
        h_ptr=h,
        scale_ptr=_index(row_scale, h),
        x_index_ptr=x_index,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_we=w.stride(0),
        stride_wh=w.stride(1),
        stride_wn=w.stride(2),
        stride_wk=w.stride(3),
        stride_bias_e=0 if bias_halves is None else bias_halves.stride(0),
        stride_bias_h=0 if bias_halves is None else bias_halves.stride(1),
        stride_bias_n=0 if bias_halves is None else bias_halves.stride(2),
        stride_gm=0 if gate_up is None else gate_up.stride(0),
        stride_gn=0 if gate_up is None else gate_up.stride(1),
        stride_hm=h.stride(0),
        stride_hn=h.stride(1),
        stride_lbh=stride_lbh,
        **_gating_arguments(gating),
        INTERLEAVED=gating.interleaved,
        STORE_GATE_UP=store_gate_up,
        SCALE_H=row_scale is not None,
        HAS_BIAS=bias is not None,
        **arguments,
    )
    return h, gate_up


def _gating_arguments(gating: Gating) -> dict[str, object]:
    """The gating's constants as the kernels take them."""
    return {
        "ACTIVATION": gating.activation,
        "ALPHA": gating.alpha,
        "CLAMP": gating.clamped,
        "LIMIT": gating.limit if gating.clamped else 0.0,
        "UP_SHIFT": gating.up_shift,
    }


def glu_backward(
    grad_out: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    m_sizes: torch.Tensor,
    grad_index: torch.Tensor,
    lora: LoraTerm | None = None,
    *,
    gating: Gating = SWIGLU,
    down_bias: torch.Tensor | None = None,
    d_scale_out: torch.Tensor | None = None,
    d_scale_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through ``scale * (down(gating(gate_up)) + down_bias)`` for the grouped rows:
    ``(d_gate_up [R, 2I], d_scale)``; ``down_bias [E, H]`` adds its share ``dY·bias`` to ``d_scale``.

    ``grad_out [T, H]`` is read through ``grad_index`` (each grouped row's token); ``down_proj [E, H, I]``;
    ``lora`` (its ``b`` ``[E, I, rank]``) joins the gradient reaching the gated activation (from a LoRA on the
    down projection).
    ``d_scale`` is ``[R]`` fp32 in grouped order, or ``d_scale_out`` with row ``r``'s at ``d_scale_index[r]``
    (see :func:`glu_backward_rows`).

    Two kernels: the grouped GEMM ``g = dY·W`` (stored in the weights' dtype), then :func:`glu_backward_rows`.
    Not one kernel with the activation's backward in the GEMM's epilogue: there the loads and stores of ``gate_up`` /
    ``d_gate_up`` sit idle beside the mainloop (one program per SM), while the row-wise pass streams them at
    memory speed (the comparison: docs/measurements.md).
    """
    g = grouped_gemm(grad_out, down_proj.transpose(1, 2), m_sizes, a_index=grad_index, lora=lora)
    d_scale_plus = None
    if down_bias is not None:  # dY·bias per row: the bias as a one-row weight [E, 1, H]
        d_scale_plus = grouped_gemm(
            grad_out,
            down_bias.to(grad_out.dtype).unsqueeze(1),
            m_sizes,
            a_index=grad_index,
            out=g.new_empty(g.shape[0], 1, dtype=torch.float32),
        ).squeeze(1)
    return glu_backward_rows(
        g,
        gate_up,
        row_scale,
        gating=gating,
        d_scale_plus=d_scale_plus,
        d_scale_out=d_scale_out,
        d_scale_index=d_scale_index,
    )


def glu_backward_rows(
    g: torch.Tensor,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    gating: Gating = SWIGLU,
    d_scale_plus: torch.Tensor | None = None,
    d_scale_out: torch.Tensor | None = None,
    d_scale_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated activation's backward row by row from ``g [R, I]``, the gradient reaching ``gating(gate_up)``
    (before the row scale), ``gate_up [R, 2I]`` gate columns then up columns as :func:`gate_up_glu` stores them:
    ``(d_gate_up [R, 2I], d_scale)``, ``d_gate_up``'s columns laid out as the weight's rows (interleaved with
    ``gating.interleaved``), so the GEMMs after it read it as they read the weight. Deterministic (each row summed
    in fp32 in one program).

    ``d_scale`` is ``[R]`` fp32 in grouped order, plus ``d_scale_plus [R]`` (fp32) when given; or, given ``d_scale_out`` (1-D, contiguous, any float dtype) and
    ``d_scale_index [R]``, row ``r``'s value rounded once into ``d_scale_out[d_scale_index[r]]``: the routing
    weights' gradient in their ``(token, k)`` order and dtype, with no copy after the kernel."""
    rows, inter = g.shape
    d_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
    scatter = d_scale_out is not None
    if (d_scale_index is not None) != scatter or (
        scatter and (d_scale_out.dim() != 1 or d_scale_out.stride(0) != 1)
    ):
        raise ValueError(
            "glu_backward_rows: d_scale_out must be 1-D and contiguous, with d_scale_index (both or neither)"
        )
    d_scale = d_scale_out if scatter else torch.empty(rows, device=g.device, dtype=torch.float32)
    if rows == 0:
        return d_gate_up, d_scale
    g, gate_up = unit_columns(g), unit_columns(gate_up)
    launch(
        kernels.glu_backward_rows_kernel,
        lambda meta: (cdiv(rows, meta["BLOCK_R"]),),
        g_ptr=g,
        gate_up_ptr=gate_up,
        scale_ptr=row_scale,
        d_gate_up_ptr=d_gate_up,
        d_scale_ptr=d_scale,
        d_scale_index_ptr=_index(d_scale_index, d_scale),
        d_scale_plus_ptr=_index(d_scale_plus, d_scale),
        rows=rows,
        N=inter,
        stride_gm=g.stride(0),
        stride_gum=gate_up.stride(0),
        stride_dgm=d_gate_up.stride(0),
        **_gating_arguments(gating),
        INTERLEAVED=gating.interleaved,
        SCATTER_D_SCALE=scatter,
        D_SCALE_PLUS=d_scale_plus is not None,
        BLOCK_R=_GLU_ROWS,
        BLOCK_C=_GLU_COLUMNS,
        num_warps=4,
    )
    return d_gate_up, d_scale


def grouped_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    a_index: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW[e] = (row_scale * a[a_row(rows of e)])ᵀ @ b[b_row(rows of e)]`` → ``[E, N, K]`` (zeros for idle experts).

    ``a`` has ``N`` columns and ``b`` ``K``; each is in grouped order or read through its index. ``out`` may be
    a strided view (e.g. a transposed ``[E, K, N]`` buffer) to write the other orientation.
    """
    num_experts = m_sizes.numel()
    n, k = a.shape[1], b.shape[1]
    if out is None:
        out = a.new_empty(num_experts, n, k)
    if num_experts == 0:
        return out
    tiles = lambda meta: (  # noqa: E731
        num_experts * cdiv(n, meta["BLOCK_N"]) * cdiv(k, meta["BLOCK_K"]),
    )
    launch(
        kernels.grouped_weight_grad_kernel,
        tiles,
        a_ptr=a,
        b_ptr=b,
        dw_ptr=out,
        m_sizes_ptr=m_sizes,
        a_index_ptr=_index(a_index, m_sizes),
        b_index_ptr=_index(b_index, m_sizes),
        scale_ptr=_index(row_scale, a),
        N=n,
        K=k,
        num_experts=num_experts,
        ROWS_PER_EXPERT=_rows_per_expert(a_index.numel() if a_index is not None else a.shape[0], num_experts),
        stride_am=a.stride(0),
        stride_an=a.stride(1),
        stride_bm=b.stride(0),
        stride_bk=b.stride(1),
        stride_we=out.stride(0),
        stride_wn=out.stride(1),
        stride_wk=out.stride(2),
        GATHER_A=a_index is not None,
        GATHER_B=b_index is not None,
        SCALE_ROWS=row_scale is not None,
        PRECISION=_precision(a.dtype),
        E_POW2=_experts_pow2(num_experts),
    )
    return out
