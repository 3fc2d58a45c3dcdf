"""fused_experts with LoRA (two thin grouped GEMMs per projection) against the per-expert reference, on the
PyTorch path and on the Triton kernels (interpreted on a CPU machine)."""

import pytest
import torch

import moefuse
from moefuse.ops import ExpertsLora, LoraWeights
from moefuse.ops.backend import use_backend
from moefuse.ops.gating import Gating
from moefuse.ops.moe import fused_experts_reference

# On a GPU machine the problems live on the GPU (the Triton path needs it); on a CPU one Triton is interpreted.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=["torch", "triton"])
def backend(request):
    with use_backend(request.param), torch.device(DEVICE):
        yield request.param


def _factors(experts, out, inp, rank, scaling, dtype):
    a = (torch.randn(experts, rank, inp) / inp**0.5).to(dtype).requires_grad_()
    b = (torch.randn(experts, out, rank) / rank**0.5).to(dtype).requires_grad_()
    return LoraWeights(a, b, scaling)


def _problem(
    tokens, hidden, inter, experts, top_k, projections, ranks=(4, 3, 5), dtype=torch.float32, unused=0
):
    x = torch.randn(tokens, hidden, dtype=dtype)
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, dtype=dtype) / inter**0.5
    logits = torch.randn(tokens, experts - unused)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    shapes = {
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
        "gate_up": (2 * inter, hidden),
    }
    # gate_up (gate and up together) takes gate's rank and scaling
    names = ("gate_up" if "gate_up" in projections else "gate", "up", "down")
    lora = ExpertsLora(
        **{
            name: _factors(experts, *shapes[name], rank, 0.5 + i, dtype)
            for i, (name, rank) in enumerate(zip(names, ranks, strict=True))
            if name in projections
        }
    )
    return x.requires_grad_(), gate_up, down, index, weights.to(dtype).requires_grad_(), lora


def _clone_lora(lora: ExpertsLora) -> ExpertsLora:
    def clone(w):
        if w is None:
            return None
        return LoraWeights(
            w.lora_A.detach().clone().requires_grad_(), w.lora_B.detach().clone().requires_grad_(), w.scaling
        )

    return ExpertsLora(clone(lora.gate), clone(lora.up), clone(lora.down), lora.dropout, clone(lora.gate_up))


def _grads(lora: ExpertsLora):
    return {
        f"{name}.{f}": getattr(getattr(lora, name), f).grad
        for name in ("gate", "up", "down", "gate_up")
        if getattr(lora, name) is not None
        for f in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k,unused,projections",
    [
        (9, 32, 16, 8, 2, 3, ("gate", "up", "down")),  # experts without tokens
        (1, 32, 16, 4, 1, 0, ("gate", "up", "down")),  # one token, top-1
        (5, 16, 8, 1, 1, 0, ("down",)),  # E = 1, down only
        (40, 32, 24, 32, 4, 0, ("gate",)),  # gate only: the up half of B is zeros
        (13, 20, 6, 6, 3, 1, ("up", "down")),  # unaligned sizes (loop path), no gate
        (9, 32, 16, 8, 2, 3, ("gate_up", "down")),  # gate and up together, as PEFT's target_parameters
        (13, 20, 6, 6, 3, 1, ("gate_up",)),  # together, unaligned, no down
    ],
)
@pytest.mark.parametrize("act_fn", [None, torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu_tanh"])
def test_lora_matches_reference_with_grads(
    tokens, hidden, inter, experts, top_k, unused, projections, act_fn
):
    act = {} if act_fn is None else {"act_fn": act_fn}
    x, gate_up, down, index, weights, lora = _problem(
        tokens, hidden, inter, experts, top_k, projections, unused=unused
    )
    ref_lora = _clone_lora(lora)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora], **act)
    ref = fused_experts_reference(x_ref, gate_up, down, index, w_ref, lora=[ref_lora], **act)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    got, want = _grads(lora), _grads(ref_lora)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("projections", [("gate_up", "down"), ("down",)])
