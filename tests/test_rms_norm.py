"""RMSNorm: the Triton kernels against the PyTorch reference (in the interpreter on the CPU: fp32/fp16; bf16 at
Qwen3-30B-A3B widths on a GPU), and the reference against each supported family's own norm modules."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, randomize_, tiny_config
from moefuse.ops.backend import use_backend
from moefuse.ops.rms_norm import RMS_NORM_CLASSES, rms_norm, rms_norm_reference, use_fused_rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _compare(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "triton"):
    """Output and gradients of ``rms_norm`` on ``backend`` against the reference (on copies of the inputs)."""
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    w_ref = weight.detach().clone().requires_grad_(weight.requires_grad)
    with use_backend(backend):
        out = rms_norm(x, weight, eps)
    ref = rms_norm_reference(x_ref, w_ref, eps)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    if weight.requires_grad:
        scale = w_ref.grad.abs().max().item() + 1
        torch.testing.assert_close(weight.grad, w_ref.grad, rtol=tol, atol=tol * scale)
    else:
        assert weight.grad is None


def _inputs(shape, dtype, weight_dtype=None, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(DEVICE).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).to(DEVICE)
    return x, w.requires_grad_(weight_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (5, 3, 48),  # 3-D, rows of a width that is no power of two
        (300, 20),  # many row blocks: each backward program sums the weight's gradient over several
        (1, 2048),  # one row, Qwen3-30B-A3B's hidden width
        (6, 4, 128),  # per-head norm (q_norm / k_norm): head_dim wide
        (0, 16),  # no rows
    ],
)
def test_matches_reference(shape, dtype):
    _compare(*_inputs(shape, dtype))


def test_frozen_weight_gets_no_gradient():
    _compare(*_inputs((9, 24), torch.float32, weight_grad=False))


def test_fp32_weight_on_fp16_rows_promotes():
    x, w = _inputs((7, 40), torch.float16, weight_dtype=torch.float32)
    _compare(x, w)


def test_non_contiguous_rows_and_gradient():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 2, 32, generator=g).to(DEVICE)
    x = base[:, 1, :].detach().requires_grad_()  # rows 64 elements apart
    w = (1 + 0.3 * torch.randn(32, generator=g)).to(DEVICE).requires_grad_()
    _compare(x, w)
    # a stride-0 upstream gradient (the gradient of a sum)
    x2 = torch.randn(8, 16, device=DEVICE).requires_grad_()
    x2_ref = x2.detach().clone().requires_grad_()
    with use_backend("triton"):
        rms_norm(x2, torch.ones(16, device=DEVICE), 1e-5).sum().backward()
    rms_norm_reference(x2_ref, torch.ones(16, device=DEVICE), 1e-5).sum().backward()
    torch.testing.assert_close(x2.grad, x2_ref.grad)


@pytest.mark.interpreter
def test_compiled_graphs_take_the_reference_whole():
    """Under torch.compile the reference goes into the graph (the compiler fuses it): no graph break, no kernel
    launch traced, the reference's values and gradients."""
    x, w = _inputs((6, 4, 32), torch.float32)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch._dynamo.reset()
    with use_backend("triton"):
        out = torch.compile(rms_norm, backend="aot_eager", fullgraph=True)(x, w, 1e-6)
    ref = rms_norm_reference(x_ref, w_ref, 1e-6)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch._dynamo.reset()


def test_bad_weight_names_the_shapes():
    with pytest.raises(ValueError, match=r"weight must be \[width\] = \[8\].*got \(7,\)"):
        rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_norms_switch_and_match_their_own_forward(family):
    """Each supported family's norm modules are in RMS_NORM_CLASSES and compute the reference's formula (bit
    for bit on the PyTorch path); the switch is undone by enable=False."""
    model = randomize_(AutoModelForCausalLM.from_config(tiny_config(family)), std=0.5).eval().to(DEVICE)
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(type(m).__name__ in RMS_NORM_CLASSES for m in norms)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    with torch.no_grad():
        own = model(input_ids=ids).logits
        assert use_fused_rms_norm(model) == len(norms)
        with use_backend("torch"):
            assert torch.equal(model(input_ids=ids).logits, own)
        with use_backend("triton"):  # the kernels (interpreted on a CPU machine), fp32
            torch.testing.assert_close(model(input_ids=ids).logits, own, rtol=1e-4, atol=1e-4)
        assert use_fused_rms_norm(model, enable=False) == len(norms)
        assert all("forward" not in vars(m) for m in norms)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 kernels)")
@pytest.mark.parametrize("shape", [(4096, 2048), (4096, 32, 128), (4096, 4, 128)])
def test_bf16_at_qwen3_widths_gpu(shape):
    _compare(*_inputs(shape, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_every_row_count_runs_one_compiled_kernel_gpu(monkeypatch):
    """Packed steps bring a new row count each step. The row count is not specialised on: one compiled kernel
    per direction serves 16-divisible, odd and one-row counts (launched directly after the first), each right."""
    from moefuse.kernels import rms_norm as kernels
    from moefuse.ops import launch as launch_module

    monkeypatch.setattr(launch_module, "_launchers", {})
    for rows in (4096, 4097, 1, 7200, 7216):
        _compare(*_inputs((rows, 2048), torch.bfloat16, seed=rows))
    for kernel in (kernels.rms_norm_forward_kernel, kernels.rms_norm_backward_kernel):
        assert len(launch_module._launchers[id(kernel)].compiled) == 1, kernel.fn.__name__
