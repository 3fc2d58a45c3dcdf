"""Triton kernels of the experts' grouped GEMMs on 4-bit weights (bitsandbytes' NF4/FP4 blockwise format).

The twins of :mod:`moefuse.kernels.grouped_gemm`'s row kernels with the weight operand read from the 4-bit data
of :class:`moefuse.quant.ExpertWeights4bit`: each ``BLOCK_K x BLOCK_N`` weight tile is dequantised in registers
(4-bit code → code value × block absmax, the absmax itself from the nested statistics) right before its
``tl.dot``, so the weights cross memory at half a byte per value. The tile schedule, gather/scatter, epilogues
and autotune configs are those of the dense kernels. Weights are frozen here: there is no weight-gradient kernel.

Each expert's matrix ``W [out, in]`` is stored flat (``out * in`` values, row-major, two per byte, high nibble
first) in blocks of ``BLOCKSIZE`` values; a GEMM reads it either as ``B[n, k] = W[n, k]`` (forward, ``x·Wᵀ``)
or, ``TRANSPOSED``, as ``B[n, k] = W[k, n]`` (input gradient, ``dY·W``).

- :func:`grouped_gemm_4bit_kernel`: ``C[c_row(r)] (+)= scale[r] * A[a_row(r)] @ B[e]ᵀ``.
- :func:`gate_up_swiglu_4bit_kernel`: the gate/up projection with SwiGLU in its epilogue.
- :func:`swiglu_backward_4bit_kernel`: the down projection's input gradient with SwiGLU's backward.
- :func:`dequantize_4bit_kernel`: the dense stack, for the dequantise-then-GEMM path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_gemm import (
    TILE_CONFIGS,
    _configs,
    _expert_tile,
    _prune,
    _row_offsets,
    _rows_epilogue,
    _swiglu_backward_epilogue,
    _swiglu_epilogue,
)


@triton.jit
def _dequantize(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset,
    code_ptr,
    nested_code_ptr,
    flat,
    mask,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
):
    """fp32 values at the int64 flat indices ``flat`` of one expert's matrix (pointers already at that expert),
    zero outside ``mask``: ``code[nibble] * absmax[block]``, with ``absmax[b] = nested_code[q[b]] *
    nested_absmax[b // 256] + offset`` when ``NESTED``."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble)
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale += offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _expert_offset(offset_ptr, expert, NESTED: tl.constexpr):
    if NESTED:
        return tl.load(offset_ptr + expert)
    return 0.0


@triton.jit
def _matmul_tile_4bit(
    a_ptr,
    a_rows,
    row_mask,
    stride_am,
    stride_ak,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset,
    code_ptr,
    nested_code_ptr,
    in_features,
    offs_n,
    n_mask,
    K,
    TRANSPOSED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``sum_k A[a_rows, k] * B[offs_n, k]`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile, ``B`` this expert's 4-bit
    weight read forward (``W[n, k]``) or ``TRANSPOSED`` (``W[k, n]``)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        ks = k * BLOCK_K + offs_k
        k_mask = ks < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if TRANSPOSED:
            flat = ks.to(tl.int64)[:, None] * in_features + offs_n[None, :]
        else:
            flat = offs_n.to(tl.int64)[None, :] * in_features + ks[:, None]
        b = _dequantize(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            offset,
            code_ptr,
            nested_code_ptr,
            flat,
            k_mask[:, None] & n_mask[None, :],
            BLOCKSIZE,
            NESTED,
        )
        acc = tl.dot(a, b.to(a_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=[
        "N",
        "K",
        "ROWS_PER_EXPERT",
        "GATHER_A",
        "SCATTER_C",
        "ATOMIC_ADD",
        "HAS_ADD",
        "TRANSPOSED",
        "NESTED",
    ],
    prune_configs_by=_prune("N", "K", "a_ptr"),
    cache_results=True,
    restore_value=["c_ptr"],  # tuning runs must not leave their atomic adds in the output
)
@triton.jit
def grouped_gemm_4bit_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    c_ptr,
    m_sizes_ptr,
    a_index_ptr,
    c_index_ptr,
    scale_ptr,
    add_ptr,
    N,
    K,
    in_features,
    num_experts,
    ROWS_PER_EXPERT,
    stride_am,
    stride_ak,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_cm,
    stride_cn,
    stride_addm,
    stride_addn,
    TRANSPOSED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    ATOMIC_ADD: tl.constexpr,
    HAS_ADD: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C[c_row(r), n] (+)= scale[r] * (sum_k A[a_row(r), k] * B[e(r), n, k] + ADD[r, n])``, ``B`` 4-bit."""
    pid = tl.program_id(0)
    expert, row0, row_end, pid_n = _expert_tile(
        pid, m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = _row_offsets(a_index_ptr, rows, row_mask, GATHER_A)
    e = expert.to(tl.int64)
    acc = _matmul_tile_4bit(
        a_ptr,
        a_rows,
        row_mask,
        stride_am,
        stride_ak,
        packed_ptr + e * stride_pe,
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        _expert_offset(offset_ptr, e, NESTED),
        code_ptr,
        nested_code_ptr,
        in_features,
        offs_n,
        n_mask,
        K,
        TRANSPOSED,
        BLOCKSIZE,
        NESTED,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )

    _rows_epilogue(
        acc,
        c_ptr,
        c_index_ptr,
        scale_ptr,
        add_ptr,
        rows,
        offs_n,
        row_mask,
        n_mask,
        stride_cm,
        stride_cn,
        stride_addm,
        stride_addn,
        SCATTER_C,
        SCALE_ROWS,
        ATOMIC_ADD,
        HAS_ADD,
    )


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "STORE_GATE_UP", "HAS_ADD", "NESTED"],
    prune_configs_by=_prune("N", "K", "x_ptr", weight_tiles=2),
    cache_results=True,
)
@triton.jit
def gate_up_swiglu_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    gate_up_ptr,
    h_ptr,
    m_sizes_ptr,
    x_index_ptr,
    add_ptr,
    N,
    K,
    num_experts,
    ROWS_PER_EXPERT,
    stride_xm,
    stride_xk,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_gm,
    stride_gn,
    stride_hm,
    stride_hn,
    stride_addm,
    stride_addn,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    STORE_GATE_UP: tl.constexpr,
    HAS_ADD: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``h = silu(gate) * up`` for gathered rows ``X[x_row(r)]``, with the 4-bit ``W [E, 2N, K]`` (gate rows,
    then up rows): one program computes a column tile of both halves from the same loaded rows of ``X``.
    ``ADD [rows, 2N]`` joins the pre-activations; ``gate_up [rows, 2N]`` is written when ``STORE_GATE_UP``."""
    pid = tl.program_id(0)
    expert, row0, row_end, pid_n = _expert_tile(
        pid, m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = _row_offsets(x_index_ptr, rows, row_mask, True)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    e = expert.to(tl.int64)
    packed_ptr += e * stride_pe
    absmax_ptr += e * stride_ae
    nested_absmax_ptr += e * stride_ne
    offset = _expert_offset(offset_ptr, e, NESTED)

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        ks = k * BLOCK_K + offs_k
        k_mask = ks < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate_flat = offs_n.to(tl.int64)[None, :] * K + ks[:, None]
        w_gate = _dequantize(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            offset,
            code_ptr,
            nested_code_ptr,
            gate_flat,
            w_mask,
            BLOCKSIZE,
            NESTED,
        )
        w_up = _dequantize(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            offset,
            code_ptr,
            nested_code_ptr,
            gate_flat + N * K,  # the up rows follow the N gate rows
            w_mask,
            BLOCKSIZE,
            NESTED,
        )
        gate = tl.dot(x, w_gate.to(x_ptr.dtype.element_ty), gate, input_precision=PRECISION)
        up = tl.dot(x, w_up.to(x_ptr.dtype.element_ty), up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    _swiglu_epilogue(
        gate,
        up,
        gate_up_ptr,
        h_ptr,
        add_ptr,
        rows,
        offs_n,
        row_mask,
        n_mask,
        N,
        stride_gm,
        stride_gn,
        stride_hm,
        stride_hn,
        stride_addm,
        stride_addn,
        STORE_GATE_UP,
        HAS_ADD,
    )


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "HAS_ADD", "NESTED"],
    prune_configs_by=_prune("N", "K", "dy_ptr"),
    cache_results=True,
    reset_to_zero=["d_scale_ptr"],  # each tile size writes its own number of partial sums: none may linger
)
@triton.jit
def swiglu_backward_4bit_kernel(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    gate_up_ptr,
    scale_ptr,
    d_gate_up_ptr,
    d_scale_ptr,
    m_sizes_ptr,
    dy_index_ptr,
    add_ptr,
    N,
    K,
    num_experts,
    ROWS_PER_EXPERT,
    stride_dym,
    stride_dyk,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_gm,
    stride_gn,
    stride_dgm,
    stride_dgn,
    stride_dsm,
    stride_addm,
    stride_addn,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_ADD: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of ``y = scale * down(silu(gate) * up)`` through the 4-bit down projection ``W [E, K, N]``
    (``K`` = hidden, ``N`` = intermediate) and SwiGLU: ``g = dY[dy_row(r)] @ W[e]``, then as the dense kernel,
    ``d_scale[r, pid_n]`` (this column tile's share), ``d_gate_up [rows, 2N]``; ``ADD [rows, N]`` joins ``g``."""
    pid = tl.program_id(0)
    expert, row0, row_end, pid_n = _expert_tile(
        pid, m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    dy_rows = _row_offsets(dy_index_ptr, rows, row_mask, True)
    e = expert.to(tl.int64)
    g = _matmul_tile_4bit(
        dy_ptr,
        dy_rows,
        row_mask,
        stride_dym,
        stride_dyk,
        packed_ptr + e * stride_pe,
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        _expert_offset(offset_ptr, e, NESTED),
        code_ptr,
        nested_code_ptr,
        N,
        offs_n,
        n_mask,
        K,
        True,
        BLOCKSIZE,
        NESTED,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )

    _swiglu_backward_epilogue(
        g,
        gate_up_ptr,
        scale_ptr,
        d_gate_up_ptr,
        d_scale_ptr,
        add_ptr,
        rows,
        offs_n,
        row_mask,
        n_mask,
        pid_n,
        N,
        stride_gm,
        stride_gn,
        stride_dgm,
        stride_dgn,
        stride_dsm,
        stride_addm,
        stride_addn,
        HAS_ADD,
    )


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    out_ptr,
    n,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_oe,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[e, i] = W[e].flat[i]`` in the output's dtype; program ``(e, j)`` writes ``BLOCK`` values."""
    e = tl.program_id(0).to(tl.int64)
    flat = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    values = _dequantize(
        packed_ptr + e * stride_pe,
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        _expert_offset(offset_ptr, e, NESTED),
        code_ptr,
        nested_code_ptr,
        flat,
        mask,
        BLOCKSIZE,
        NESTED,
    )
    tl.store(out_ptr + e * stride_oe + flat, values.to(out_ptr.dtype.element_ty), mask=mask)
