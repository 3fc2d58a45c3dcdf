"""Triton is an optional dependency (the ``triton`` extra): without it moefuse imports and runs its PyTorch paths."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # as if Triton were not installed: every import of it fails
    import torch
    import moefuse
    from moefuse.ops import causal_lm_loss, fused_experts_reference, rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    gate_up, down = torch.randn(3, 10, 8, requires_grad=True), torch.randn(3, 8, 5, requires_grad=True)
    idx, w = torch.randint(0, 3, (6, 2)), torch.rand(6, 2)
    out = moefuse.fused_experts(x, gate_up, down, idx, w)
    torch.testing.assert_close(out, fused_experts_reference(x, gate_up, down, idx, w))
    out.sum().backward()
    weight = torch.randn(8, requires_grad=True)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    logits, labels = torch.randn(2, 4, 11, requires_grad=True), torch.randint(0, 11, (2, 4))
    causal_lm_loss(logits, labels, vocab_size=11).backward()
    print("info:", moefuse.ops.backend.active_backend_description(torch.device("cpu")))
    """
)


def test_moefuse_runs_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "info: PyTorch" in result.stdout
