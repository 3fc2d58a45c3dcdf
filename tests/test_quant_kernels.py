"""The 4-bit grouped-GEMM kernels and the experts ops on 4-bit weights, against fp64 references on the
dequantised weights.

On a CPU machine the kernels run in Triton's interpreter (fp32/fp16, shapes of one or two tiles so the whole
file stays within seconds); the ``gpu`` tests repeat them in bf16 at larger shapes on a CUDA GPU. Weight shapes
are chosen so quantisation blocks straddle rows and rows start on odd nibbles (``out * in`` no multiple of 64,
odd ``in``: the kernels' per-value fallback), and, in :func:`test_weight_tile_paths` and the even-width cases,
so every path of the tile read runs: even ``in`` (packed bytes read as vectors), rows a whole number of blocks
(one absmax per row and block, a tile inside one block or spanning several) or not, nested statistics or not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moefuse
from moefuse.ops import triton_gemm_4bit as q4
from moefuse.ops.backend import use_backend
from moefuse.ops.lora import ExpertsLora, LoraWeights
from moefuse.ops.moe import fused_experts_reference
from moefuse.ops.moe_4bit import moe_fused_linear_4bit
from moefuse.quant import ExpertWeights4bit
from test_triton_kernels import (  # the dense kernels' checks
    CPU_DTYPES,
    DEVICE,
    M_SIZES,
    _FakeCudaTensor,
    assert_close,
    lora_term,
    randn,
)

FORMATS = [("nf4", True), ("fp4", False)]  # (quant_type, nested statistics)
CASES = [(m, dtype, fmt) for m in M_SIZES for dtype in CPU_DTYPES for fmt in FORMATS[:1]] + [
    pytest.param([5, 1, 0], torch.float16, FORMATS[1], id="fp4-plain"),
    pytest.param([2] * 128, torch.float32, FORMATS[0], id="E128-fp32"),
]


@pytest.fixture(params=["fused", "dequantize"])
def gemm_mode(request):
    q4.set_gemm_mode(request.param)
    yield request.param
    q4.set_gemm_mode(None)


def quantized(
    *shape: int, dtype: torch.dtype, fmt=FORMATS[0], scale: float = 0.2, blocksize: int = 64
) -> ExpertWeights4bit:
    quant_type, nested = fmt
    return ExpertWeights4bit.quantize(
        randn(*shape, dtype=torch.float32, scale=scale), quant_type, blocksize, nested, dtype=dtype
    )


def group_ids(m_sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(m_sizes)), torch.tensor(m_sizes, dtype=torch.long)).to(
        DEVICE
    )


def _m(m_sizes: list[int]) -> torch.Tensor:
    return torch.tensor(m_sizes, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel(dtype, fmt):
    w = quantized(3, 40, 25, dtype=dtype, fmt=fmt)  # 1000 values per expert: a short last block
    ref = w.dequantize(dtype=torch.float32)
    out = q4.dequantize(w, torch.float32)
    # The kernel may fuse the nested absmax's multiply-add: an ulp of the scale at most.
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert torch.equal(q4.dequantize(w.transpose(1, 2), torch.float32), out.transpose(1, 2))


@pytest.mark.parametrize("m_sizes,dtype,fmt", CASES)
def test_grouped_gemm_forward_and_input_gradient_orientation(m_sizes, dtype, fmt, gemm_mode):
    rows, experts = sum(m_sizes), len(m_sizes)
    ids = group_ids(m_sizes)
    w = quantized(experts, 40, 25, dtype=dtype, fmt=fmt)
    dense = w.dequantize().double()
    a = randn(rows, 25, dtype=dtype)
    ref = torch.einsum("rk,rnk->rn", a.double(), dense[ids])
    assert_close(q4.grouped_gemm(a, w, _m(m_sizes)), ref, dtype, "forward x·Wᵀ")
    dy = randn(rows, 40, dtype=dtype)
    ref_t = torch.einsum("rn,rnk->rk", dy.double(), dense[ids])
    assert_close(q4.grouped_gemm(dy, w.transpose(1, 2), _m(m_sizes)), ref_t, dtype, "input gradient dY·W")


# (blocksize, nested, in): with the interpreter's 32 x 64 x 32 tiles, forward tiles are 32 columns of W and
# transposed ones 64. in=256: rows of whole blocks, a tile inside one block or (blocksize 32, transposed) two;
# in=96 / 48: even rows that are no whole number of blocks, so tiles cross block boundaries (per-value absmax).
TILE_PATHS = [
    (32, True, 256),
    (64, False, 256),
    (128, True, 256),
    (256, False, 256),
    (64, True, 96),
    (32, False, 48),
    (256, True, 48),
]


@pytest.mark.parametrize("blocksize,nested,in_features", TILE_PATHS)
def test_weight_tile_paths(blocksize, nested, in_features):
    """The fused kernels' weight-tile reads, forward and transposed, for each blocksize/nesting/width path."""
    q4.set_gemm_mode("fused")
    try:
        m_sizes = [5, 0, 9]
        ids = group_ids(m_sizes)
        w = quantized(3, 40, in_features, dtype=torch.float32, fmt=("nf4", nested), blocksize=blocksize)
        dense = w.dequantize().double()
        a = randn(sum(m_sizes), in_features, dtype=torch.float32)
        ref = torch.einsum("rk,rnk->rn", a.double(), dense[ids])
        assert_close(q4.grouped_gemm(a, w, _m(m_sizes)), ref, torch.float32, "forward x·Wᵀ")
        dy = randn(sum(m_sizes), 40, dtype=torch.float32)
        ref_t = torch.einsum("rn,rnk->rk", dy.double(), dense[ids])
        assert_close(q4.grouped_gemm(dy, w.transpose(1, 2), _m(m_sizes)), ref_t, torch.float32, "dY·W")
    finally:
        q4.set_gemm_mode(None)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_gemm_gather_scale_scatter_and_lora(dtype, masked, gemm_mode):
    m_sizes, tokens, top_k = [5, 0, 9, 1, 7], 11, 2
    ids = group_ids(m_sizes)
    rows = sum(m_sizes)
    token_index = torch.randint(0, tokens, (rows,), device=DEVICE)
    x = randn(tokens, 3 * 21, dtype=dtype)[:, ::3]  # non-contiguous rows
    w = quantized(len(m_sizes), 36, 21, dtype=dtype)
    scale = torch.rand(rows, device=DEVICE)
    lora, lora_value = lora_term(ids, len(m_sizes), 36, dtype, masked=masked)
    grouped = torch.einsum("rk,rnk->rn", x.double()[token_index], w.dequantize().double()[ids]) + lora_value
    grouped = grouped * scale.double()[:, None]
    slots = torch.randperm(tokens * top_k, device=DEVICE)[:rows]
    out = torch.full((tokens * top_k, 36), float("nan"), device=DEVICE, dtype=dtype)
    q4.grouped_gemm(
        x, w, _m(m_sizes), out=out, out_index=slots, a_index=token_index, row_scale=scale, lora=lora
    )
    out, ref = out[slots], grouped
    assert_close(out, ref, dtype, "scattered")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m_sizes", [[3, 0, 5, 1], [17, 33, 2]])
