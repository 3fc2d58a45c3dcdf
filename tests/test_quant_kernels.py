"""The 4-bit dequantisation kernel and the experts ops on 4-bit weights, against fp64 references on the
dequantised weights.

On a CPU machine the kernels run in Triton's interpreter (fp32/fp16, small shapes); the ``gpu`` test repeats the
experts in bf16 at Qwen3-30B-A3B widths on a CUDA GPU. Weight shapes are chosen so quantisation blocks straddle
rows and rows start on odd nibbles (``out * in`` no multiple of 64).
"""

from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse.ops.backend import use_backend
from moefuse.ops.dequantize_4bit import dequantize
from moefuse.ops.lora import ExpertsLora, LoraWeights
from moefuse.ops.moe import fused_experts_reference
from moefuse.ops.moe_4bit import moe_fused_linear_4bit
from moefuse.quant import ExpertWeights4bit
from test_triton_kernels import (  # the dense kernels' checks
    CPU_DTYPES,
    DEVICE,
    assert_close,
    randn,
)

FORMATS = [("nf4", True), ("fp4", False)]  # (quant_type, nested statistics)


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
    with use_backend("triton"):
        out = dequantize(w, torch.float32)
        transposed = dequantize(w.transpose(1, 2), torch.float32)
    # The kernel may fuse the nested absmax's multiply-add: an ulp of the scale at most.
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert torch.equal(transposed, out.transpose(1, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_moe_fused_linear_4bit(backend, dtype):
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


PAIRS = ("gate", "up", "down", "gate_up")


def _lora(
    experts: int, hidden: int, inter: int, rank: int, dtype: torch.dtype, dropout=None, together: bool = False
) -> ExpertsLora:
    """LoRA on gate and up apart, or together (gate_up), and on down."""

    def weights(out_features: int, in_features: int, scaling: float) -> LoraWeights:
        a = randn(experts, rank, in_features, dtype=dtype, scale=in_features**-0.5).requires_grad_()
        b = randn(experts, out_features, rank, dtype=dtype, scale=0.3).requires_grad_()
        return LoraWeights(a, b, scaling)

    if together:
        return ExpertsLora(
            gate_up=weights(2 * inter, hidden, 0.5), down=weights(hidden, inter, 1.0), dropout=dropout
        )
    return ExpertsLora(
        weights(inter, hidden, 0.5), weights(inter, hidden, 2.0), weights(hidden, inter, 1.0), dropout
    )


def _double(adapter: ExpertsLora) -> ExpertsLora:
    def cast(w: LoraWeights | None) -> LoraWeights | None:
        if w is None:
            return None
        return LoraWeights(
            w.lora_A.detach().double().requires_grad_(),
            w.lora_B.detach().double().requires_grad_(),
            w.scaling,
        )

    return ExpertsLora(**{name: cast(getattr(adapter, name)) for name in PAIRS}, dropout=adapter.dropout)


def _factors(adapters: list[ExpertsLora]) -> list[torch.Tensor]:
    return [
        f
        for a in adapters
        for w in (getattr(a, name) for name in PAIRS)
        if w is not None
        for f in (w.lora_A, w.lora_B)
    ]


EXPERT_CASES = [
    # backend, tokens, experts, top_k, experts without tokens, adapters
    pytest.param("triton", 9, 6, 2, 2, 1, id="triton-lora"),
    pytest.param("triton", 5, 1, 1, 0, 0, id="triton-E1"),
    pytest.param("triton", 6, 4, 2, 0, 2, id="triton-two-adapters-composed"),
    pytest.param("torch", 9, 6, 2, 2, 1, id="torch-lora"),
]


def _check_fused_experts(
    tokens, hidden, inter, experts, top_k, unused, adapters, rank, dtype, fmt=FORMATS[0], together=False
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
    lora = [_lora(experts, hidden, inter, rank, dtype, together=together) for _ in range(adapters)]
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


@pytest.mark.parametrize("together", [False, True], ids=["gate-up-apart", "gate-up-together"])
@pytest.mark.parametrize("backend,tokens,experts,top_k,unused,adapters", EXPERT_CASES)
def test_fused_experts_on_4bit_weights(backend, tokens, experts, top_k, unused, adapters, together):
    with use_backend(backend):
        _check_fused_experts(
            tokens, 32, 13, experts, top_k, unused, adapters, 4, torch.float32, together=together
        )


def test_4bit_weights_must_be_frozen():
    gate_up = quantized(2, 8, 16, dtype=torch.float32)
    down = quantized(2, 16, 4, dtype=torch.float32)
    gate_up.requires_grad_(True)
    index = torch.zeros(3, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="frozen"):
        moefuse.fused_experts(
            randn(3, 16, dtype=torch.float32), gate_up, down, index, torch.ones(3, 1, device=DEVICE)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 2048])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("together", [False, True], ids=["gate-up-apart", "gate-up-together"])
def test_fused_experts_4bit_bf16_gpu(tokens, fmt, together):
    """bf16 on the GPU at Qwen3-30B-A3B widths (32 experts to keep it short), LoRA r16."""
    _check_fused_experts(tokens, 2048, 768, 32, 8, 0, 1, 16, torch.bfloat16, fmt, together=together)