@pytest.mark.parametrize("transposed", [False, True], ids=["stored", "transposed"])
def test_lora_with_gpt_oss_gating_and_biases_matches_reference(projections, transposed):
    """LoRA on the experts of GPT-OSS's structure (clamped SwiGLU with alpha and up + 1, gate/up rows interleaved,
    biases on both projections, the biases trained): the fused path's output and every gradient, the biases'
    included, are the reference's. The limit is low enough that the clamps cut."""
    gating = Gating("silu", alpha=1.702, limit=0.5, up_shift=1.0, interleaved=True)
    x, gate_up, down, index, weights, lora = _problem(9, 32, 16, 8, 2, projections, unused=3)
    if transposed:  # GPT-OSS stores [E, H, 2I] and [E, I, H]: the ops read transposed views of them
        gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    biases = {
        "gate_up_bias": (0.3 * torch.randn(8, 32)).requires_grad_(),
        "down_bias": (0.3 * torch.randn(8, 32)).requires_grad_(),
    }
    ref_lora = _clone_lora(lora)
    ref_biases = {k: v.detach().clone().requires_grad_() for k, v in biases.items()}
    x_ref, w_ref = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora], gate_fn=gating, **biases)
    ref = fused_experts_reference(
        x_ref, gate_up, down, index, w_ref, lora=[ref_lora], gate_fn=gating, **ref_biases
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    got = {"x": x.grad, "weights": weights.grad, **{k: v.grad for k, v in biases.items()}, **_grads(lora)}
    want = {
        "x": x_ref.grad,
        "weights": w_ref.grad,
        **{k: v.grad for k, v in ref_biases.items()},
        **_grads(ref_lora),
    }
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_lora_equals_merged_weights_and_frozen_base_gets_no_grad():
    x, gate_up, down, index, weights, lora = _problem(17, 32, 16, 8, 2, ("gate", "up", "down"))
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora])
    merged_gate_up = gate_up + torch.cat([lora.gate.delta_weight(), lora.up.delta_weight()], dim=1)
    merged = moefuse.fused_experts(x, merged_gate_up, down + lora.down.delta_weight(), index, weights)
    torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert gate_up.grad is None and down.grad is None
    assert all(g is not None for g in _grads(lora).values())


def test_factors_updated_between_forward_and_backward():
    """The experts' autograd keeps no reference to the factors' values: an in-place update between forward and
    backward (an optimizer stepping while another micro-batch's graph is alive) is no error, as with PEFT."""
    x, gate_up, down, index, weights, lora = _problem(9, 32, 16, 4, 2, ("gate", "up", "down"))
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora])
    with torch.no_grad():
        for w in (lora.gate, lora.up, lora.down):
            w.lora_A.mul_(1.0)
    out.sum().backward()
    assert all(g is not None for g in _grads(lora).values())


def test_two_adapters_add_up():
    x, gate_up, down, index, weights, first = _problem(11, 16, 8, 4, 2, ("gate", "up", "down"))
    *_, second = _problem(11, 16, 8, 4, 2, ("up", "down"), ranks=(2, 2, 2))
    both = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[first, second])
    ref = fused_experts_reference(x, gate_up, down, index, weights, lora=[first, second])
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-5)


def test_fp16_and_fp32_factors_on_fp16_base():
    x, gate_up, down, index, weights, lora = _problem(
        12, 32, 16, 4, 2, ("gate", "up", "down"), dtype=torch.float16
    )
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora])
    ref = fused_experts_reference(
        x.float(), gate_up.float(), down.float(), index, weights.float(), lora=[lora]
    )
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # factors kept in fp32 on an fp16 base (PEFT's autocast_adapter_dtype): their gradients come back in fp32
    fp32 = ExpertsLora(
        *(
            LoraWeights(
                w.lora_A.detach().float().requires_grad_(),
                w.lora_B.detach().float().requires_grad_(),
                w.scaling,
            )
            for w in (lora.gate, lora.up, lora.down)
        )
    )
    ref_lora = _clone_lora(fp32)
    x32 = x.detach().float().requires_grad_()
    out32 = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[fp32])
    ref = fused_experts_reference(x32, gate_up.float(), down.float(), index, weights.float(), lora=[ref_lora])
    assert out32.dtype == torch.float16
    torch.testing.assert_close(out32.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    (out32.float() * grad).sum().backward()
    (ref * grad).sum().backward()
    got, want = _grads(fp32), _grads(ref_lora)
    for name in want:
        assert got[name].dtype == torch.float32, name
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-2 * scale, msg=name)