@pytest.mark.parametrize("hidden", [25, 128])  # odd: per-value reads; 128: vector reads, rows of whole blocks
def test_gate_up_swiglu(m_sizes, dtype, hidden, gemm_mode):
    tokens, inter = 7, 20
    ids = group_ids(m_sizes)
    token_index = torch.randint(0, tokens, (sum(m_sizes),), device=DEVICE)
    x = randn(tokens, hidden, dtype=dtype)
    w = quantized(len(m_sizes), 2 * inter, hidden, dtype=dtype)
    lora, lora_value = lora_term(ids, len(m_sizes), 2 * inter, dtype)
    gate_up_ref = (
        torch.einsum("rk,rnk->rn", x.double()[token_index], w.dequantize().double()[ids]) + lora_value
    )
    gate, up = gate_up_ref.chunk(2, dim=-1)
    scale = torch.rand(sum(m_sizes), device=DEVICE)
    h, gate_up = q4.gate_up_swiglu(
        x, w, _m(m_sizes), token_index, store_gate_up=True, lora=lora, row_scale=scale
    )
    assert_close(gate_up, gate_up_ref, dtype, "gate_up")
    assert_close(h, F.silu(gate) * up * scale.double()[:, None], dtype, "h")
    h_only, none = q4.gate_up_swiglu(
        x, w, _m(m_sizes), token_index, store_gate_up=False, lora=lora, row_scale=scale
    )
    assert none is None and torch.equal(h_only, h)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m_sizes", [[3, 0, 5, 1], [17, 33, 2]])
