import pytest
import torch

import moefuse
from moefuse.ops.grouped_gemm import moe_fused_linear_reference


def _inputs(m_sizes, d_in, d_out, dtype=torch.float32, non_contiguous=False):
    m_sizes = torch.tensor(m_sizes, dtype=torch.long)
    n, e = int(m_sizes.sum()), m_sizes.numel()
    x = torch.randn(n, d_in * (2 if non_contiguous else 1), dtype=dtype)
    w = torch.randn(e, d_out, d_in * (2 if non_contiguous else 1), dtype=dtype) / d_in**0.5
    if non_contiguous:
        x, w = x[:, ::2], w[:, :, ::2]
    return x.requires_grad_(), w.requires_grad_(), m_sizes


CASES = [
    # m_sizes, in, out
    ([3, 0, 5, 1], 32, 16),  # an expert with no rows, one with a single row
    ([1], 8, 8),  # E = 1
    ([0, 0, 0], 16, 8),  # no rows at all
    ([17, 33, 2], 24, 40),  # counts not a multiple of any block size
    ([2] * 128, 16, 8),  # E = 128
    ([4, 3], 7, 5),  # unaligned feature sizes: the loop path
]


@pytest.mark.parametrize("m_sizes,d_in,d_out", CASES)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_forward_and_grads_match_reference(m_sizes, d_in, d_out, non_contiguous):
    x, w, m = _inputs(m_sizes, d_in, d_out, non_contiguous=non_contiguous)
    y = moefuse.moe_fused_linear(x, w, m)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = moe_fused_linear_reference(xr, wr, m)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_against_fp32_reference(dtype, tol):
    x, w, m = _inputs([5, 0, 9, 1], 32, 24, dtype=dtype)
    y = moefuse.moe_fused_linear(x, w, m)
    assert y.dtype == dtype
    ref = moe_fused_linear_reference(x.detach().float(), w.detach().float(), m)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_input_cast_to_weight_dtype():
    x, w, m = _inputs([2, 3], 16, 8)
    y = moefuse.moe_fused_linear(x.detach().double(), w.detach(), m)
    assert y.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (
            dict(x=torch.randn(4, 8), w=torch.randn(2, 4, 9), m=torch.tensor([2, 2])),
            ValueError,
            "in_features=9",
        ),
        (dict(x=torch.randn(4, 8), w=torch.randn(4, 8), m=torch.tensor([4])), ValueError, "3-D"),
        (
            dict(x=torch.randn(4, 8), w=torch.randn(2, 4, 8), m=torch.tensor([1, 2])),
            ValueError,
            "sum to the 4",
        ),
        (
            dict(x=torch.randn(4, 8), w=torch.randn(2, 4, 8), m=torch.tensor([4])),
            ValueError,
            "one count per expert",
        ),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 4, 8), m=torch.tensor([2.0, 2.0])), TypeError, "integer"),
        (
            dict(x=torch.ones(4, 8, dtype=torch.long), w=torch.randn(2, 4, 8), m=torch.tensor([2, 2])),
            TypeError,
            "floating",
        ),
    ],
)
def test_bad_inputs(kwargs, err, match):
    with pytest.raises(err, match=match):
        moefuse.moe_fused_linear(kwargs["x"], kwargs["w"], kwargs["m"])


def test_grouped_mm_takes_given_offsets():
    """``ExpertRouting.offsets`` passed in gives what the offsets computed from ``m_sizes`` give (bf16 with 16-byte
    strides, so ``torch.nn.functional.grouped_mm`` runs, on the CPU too)."""
    from moefuse.ops.grouped_gemm import grouped_mm, grouped_mm_weight_grad

    m_sizes = torch.tensor([3, 0, 5, 1])
    offsets = torch.cumsum(m_sizes, 0, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 8, generator=g).bfloat16()
    b = torch.randn(4, 8, 16, generator=g).bfloat16()
    c = torch.randn(9, 16, generator=g).bfloat16()
    assert torch.equal(grouped_mm(a, b, m_sizes, offsets), grouped_mm(a, b, m_sizes))
    assert torch.equal(grouped_mm_weight_grad(c, a, m_sizes, offsets), grouped_mm_weight_grad(c, a, m_sizes))
