"""Triton kernels of the grouped GEMMs behind the experts, and their autotune configs.

Rows are grouped by expert: expert ``e`` owns rows ``[offset[e], offset[e] + m_sizes[e])`` of the grouped
order, where ``offset`` is the exclusive cumulative sum of ``m_sizes``. Kernels read ``m_sizes`` on the device
and find their tile from it (:func:`_expert_tile`), so a launch needs no host sync: the grid is an upper bound
and programs past the last tile return at once.

The activations need not be in grouped order: a kernel can gather its input rows through an index
(``token_index[r]``: the token of grouped row ``r``) and scatter its output rows through another, so the
permuted copy of the hidden states is never materialised.

Shapes in the kernels' parameter lists: ``E`` experts, ``R`` grouped rows (``m_sizes``' sum), ``T`` rows of an
operand read or written through an index (tokens), ``N`` and ``K`` a weight's output and input sizes.

- :func:`grouped_gemm_kernel`: ``C[c_row(r)] = scale[r] * (A[a_row(r)] @ B[e]ᵀ + bias[e])``.
- :func:`gate_up_glu_kernel`: the gate/up projection with the gated activation in its epilogue: ``act(gate) * up``
  (SwiGLU, or GeGLU with GELU's tanh form), clamped as GPT-OSS's where asked, with biases, gate and up rows
  stacked or interleaved (:class:`moefuse.ops.gating.Gating`).
- :func:`glu_backward_rows_kernel`: the gated activation's backward and the routing weights' gradient, row by row,
  from the down projection's input gradient (a plain grouped GEMM).
- :func:`grouped_weight_grad_kernel`: ``dW[e] = (scale * A[a_row(rows of e)])ᵀ @ B[b_row(rows of e)]``.

The launchers and the autograd live in :mod:`moefuse.ops.triton_gemm`. They launch by keyword
(:func:`moefuse.ops.launch.launch`): parameters may move, as long as the constexprs stay last.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import triton
import triton.language as tl

from ..settings import settings

# Triton chooses interpreter or compiler when a kernel is defined, from this variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


# Thick tiles for the experts' projections (Qwen3-30B-A3B: N, K in {768, 1536, 2048}) and thin ones for LoRA
# factors (N or K = rank, 8-64). Configs wider than the problem are pruned before tuning. The thick ones are
# the winners of a wider sweep at 4k and 16k tokens on Hopper (docs/measurements.md).
TILE_CONFIGS = [
    _config(128, 128, 64, 8, 3),  # first: fits every kernel, so it is the one taken without tuning
    # Too much shared memory for gate/up's two weight tiles: tuning skips it there.
    _config(128, 256, 64, 8, 4),
    _config(128, 128, 64, 8, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 32, 64, 4, 4),
    _config(64, 16, 128, 4, 4),
]
# dW tiles: BLOCK_M is the chunk of rows reduced per step, BLOCK_N x BLOCK_K the tile of dW[e].
WEIGHT_GRAD_CONFIGS = [
    _config(64, 128, 128, 8, 3),
    _config(32, 128, 128, 4, 4),
    _config(64, 128, 128, 4, 3),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 16, 128, 4, 4),
    _config(64, 128, 16, 4, 4),
]
# Under TRITON_INTERPRET=1 (CPU tests) one small config: nothing to tune, and blocks smaller than the test shapes.
INTERPRET_CONFIGS = [_config(32, 64, 32, 1, 1)]


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use on this GPU (what Triton checks configs against)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def shared_memory(config: triton.Config, element_size: int, weight_tiles: int, weight_grad: bool) -> int:
    """Shared memory a config's software pipeline holds: ``num_stages`` copies of the tiles loaded per step.

    Row kernels load ``BLOCK_M x BLOCK_K`` of the activations and ``weight_tiles`` ``BLOCK_K x BLOCK_N`` weight
    tiles (gate/up loads two); the weight-gradient kernel loads ``BLOCK_M x BLOCK_N`` and ``BLOCK_M x BLOCK_K``.
    (Checked against Triton's own count for a config it refused: docs/measurements.md.)
    """
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    per_step = m * n + m * k if weight_grad else m * k + weight_tiles * k * n
    return config.num_stages * per_step * element_size


def _fit(config: triton.Config, n_cap: int, k_cap: int) -> triton.Config:
    """``config`` with ``BLOCK_N`` / ``BLOCK_K`` no wider than the problem's (power-of-two) width."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if n <= n_cap and k <= k_cap:
        return config
    return _config(m, min(n, n_cap), min(k, k_cap), config.num_warps, config.num_stages)


def _prune(
    n_name: str,
    k_name: str,
    operand: str,
    weight_tiles: int = 1,
    weight_grad: bool = False,
):
    """Keep the configs that suit the problem and the GPU.

    - Tiles wider than the problem shrink to it (a rank-16 LoRA factor gets 16-wide tiles, not 128: a
      ``[rows, 16] @ [16, N]`` expand keeps its 128-row, 128-column tiles with ``BLOCK_K = 16``).
    - Configs needing more shared memory than this GPU has go (an sm89 card has 99 KiB, an sm90 card 227 KiB), so
      the first config left, the one taken without tuning, always runs.
    - Small problems (under 64 rows per expert, e.g. short batches) take the first config with a short row
      block instead of being tuned: tuning each new small shape would cost more than it could win.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        n_cap = max(16, triton.next_power_of_2(named_args[n_name]))
        k_cap = max(16, triton.next_power_of_2(named_args[k_name]))
        kept = list({_fit(c, n_cap, k_cap): None for c in configs})  # in order, without the duplicates
        tensor = named_args[operand]
        if not INTERPRET and tensor.is_cuda:

            def needs(c: triton.Config) -> int:
                return shared_memory(c, tensor.element_size(), weight_tiles, weight_grad)

            limit = shared_memory_limit(tensor.device.index)
            kept = [c for c in kept if needs(c) <= limit] or [min(kept, key=needs)]
        if named_args["ROWS_PER_EXPERT"] < 64:
            return [next((c for c in kept if c.kwargs["BLOCK_M"] <= 64), kept[0])]
        # autotune off (MOEFUSE_AUTOTUNE=0) takes the first config that fits instead of timing them all: for tests
        # over many shapes, where compiling every config of every shape would cost more than the tests.
        return kept if settings().autotune else kept[:1]

    return {"early_config_prune": prune}


def _configs(configs: list[triton.Config]) -> list[triton.Config]:
    return INTERPRET_CONFIGS if INTERPRET else configs


def _time_config(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The autotuner's timing of one config, in short windows: a key first met mid-training (a new rows-per-expert
    bucket, such as an epoch's short last batch) is tuned inside that step, which waits for every config's
    timing. Triton's default windows make that step many times longer than the others."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _expert_tile(pid, m_sizes_ptr, num_experts, num_n_tiles, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """The tile of program ``pid``: (expert, first row, end of the expert's rows, column tile).

    Programs are numbered expert by expert; inside an expert the row tiles run fastest, so the programs that
    read one column tile of the expert's weight run side by side and share it through L2. ``expert`` comes
    back as ``num_experts`` for programs past the last tile.
    """
    experts = tl.arange(0, E_POW2)
    m = tl.load(m_sizes_ptr + experts, mask=experts < num_experts, other=0).to(tl.int32)
    programs_end = tl.cumsum((m + BLOCK_M - 1) // BLOCK_M * num_n_tiles, 0)
    done = programs_end <= pid  # experts whose programs all come before this one
    expert = tl.sum(done.to(tl.int32), 0)
    program_start = tl.max(tl.where(done, programs_end, 0), 0)
    row_start = tl.sum(tl.where(experts < expert, m, 0), 0)
    rows = tl.load(m_sizes_ptr + expert, mask=expert < num_experts, other=0).to(tl.int32)
    m_tiles = tl.maximum((rows + BLOCK_M - 1) // BLOCK_M, 1)
    local = pid - program_start
    return expert, row_start + (local % m_tiles) * BLOCK_M, row_start + rows, local // m_tiles


@triton.jit
def _row_tile(
    m_sizes_ptr, num_experts, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr
):
    """This program's tile of a row-tiled kernel (:func:`_expert_tile`): ``(expert, rows, row_mask, cols,
    col_mask)``, ``BLOCK_M`` grouped rows by ``BLOCK_N`` of ``N`` columns."""
    expert, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, rows < row_end, cols, cols < N


@triton.jit
def _row_offsets(index_ptr, rows, row_mask, GATHER: tl.constexpr):
    """int64 offsets of the rows a tile reads: ``index[rows]`` when gathering, else the grouped rows."""
    if GATHER:
        return tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _row_products(
    a_ptr,
    a_rows,
    row_mask,
    stride_am,
    stride_ak,
    b_ptr,
    offs_n,
    n_mask,
    stride_bn,
    stride_bk,
    second_offset,
    K,
    PAIR: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``(A[a_rows] @ B[offs_n]ᵀ, A[a_rows] @ B'[offs_n]ᵀ)`` as fp32 ``[BLOCK_M, BLOCK_N]`` tiles (``b_ptr``: this
    expert's ``B``; ``B'`` the same rows ``second_offset`` elements further on). The second product only with
    ``PAIR`` (else zeros), from the same loads of ``A``: gate/up's two halves."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    b2_ptrs = b_ptrs + second_offset
    first = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    second = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            a_mask = row_mask[:, None]
            b_mask = n_mask[None, :]
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a_mask = row_mask[:, None] & k_mask[None, :]
            b_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if PAIR:
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
        first = tl.dot(a, b, first, input_precision=PRECISION)
        if PAIR:
            second = tl.dot(a, b2, second, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk
    return first, second


@triton.jit
def _load_tile(ptr, rows, cols, row_mask, col_mask, stride_m, stride_n):
    """A ``[rows, cols]`` tile of a row-major operand in grouped order, as fp32 (zeros outside the masks)."""
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :] * stride_n
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _bias_row(ptr, cols, col_mask, stride_n):
    """One expert's bias over a tile's columns, as a fp32 ``[1, cols]`` row to add to the tile."""
    return tl.load(ptr + cols * stride_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _lora_term(
    acc,
    lora,
    lora_strides,
    expert,
    rows,
    cols,
    row_mask,
    col_mask,
    LORA_MASK: tl.constexpr,
    LORA_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc + T[rows] @ B[expert, cols]ᵀ`` (times ``MASK[rows, cols]`` when ``LORA_MASK``): a LoRA adapter's term,
    ``T [rows, rank]`` (grouped order) by ``B [E, N, rank]``, added in the epilogue so the ``[rows, N]`` term is
    never written to memory. ``lora`` is ``(T, B, MASK, rank)``, ``lora_strides`` ``(T's row, B's expert, row and
    rank, MASK's row)``; ``T`` and ``MASK`` have unit column stride."""
    t_ptr, b_ptr, mask_ptr, rank = lora
    stride_tm, stride_be, stride_bn, stride_br, stride_maskm = lora_strides
    offs_r = tl.arange(0, LORA_R)
    r_mask = offs_r < rank
    t_ptrs = t_ptr + rows.to(tl.int64)[:, None] * stride_tm + offs_r[None, :]
    t = tl.load(t_ptrs, mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn + offs_r[:, None] * stride_br
    b = tl.load(b_ptrs, mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    if LORA_MASK:
        mask = _load_tile(mask_ptr, rows, cols, row_mask, col_mask, stride_maskm, 1)
        return acc + tl.dot(t, b, input_precision=PRECISION) * mask
    return tl.dot(t, b, acc, input_precision=PRECISION)


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "GATHER_A", "SCATTER_C", "HAS_LORA"],
    prune_configs_by=_prune("N", "K", "b_ptr"),
    cache_results=True,  # tuned configs persist in Triton's cache: a second run does not tune again
    do_bench=_time_config,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def grouped_gemm_kernel(
    # Pointers
    a_ptr,  # [R, K] in grouped order, or [T, K] read through a_index
    b_ptr,  # [E, N, K], any strides
    c_ptr,  # [R, N] in grouped order, or [T, N] written through c_index
    m_sizes_ptr,  # [E] rows per expert; R = their sum
    a_index_ptr,  # [R] a's row of each grouped row (GATHER_A; else never read)
    c_index_ptr,  # [R] c's row of each grouped row (SCATTER_C; else never read)
    scale_ptr,  # [R] each grouped row's factor (SCALE_ROWS; else never read)
    bias_ptr,  # [E, N] each expert's bias (HAS_BIAS; else never read)
    lora_t_ptr,  # [R, lora_rank] (HAS_LORA; else never read)
    lora_b_ptr,  # [E, N, lora_rank], any strides (HAS_LORA; else never read)
    lora_mask_ptr,  # [R, N] (LORA_MASK; else never read)
    # Dimensions
    N,
    K,
    num_experts,  # E
    ROWS_PER_EXPERT,  # R / E as a power of two: a tuning key, not read by the kernel
    lora_rank,
    # Strides
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_bias_e,
    stride_bias_n,
    stride_ltm,  # lora_t's rows (its columns: unit stride)
    stride_lbe,
    stride_lbn,
    stride_lbr,
    stride_lmm,  # lora_mask's rows (its columns: unit stride)
    # Metadata
    GATHER_A: tl.constexpr,  # a's rows through a_index
    SCATTER_C: tl.constexpr,  # c's rows through c_index
    SCALE_ROWS: tl.constexpr,  # each row times scale
    HAS_BIAS: tl.constexpr,  # each row plus its expert's bias (before the scale)
    HAS_LORA: tl.constexpr,  # the LoRA term joins the product
    LORA_MASK: tl.constexpr,  # the LoRA term times lora_mask
    LORA_R: tl.constexpr,  # lora_rank's block: a power of two, at least 16
    PRECISION: tl.constexpr,  # tl.dot's input precision ("ieee" or "tf32")
    E_POW2: tl.constexpr,  # num_experts' block: a power of two, at least 16
    BLOCK_M: tl.constexpr,  # tile (autotuned)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask (heuristic)
):
    """``C[c_row(r)] = scale[r] * (A[a_row(r)] @ B[e(r)]ᵀ + T[r] @ LB[e(r)]ᵀ + bias[e(r)])`` over grouped rows ``r``.

    ``e(r)`` is the expert owning row ``r``; the LoRA term ``T @ LBᵀ`` (``HAS_LORA``, times a mask with
    ``LORA_MASK``; :func:`_lora_term`), the bias and the scale are optional.
    """
    expert, rows, row_mask, offs_n, n_mask = _row_tile(m_sizes_ptr, num_experts, N, BLOCK_M, BLOCK_N, E_POW2)
    if expert >= num_experts:
        return
    a_rows = _row_offsets(a_index_ptr, rows, row_mask, GATHER_A)
    acc, _ = _row_products(
        a_ptr,
        a_rows,
        row_mask,
        stride_am,
        stride_ak,
        b_ptr + expert.to(tl.int64) * stride_be,
        offs_n,
        n_mask,
        stride_bn,
        stride_bk,
        0,
        K,
        False,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
    )
    if HAS_LORA:
        lora = (lora_t_ptr, lora_b_ptr, lora_mask_ptr, lora_rank)
        lora_strides = (stride_ltm, stride_lbe, stride_lbn, stride_lbr, stride_lmm)
        acc = _lora_term(
            acc, lora, lora_strides, expert, rows, offs_n, row_mask, n_mask, LORA_MASK, LORA_R, PRECISION
        )
    if HAS_BIAS:
        acc += _bias_row(bias_ptr + expert.to(tl.int64) * stride_bias_e, offs_n, n_mask, stride_bias_n)
    if SCALE_ROWS:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c_rows = _row_offsets(c_index_ptr, rows, row_mask, SCATTER_C)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """``(act(x), act'(x))`` in fp32. Both activations are ``x * sigmoid(z)``: ``z = ALPHA x`` for SiLU (its plain
    form at ``ALPHA = 1``); for GELU's tanh form ``0.5 x (1 + tanh(u))``, ``u = sqrt(2 / pi) * (x + 0.044715 x^3)``,
    ``z = 2u``, as ``0.5 (1 + tanh(u)) = sigmoid(2u)``."""
    if ACTIVATION == "silu":
        sig = tl.sigmoid(ALPHA * x)
        d_act = sig * (1.0 + ALPHA * x * (1.0 - sig))
    else:
        tl.static_assert(ACTIVATION == "gelu_tanh")
        sig = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2 / pi) = 1.5957...
        dz = 1.5957691216057308 * (1.0 + 0.134145 * x * x)  # 3 * 0.044715 = 0.134145
        d_act = sig + x * sig * (1.0 - sig) * dz
    return x * sig, d_act


@triton.jit
def _gated(
    gate,
    up,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    CLAMP: tl.constexpr,
    LIMIT: tl.constexpr,
    UP_SHIFT: tl.constexpr,
):
    """``(h, dh/dgate, dh/dup)`` in fp32, ``h = act(min(gate, LIMIT)) * (clamp(up, -LIMIT, LIMIT) + UP_SHIFT)``
    (the clamps only with ``CLAMP``; :class:`moefuse.ops.gating.Gating`). A caller that drops the derivatives leaves
    them to dead-code elimination. A clamped value passes no gradient, as ``torch.clamp``'s (bounds included)."""
    if CLAMP:
        gate_inside = gate <= LIMIT
        up_inside = (up >= -LIMIT) & (up <= LIMIT)
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
    act, d_act = _activation(gate, ACTIVATION, ALPHA)
    up = up + UP_SHIFT
    d_gate = up * d_act
    d_up = act
    if CLAMP:
        d_gate = tl.where(gate_inside, d_gate, 0.0)
        d_up = tl.where(up_inside, d_up, 0.0)
    return act * up, d_gate, d_up


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "STORE_GATE_UP", "HAS_LORA", "ACTIVATION"],
    prune_configs_by=_prune("N", "K", "w_ptr", weight_tiles=2),
    cache_results=True,  # tuned configs persist in Triton's cache: a second run does not tune again
    do_bench=_time_config,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def gate_up_glu_kernel(
    # Pointers
    x_ptr,  # [T, K] read through x_index
    w_ptr,  # [E, 2N, K]: gate and up rows (stacked or interleaved: stride_wh); any strides
    bias_ptr,  # [E, 2N] each expert's bias, laid out as w's rows (HAS_BIAS; else never read)
    gate_up_ptr,  # [R, 2N] pre-activations, gate then up, for backward (STORE_GATE_UP; else never written)
    h_ptr,  # [R, N] the gated activation
    scale_ptr,  # [R] each grouped row's factor on h (SCALE_H; else never read)
    m_sizes_ptr,  # [E] rows per expert; R = their sum
    x_index_ptr,  # [R] x's row (token) of each grouped row
    lora_t_ptr,  # [R, lora_rank] (HAS_LORA; else never read)
    lora_b_ptr,  # [E, 2N, lora_rank], laid out as w's rows, any strides (HAS_LORA; else never read)
    lora_mask_ptr,  # [R, 2N] (LORA_MASK; else never read)
    # Dimensions
    N,  # the intermediate size: half of w's rows
    K,  # the hidden size
    num_experts,  # E
    ROWS_PER_EXPERT,  # R / E as a power of two: a tuning key, not read by the kernel
    lora_rank,
    # Strides (each *h: from a gate row or column to its up partner)
    stride_xm,
    stride_xk,
    stride_we,
    stride_wh,
    stride_wn,
    stride_wk,
    stride_bias_e,
    stride_bias_h,
    stride_bias_n,
    stride_gm,  # gate_up's
    stride_gn,
    stride_hm,
    stride_hn,
    stride_ltm,  # lora_t's rows (its columns: unit stride)
    stride_lbe,
    stride_lbh,
    stride_lbn,
    stride_lbr,
    stride_lmm,  # lora_mask's rows (its columns: unit stride, gate then up)
    # Metadata
    ACTIVATION: tl.constexpr,  # act: "silu" or "gelu_tanh" (GELU's tanh form); the gating's constants follow
    ALPHA: tl.constexpr,  # SiLU's slope: x * sigmoid(ALPHA * x)
    CLAMP: tl.constexpr,  # clamp gate (above) and up (both sides) at LIMIT
    LIMIT: tl.constexpr,
    UP_SHIFT: tl.constexpr,  # added to the clamped up
    INTERLEAVED: tl.constexpr,  # w's gate and up rows alternate (stride_wn = 2 * stride_wh)
    STORE_GATE_UP: tl.constexpr,  # write gate_up
    SCALE_H: tl.constexpr,  # h's rows times scale
    HAS_BIAS: tl.constexpr,  # the bias joins the pre-activations
    HAS_LORA: tl.constexpr,  # the LoRA term joins the pre-activations
    LORA_MASK: tl.constexpr,  # the LoRA term times lora_mask
    LORA_R: tl.constexpr,  # lora_rank's block: a power of two, at least 16
    PRECISION: tl.constexpr,  # tl.dot's input precision ("ieee" or "tf32")
    E_POW2: tl.constexpr,  # num_experts' block: a power of two, at least 16
    BLOCK_M: tl.constexpr,  # tile (autotuned)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask (heuristic)
):
    """``h[r] = scale[r] * gated(gate, up)`` with ``[gate, up] = X[x_row(r)] @ W[e(r)]ᵀ + T[r] @ LB[e(r)]ᵀ + bias[e(r)]``.

    One program computes a column tile of both halves from the same loaded rows of ``X``. The LoRA term
    (``HAS_LORA``) and the bias (``HAS_BIAS``) join the pre-activations, which are written to ``gate_up`` (gate
    columns, then up columns, whatever w's layout) with ``STORE_GATE_UP``. ``gated``: :func:`_gated`.
    """
    expert, rows, row_mask, offs_n, n_mask = _row_tile(m_sizes_ptr, num_experts, N, BLOCK_M, BLOCK_N, E_POW2)
    if expert >= num_experts:
        return
    x_rows = _row_offsets(x_index_ptr, rows, row_mask, True)
    if INTERLEAVED:
        # BLOCK_N gate/up pairs are 2 * BLOCK_N adjacent rows (stride_wn = 2 * stride_wh): one tile, loaded whole,
        # LoRA term and bias added, then split into gate and up. Its rows are an aligned range (a multiple of
        # 2 * BLOCK_N plus arange), which the compiler can prove contiguous and load in vectors; rows woven from the
        # two halves' offsets it cannot, and loads them an element at a time.
        pair_rows = (tl.max(offs_n, 0) // BLOCK_N) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        pair_mask = pair_rows < 2 * N
        acc, _ = _row_products(
            x_ptr,
            x_rows,
            row_mask,
            stride_xm,
            stride_xk,
            w_ptr + expert.to(tl.int64) * stride_we,
            pair_rows * stride_wh,
            pair_mask,
            1,  # the row offsets above are in elements
            stride_wk,
            0,
            K,
            False,
            PRECISION,
            BLOCK_M,
            2 * BLOCK_N,
            BLOCK_K,
            EVEN_K,
        )
        if HAS_LORA:
            acc = _lora_term(
                acc,
                (lora_t_ptr, lora_b_ptr, lora_mask_ptr, lora_rank),
                (stride_ltm, stride_lbe, 1, stride_lbr, stride_lmm),
                expert,
                rows,
                pair_rows * stride_lbh,
                row_mask,
                pair_mask,
                False,  # a forward's LoRA term is never masked (dropout is on its input)
                LORA_R,
                PRECISION,
            )
        if HAS_BIAS:
            acc += _bias_row(
                bias_ptr + expert.to(tl.int64) * stride_bias_e,
                pair_rows * stride_bias_h,
                pair_mask,
                1,
            )
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        gate, up = _row_products(
            x_ptr,
            x_rows,
            row_mask,
            stride_xm,
            stride_xk,
            w_ptr + expert.to(tl.int64) * stride_we,
            offs_n,
            n_mask,
            stride_wn,
            stride_wk,
            stride_wh,
            K,
            True,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
        )
        if HAS_LORA:
            lora_strides = (stride_ltm, stride_lbe, stride_lbn, stride_lbr, stride_lmm)
            gate = _lora_term(
                gate,
                (lora_t_ptr, lora_b_ptr, lora_mask_ptr, lora_rank),
                lora_strides,
                expert,
                rows,
                offs_n,
                row_mask,
                n_mask,
                LORA_MASK,
                LORA_R,
                PRECISION,
            )
            up = _lora_term(
                up,
                (lora_t_ptr, lora_b_ptr + stride_lbh, lora_mask_ptr + N, lora_rank),
                lora_strides,
                expert,
                rows,
                offs_n,
                row_mask,
                n_mask,
                LORA_MASK,
                LORA_R,
                PRECISION,
            )
        if HAS_BIAS:
            expert_bias_ptr = bias_ptr + expert.to(tl.int64) * stride_bias_e
            gate += _bias_row(expert_bias_ptr, offs_n, n_mask, stride_bias_n)
            up += _bias_row(expert_bias_ptr + stride_bias_h, offs_n, n_mask, stride_bias_n)
    mask = row_mask[:, None] & n_mask[None, :]
    out_type = h_ptr.dtype.element_ty
    if STORE_GATE_UP:
        g_ptrs = gate_up_ptr + rows.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
        tl.store(g_ptrs, gate.to(out_type), mask=mask)
        tl.store(g_ptrs + N * stride_gn, up.to(out_type), mask=mask)
    # The activation of the values backward will read back (rounded to the storage dtype), so forward and backward
    # agree.
    gate = gate.to(out_type).to(tl.float32)
    up = up.to(out_type).to(tl.float32)
    h, _, _ = _gated(gate, up, ACTIVATION, ALPHA, CLAMP, LIMIT, UP_SHIFT)
    if SCALE_H:
        h = h * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(out_type), mask=mask)