@pytest.mark.parametrize("inter", [21, 64])  # the transposed read's rows: odd, or whole blocks
def test_swiglu_backward(m_sizes, dtype, inter, gemm_mode):
    tokens, hidden = 6, 24
    ids = group_ids(m_sizes)
    token_index = torch.randint(0, tokens, (sum(m_sizes),), device=DEVICE)
    gate_up = randn(sum(m_sizes), 2 * inter, dtype=dtype)
    down = quantized(len(m_sizes), hidden, inter, dtype=dtype, fmt=FORMATS[1])
    scale = torch.rand(sum(m_sizes), device=DEVICE)
    grad_out = randn(tokens, hidden, dtype=dtype)
    lora, lora_value = lora_term(ids, len(m_sizes), inter, dtype, masked=True)

    g64 = gate_up.double().requires_grad_()
    s64 = scale.double().requires_grad_()
    gate, up = g64.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = torch.einsum("rn,rkn->rk", h, down.dequantize().double()[ids]) * s64[:, None]
    ((y * grad_out.double()[token_index]).sum() + (h * lora_value * s64[:, None]).sum()).backward()

    d_gate_up, d_scale = q4.swiglu_backward(
        grad_out, down, gate_up, scale, _m(m_sizes), token_index, lora=lora
    )
    assert_close(d_gate_up, g64.grad, dtype, "d_gate_up")
    assert_close(d_scale, s64.grad, dtype, "d_scale")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_moe_fused_linear_4bit(backend, dtype, gemm_mode):
    m_sizes = [3, 0, 6, 1]
    ids = group_ids(m_sizes)
    w = quantized(len(m_sizes), 16, 25, dtype=dtype, fmt=FORMATS[1])
    x = randn(sum(m_sizes), 25, dtype=dtype).requires_grad_()
    with use_backend(backend):
        y = moe_fused_linear_4bit(x, w, _m(m_sizes))
        dy = randn(*y.shape, dtype=dtype)
        y.backward(dy)
    dense = w.dequantize().double()
    assert_close(y, torch.einsum("rk,rnk->rn", x.double(), dense[ids]), dtype, "forward")
    assert_close(x.grad, torch.einsum("rn,rnk->rk", dy.double(), dense[ids]), dtype, "grad input")


def _lora(experts: int, hidden: int, inter: int, rank: int, dtype: torch.dtype, dropout=None) -> ExpertsLora:
    def weights(out_features: int, in_features: int, scaling: float) -> LoraWeights:
        a = randn(experts, rank, in_features, dtype=dtype, scale=in_features**-0.5).requires_grad_()
        b = randn(experts, out_features, rank, dtype=dtype, scale=0.3).requires_grad_()
        return LoraWeights(a, b, scaling)

    return ExpertsLora(
        weights(inter, hidden, 0.5), weights(inter, hidden, 2.0), weights(hidden, inter, 1.0), dropout
    )