def test_dropout_applies_to_lora_input_only():
    x, gate_up, down, index, weights, lora = _problem(64, 32, 16, 4, 2, ("gate", "up", "down"))
    dropped = ExpertsLora(lora.gate, lora.up, lora.down, dropout=torch.nn.Dropout(1.0))
    torch.testing.assert_close(
        moefuse.fused_experts(x, gate_up, down, index, weights, lora=[dropped]),
        moefuse.fused_experts(x, gate_up, down, index, weights),
    )


def test_gate_up_together_equals_gate_and_up_sharing_one_a():
    """One pair on the stacked gate/up (A [E, r, H], B [E, 2I, r]) is gate and up apart with the same A and B's
    halves: the same output, and its factors' gradients the sums and concatenation of theirs."""
    x, gate_up, down, index, weights, lora = _problem(17, 32, 16, 8, 2, ("gate_up", "down"))
    inter = down.shape[2]
    a, b = lora.gate_up.lora_A.detach(), lora.gate_up.lora_B.detach()
    scaling = lora.gate_up.scaling
    gate_a, up_a = a.clone().requires_grad_(), a.clone().requires_grad_()
    gate_b, up_b = b[:, :inter].clone().requires_grad_(), b[:, inter:].clone().requires_grad_()
    apart = ExpertsLora(
        LoraWeights(gate_a, gate_b, scaling), LoraWeights(up_a, up_b, scaling), _clone_lora(lora).down
    )
    x_apart = x.detach().clone().requires_grad_()
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora])
    ref = moefuse.fused_experts(x_apart, gate_up, down, index, weights, lora=[apart])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_apart.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.gate_up.lora_A.grad, gate_a.grad + up_a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.gate_up.lora_B.grad, torch.cat([gate_b.grad, up_b.grad], dim=1))


def test_gate_up_together_excludes_gate_and_up_apart():
    w = LoraWeights(torch.zeros(2, 1, 4), torch.zeros(2, 6, 1))
    with pytest.raises(ValueError, match="gate_up .gate and up together. or gate/up .apart., not both"):
        ExpertsLora(gate=w, gate_up=w)


def test_bad_factor_shape_names_projection():
    x, gate_up, down, index, weights, lora = _problem(5, 16, 8, 4, 2, ("gate",))
    bad = ExpertsLora(down=LoraWeights(torch.zeros(4, 2, 16), torch.zeros(4, 16, 2)))
    with pytest.raises(ValueError, match=r"down LoRA factors must be lora_A \[E, r, in\] = \[4, r, 8\]"):
        moefuse.fused_experts(x, gate_up, down, index, weights, lora=[bad])


def test_dropout_masks_reach_forward_and_backward(monkeypatch, backend):
    """Every element kept (mask 1 / (1 - p) = 2 at p = 0.5) must equal the reference with x -> 2x on the LoRA
    inputs: the masks are applied to the gate/up and the down LoRA inputs, forward and backward."""
    if backend != "triton":
        pytest.skip("the mask plumbing of the fused Triton path")
    from moefuse.ops import moe_triton

    monkeypatch.setattr(moe_triton, "_mask", lambda like, p: torch.full_like(like, 1 / (1 - p)))
    x, gate_up, down, index, weights, lora = _problem(9, 32, 16, 8, 2, ("gate", "up", "down"))
    ref_lora = _clone_lora(lora)
    dropped = ExpertsLora(lora.gate, lora.up, lora.down, dropout=torch.nn.Dropout(0.5))
    doubled = ExpertsLora(ref_lora.gate, ref_lora.up, ref_lora.down, dropout=lambda t: 2 * t)
    x_ref = x.detach().clone().requires_grad_()
    out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[dropped])
    ref = fused_experts_reference(x_ref, gate_up, down, index, weights, lora=[doubled])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    got, want = _grads(lora), _grads(ref_lora)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
