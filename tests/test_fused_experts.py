import pytest
import torch
import torch.nn.functional as F

import moefuse
from moefuse.ops.moe import fused_experts_reference


def _problem(tokens, hidden, inter, experts, top_k, dtype=torch.float32, unused_experts=0):
    x = torch.randn(tokens, hidden, dtype=dtype)
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, dtype=dtype) / inter**0.5
    # route only to the first experts - unused_experts, so the rest receive no tokens
    logits = torch.randn(tokens, experts - unused_experts)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return [t.requires_grad_() for t in (x, gate_up, down)] + [index, weights.to(dtype).requires_grad_()]


def _clone(args):
    return [a.detach().clone().requires_grad_(a.requires_grad) for a in args]


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k,unused",
    [
        (9, 32, 16, 8, 2, 3),  # experts without tokens
        (1, 32, 16, 4, 1, 0),  # one token, top-1
        (5, 16, 8, 1, 1, 0),  # E = 1
        (40, 32, 24, 128, 8, 0),  # E = 128, top-8
        (13, 20, 6, 6, 3, 1),  # unaligned sizes (loop path)
    ],
)
def test_matches_reference_with_grads(tokens, hidden, inter, experts, top_k, unused):
    args = _problem(tokens, hidden, inter, experts, top_k, unused_experts=unused)
    ref_args = _clone(args)
    out = moefuse.fused_experts(*args)
    ref = fused_experts_reference(*ref_args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    for a, r, name in zip(
        args, ref_args, ("hidden_states", "gate_up_proj", "down_proj", "idx", "top_k_weights"), strict=True
    ):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_non_contiguous_inputs():
    x, gu, d, idx, w = _problem(11, 32, 16, 8, 2)
    xt = torch.randn(32, 11).t().requires_grad_()  # non-contiguous hidden states
    gut = gu.detach().transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous weight view
    out = moefuse.fused_experts(xt, gut, d, idx, w)
    torch.testing.assert_close(out, fused_experts_reference(xt, gut, d, idx, w), rtol=1e-5, atol=1e-5)


def test_other_activation():
    args = _problem(7, 16, 8, 4, 2)
    out = moefuse.fused_experts(*args, act_fn=F.gelu)
    torch.testing.assert_close(out, fused_experts_reference(*args, act_fn=F.gelu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision(dtype, tol):
    args = _problem(17, 32, 16, 8, 2, dtype=dtype)
    out = moefuse.fused_experts(*args)
    assert out.dtype == dtype
    ref = fused_experts_reference(*[a.detach().float() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def _bad(**over):
    x, gu, d, idx, w = (a.detach() for a in _problem(4, 16, 8, 4, 2))
    args = dict(hidden_states=x, gate_up_proj=gu, down_proj=d, top_k_index=idx, top_k_weights=w)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,err,match",
    [
        (dict(top_k_index=torch.tensor([[0, 4]] * 4)), IndexError, "expert id 4, outside \\[0, 4\\)"),
        (dict(hidden_states=torch.randn(4, 12)), ValueError, "hidden=16"),
        (dict(down_proj=torch.randn(4, 16, 9)), ValueError, "down_proj must be"),
        (dict(gate_up_proj=torch.randn(4, 15, 16)), ValueError, "even"),
        (dict(top_k_weights=torch.rand(4, 3)), ValueError, "shape of top_k_index"),
        (dict(hidden_states=torch.randn(5, 16)), ValueError, "5 tokens"),
        (dict(down_proj=torch.randn(4, 16, 8, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(top_k_index=torch.zeros(4, 2)), TypeError, "integer"),
    ],
)
def test_bad_inputs(over, err, match):
    with pytest.raises(err, match=match):
        moefuse.fused_experts(**_bad(**over))