def _double(adapter: ExpertsLora) -> ExpertsLora:
    def cast(w: LoraWeights) -> LoraWeights:
        return LoraWeights(
            w.lora_A.detach().double().requires_grad_(),
            w.lora_B.detach().double().requires_grad_(),
            w.scaling,
        )

    return ExpertsLora(cast(adapter.gate), cast(adapter.up), cast(adapter.down), adapter.dropout)


def _factors(adapters: list[ExpertsLora]) -> list[torch.Tensor]:
    return [f for a in adapters for w in (a.gate, a.up, a.down) for f in (w.lora_A, w.lora_B)]


EXPERT_CASES = [
    # backend, tokens, experts, top_k, experts without tokens, adapters
    pytest.param("triton", 9, 6, 2, 2, 1, id="triton-lora"),
    pytest.param("triton", 5, 1, 1, 0, 0, id="triton-E1"),
    pytest.param("triton", 6, 4, 2, 0, 2, id="triton-two-adapters-composed"),
    pytest.param("torch", 9, 6, 2, 2, 1, id="torch-lora"),
]


def _check_fused_experts(
    tokens, hidden, inter, experts, top_k, unused, adapters, rank, dtype, fmt=FORMATS[0]
) -> None:
    """Output and every gradient (input, routing weights, LoRA factors) of ``fused_experts`` on 4-bit weights
    against the fp64 reference loop on the dequantised weights; the 4-bit weights take no gradient."""
    gate_up = quantized(experts, 2 * inter, hidden, dtype=dtype, fmt=fmt, scale=hidden**-0.5)
    down = quantized(experts, hidden, inter, dtype=dtype, fmt=fmt, scale=inter**-0.5)
    x = randn(tokens, hidden, dtype=dtype).requires_grad_()
    weights, index = torch.topk(
        torch.randn(tokens, experts - unused, device=DEVICE).softmax(-1), top_k, dim=-1
    )
    weights = weights.to(dtype).requires_grad_()
    lora = [_lora(experts, hidden, inter, rank, dtype) for _ in range(adapters)]
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=lora)
    grad = randn(*out.shape, dtype=dtype)
    out.backward(grad)

    x64, w64 = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    lora64 = [_double(a) for a in lora]
    ref = fused_experts_reference(
        x64, gate_up.dequantize().double(), down.dequantize().double(), index, w64, lora=lora64
    )
    ref.backward(grad.double())
    assert_close(out, ref, dtype, "output")
    assert_close(x.grad, x64.grad, dtype, "grad input")
    assert_close(weights.grad, w64.grad, dtype, "grad routing weights")
    for got, want in zip(_factors(lora), _factors(lora64), strict=True):
        assert_close(got.grad, want.grad, dtype, "grad LoRA factor")


@pytest.mark.parametrize("backend,tokens,experts,top_k,unused,adapters", EXPERT_CASES)
def test_fused_experts_on_4bit_weights(backend, tokens, experts, top_k, unused, adapters, gemm_mode):
    with use_backend(backend):
        _check_fused_experts(tokens, 32, 13, experts, top_k, unused, adapters, 4, torch.float32)


def test_4bit_weights_must_be_frozen():
    gate_up = quantized(2, 8, 16, dtype=torch.float32)
    down = quantized(2, 16, 4, dtype=torch.float32)
    gate_up.requires_grad_(True)
    index = torch.zeros(3, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="frozen"):
        moefuse.fused_experts(
            randn(3, 16, dtype=torch.float32), gate_up, down, index, torch.ones(3, 1, device=DEVICE)
        )


def test_gemm_mode_setting(monkeypatch):
    monkeypatch.setenv("MOEFUSE_4BIT_GEMM", "dequantize")
    assert q4.gemm_mode() == "dequantize"
    monkeypatch.setenv("MOEFUSE_4BIT_GEMM", "sometimes")
    with pytest.raises(ValueError, match="MOEFUSE_4BIT_GEMM"):
        q4.gemm_mode()
    with pytest.raises(ValueError, match="4-bit GEMM mode"):
        q4.set_gemm_mode("fast")