@triton.autotune(
    configs=_configs(WEIGHT_GRAD_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "GATHER_A", "GATHER_B", "SCALE_ROWS"],
    prune_configs_by=_prune("N", "K", "a_ptr", weight_grad=True),
    cache_results=True,  # tuned configs persist in Triton's cache: a second run does not tune again
    do_bench=_time_config,
)
@triton.jit
def grouped_weight_grad_kernel(
    # Pointers
    a_ptr,  # [R, N] in grouped order, or [T, N] read through a_index
    b_ptr,  # [R, K] in grouped order, or [T, K] read through b_index
    dw_ptr,  # [E, N, K], any strides
    m_sizes_ptr,  # [E] rows per expert; R = their sum
    a_index_ptr,  # [R] a's row of each grouped row (GATHER_A; else never read)
    b_index_ptr,  # [R] b's row of each grouped row (GATHER_B; else never read)
    scale_ptr,  # [R] each grouped row's factor on a (SCALE_ROWS; else never read)
    # Dimensions
    N,
    K,
    num_experts,  # E
    ROWS_PER_EXPERT,  # R / E as a power of two: a tuning key, not read by the kernel
    # Strides
    stride_am,
    stride_an,
    stride_bm,
    stride_bk,
    stride_we,
    stride_wn,
    stride_wk,
    # Metadata
    GATHER_A: tl.constexpr,  # a's rows through a_index
    GATHER_B: tl.constexpr,  # b's rows through b_index
    SCALE_ROWS: tl.constexpr,  # each row of a times scale
    PRECISION: tl.constexpr,  # tl.dot's input precision ("ieee" or "tf32")
    E_POW2: tl.constexpr,  # num_experts' block: a power of two, at least 16
    BLOCK_M: tl.constexpr,  # rows reduced per step (autotuned)
    BLOCK_N: tl.constexpr,  # dW tile (autotuned)
    BLOCK_K: tl.constexpr,
):
    """``dW[e] = (scale * A[a_row(rows of e)])ᵀ @ B[b_row(rows of e)]``; zeros for experts without rows.

    One program owns a ``BLOCK_N x BLOCK_K`` tile of one expert's ``dW`` and reduces over that expert's rows,
    ``BLOCK_M`` at a time: no atomics, so the result does not depend on scheduling.
    """
    pid = tl.program_id(0)
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    tiles_k = (K + BLOCK_K - 1) // BLOCK_K
    expert = pid // (tiles_n * tiles_k)
    tile = pid % (tiles_n * tiles_k)
    pid_n = tile // tiles_k
    pid_k = tile % tiles_k

    experts = tl.arange(0, E_POW2)
    m = tl.load(m_sizes_ptr + experts, mask=experts < num_experts, other=0).to(tl.int32)
    row_start = tl.sum(tl.where(experts < expert, m, 0), 0)
    row_end = row_start + tl.load(m_sizes_ptr + expert).to(tl.int32)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        a_rows = _row_offsets(a_index_ptr, rows, row_mask, GATHER_A)
        b_rows = _row_offsets(b_index_ptr, rows, row_mask, GATHER_B)
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_n[None, :] * stride_an,
            mask=row_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if SCALE_ROWS:
            scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + offs_k[None, :] * stride_bk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

    dw_ptrs = (
        dw_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    )
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["rows"])
def glu_backward_rows_kernel(
    # Pointers
    g_ptr,  # [R, N] the gradient reaching h = gated(gate, up), before the row scale
    gate_up_ptr,  # [R, 2N] the pre-activations: gate, then up
    scale_ptr,  # [R] each grouped row's factor
    d_gate_up_ptr,  # [R, 2N] out: d_gate and d_up, laid out as the weight's rows (INTERLEAVED)
    d_scale_ptr,  # [R] out, or [S] written through d_scale_index (SCATTER_D_SCALE)
    d_scale_index_ptr,  # [R] d_scale's element of each row (SCATTER_D_SCALE; else never read)
    d_scale_plus_ptr,  # [R] fp32 added to each row's d_scale (D_SCALE_PLUS; else never read)
    # Dimensions
    rows,  # R
    N,
    # Strides (every column stride: 1)
    stride_gm,
    stride_gum,
    stride_dgm,
    # Metadata
    ACTIVATION: tl.constexpr,  # the gating, as in the forward (gate_up_glu_kernel)
    ALPHA: tl.constexpr,
    CLAMP: tl.constexpr,
    LIMIT: tl.constexpr,
    UP_SHIFT: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # d_gate_up's columns d_gate, d_up pairwise; else all d_gate, then all d_up
    SCATTER_D_SCALE: tl.constexpr,  # d_scale's elements through d_scale_index
    D_SCALE_PLUS: tl.constexpr,  # d_scale plus d_scale_plus (a down bias's share)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # columns per step
):
    """``d_scale = sum_n g * h (+ plus)``, ``d_gate = scale * g * dh/dgate``, ``d_up = scale * g * dh/dup`` with
    ``h = gated(gate, up)`` (:func:`_gated`): the gated activation's backward, ``BLOCK_R`` rows a program.

    Each row's ``d_scale`` is summed in fp32 in one program (no atomics) and stored in ``d_scale``'s dtype, at
    ``d_scale_index[row]`` with ``SCATTER_D_SCALE`` (the routing weights' gradient in their own order)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = offs_r < rows
    offs_r64 = offs_r.to(tl.int64)
    scale = tl.load(scale_ptr + offs_r, mask=row_mask, other=0.0).to(tl.float32)
    d_scale = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < N)[None, :]
        g = tl.load(g_ptr + offs_r64[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        gu_ptrs = gate_up_ptr + offs_r64[:, None] * stride_gum + cols[None, :]
        gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        h, dh_dgate, dh_dup = _gated(gate, up, ACTIVATION, ALPHA, CLAMP, LIMIT, UP_SHIFT)
        d_scale += tl.sum(g * h, axis=1)
        dh = g * scale[:, None]
        out_type = d_gate_up_ptr.dtype.element_ty
        d_rows = d_gate_up_ptr + offs_r64[:, None] * stride_dgm
        d_gate, d_up = (dh * dh_dgate).to(out_type), (dh * dh_dup).to(out_type)
        if INTERLEAVED:  # the pairs woven into one aligned range of columns: stored in vectors, not strided
            pair_cols = 2 * c0 + tl.arange(0, 2 * BLOCK_C)
            pairs = tl.reshape(tl.join(d_gate, d_up), (BLOCK_R, 2 * BLOCK_C))
            tl.store(
                d_rows + pair_cols[None, :], pairs, mask=row_mask[:, None] & (pair_cols < 2 * N)[None, :]
            )
        else:
            tl.store(d_rows + cols[None, :], d_gate, mask=mask)
            tl.store(d_rows + N + cols[None, :], d_up, mask=mask)
    if D_SCALE_PLUS:
        d_scale += tl.load(d_scale_plus_ptr + offs_r, mask=row_mask, other=0.0)
    d_scale_rows = offs_r64
    if SCATTER_D_SCALE:
        d_scale_rows = tl.load(d_scale_index_ptr + offs_r, mask=row_mask, other=0)
    tl.store(d_scale_ptr + d_scale_rows, d_scale.to(d_scale_ptr.dtype.element_ty), mask=row_mask)