# Shared memory Triton allocated for the 4-bit kernels (bf16, compiled for sm90; Triton 3.6 and 3.9 alike), per
# tile config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): (largest of the one-weight-tile kernels, gate/up).
TRITON_SHARED_MEMORY = {
    (128, 128, 64, 8, 3): (87040, 124928),
    (128, 256, 64, 8, 4): (141312, 217088),
    (128, 128, 64, 8, 4): (87040, 124928),
    (64, 128, 64, 4, 4): (70656, 108544),
    (64, 64, 64, 4, 4): (43520, 62464),
    (128, 64, 64, 4, 4): (59904, 78848),
    (64, 32, 64, 4, 4): (30208, 39424),
    (64, 16, 128, 4, 4): (47104, 55808),
}


def _key(config) -> tuple[int, ...]:
    return (
        *(config.kwargs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
        config.num_warps,
        config.num_stages,
    )


@pytest.mark.parametrize("limit,gpu", [(232448, "H100"), (166912, "A100"), (101376, "RTX 4090 / L40 (sm89)")])
@pytest.mark.parametrize("autotune", [True, False])
def test_4bit_configs_fit_the_gpus_shared_memory(monkeypatch, limit, gpu, autotune):
    """The 4-bit kernels' pruning keeps only configs whose estimate fits the GPU, and the estimate bounds what
    Triton allocated: without tuning, the first config kept runs (it did not, with the dense kernels' count)."""
    from moefuse.kernels import grouped_gemm as dense_kernels
    from moefuse.kernels import grouped_gemm_4bit as kernels

    def needs(config, tiles: int) -> int:
        return dense_kernels.shared_memory(config, 2, tiles, False, four_bit=True)

    assert {_key(c) for c in dense_kernels.TILE_CONFIGS} == set(TRITON_SHARED_MEMORY)
    for config in dense_kernels.TILE_CONFIGS:
        one_tile, gate_up = TRITON_SHARED_MEMORY[_key(config)]
        assert needs(config, 1) >= one_tile and needs(config, 2) >= gate_up, _key(config)
    monkeypatch.setattr(dense_kernels, "INTERPRET", False)
    monkeypatch.setattr(dense_kernels, "AUTOTUNE", autotune)
    monkeypatch.setattr(dense_kernels, "shared_memory_limit", lambda index: limit)
    cases = [  # (kernel, operand, weight tiles, N, K): Qwen3-30B-A3B's 4-bit GEMMs
        (kernels.gate_up_swiglu_4bit_kernel, "x_ptr", 2, 768, 2048),
        (kernels.grouped_gemm_4bit_kernel, "a_ptr", 1, 2048, 768),  # down
        (kernels.grouped_gemm_4bit_kernel, "a_ptr", 1, 2048, 1536),  # gate/up's input gradient
        (kernels.grouped_gemm_4bit_kernel, "a_ptr", 1, 768, 2048),  # down's input gradient
    ]
    for kernel, operand, tiles, n, k in cases:
        for rows_per_expert in (16, 256, 1024):
            args = {"N": n, "K": k, "ROWS_PER_EXPERT": rows_per_expert, operand: _FakeCudaTensor()}
            kept = kernel.early_config_prune(dense_kernels.TILE_CONFIGS, args)
            assert kept, (gpu, operand)
            assert all(needs(c, tiles) <= limit for c in kept), (gpu, operand)
            assert TRITON_SHARED_MEMORY[_key(kept[0])][tiles - 1] <= limit, (gpu, operand)
            if not autotune or rows_per_expert < 64:
                assert len(kept) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 2048])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_experts_4bit_bf16_gpu(tokens, fmt, gemm_mode):
    """bf16 on the GPU at Qwen3-30B-A3B widths (32 experts to keep it short), LoRA r16."""
    _check_fused_experts(tokens, 2048, 768, 32, 8, 0, 1, 16, torch.bfloat16, fmt)
