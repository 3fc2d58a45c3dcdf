"""Rotary embeddings: the Triton kernel against the PyTorch reference (in the interpreter on the CPU: fp32/fp16;
bf16 at Qwen3-30B-A3B's heads on a GPU), the reference against each supported family's own function, and the
switch of a family's modeling code."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, randomize_, tiny_config
from moefuse.ops.backend import use_backend
from moefuse.ops.rope import (
    ROPE_MODEL_TYPES,
    _RotaryEmbedding,
    apply_rotary_pos_emb,
    fused_rope,
    rope_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _trig(batch: int, seq: int, dim: int, dtype: torch.dtype, g: torch.Generator) -> tuple:
    """cos and sin ``[batch, seq, dim]`` as Transformers builds them: the frequencies twice over."""
    positions = torch.randint(0, 4096, (batch, seq), generator=g).float()
    freqs = positions[..., None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def _heads(
    batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """``[batch, heads, seq, dim]`` laid out as the attention builds it: ``[batch, seq, heads, dim]`` transposed."""
    return torch.randn(batch, seq, heads, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)


def _compare(q, k, cos, sin, kernel_must_run: bool = True):
    """Outputs and gradients of ``apply_rotary_pos_emb`` on the Triton backend against the reference."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    calls = []
    original = _RotaryEmbedding.forward

    def counted(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    _RotaryEmbedding.forward = staticmethod(counted)
    try:
        with use_backend("triton"):
            out_q, out_k = apply_rotary_pos_emb(q, k, cos, sin)
    finally:
        _RotaryEmbedding.forward = staticmethod(original)
    assert bool(calls) == kernel_must_run
    ref_q, ref_k = rope_reference(q_ref, k_ref, cos, sin)
    tol = TOL[q.dtype]
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(ref.shape, generator=g).to(ref.dtype).to(DEVICE) for ref in (ref_q, ref_k)]
    ((out_q * grads[0]).sum() + (out_k * grads[1]).sum()).backward()
    ((ref_q * grads[0]).sum() + (ref_k * grads[1]).sum()).backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=tol, atol=tol)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch,q_heads,k_heads,seq,dim,trig_batch",
    [
        (1, 4, 2, 9, 16, 1),  # grouped keys, cos broadcast over the batch (packed rows: one row)
        (2, 3, 3, 5, 32, 2),  # a cos per batch row; head counts no power of two
        (3, 32, 4, 2, 8, 3),  # Qwen3-30B-A3B's head counts: heads in several blocks
        (1, 2, 1, 1, 16, 1),  # one token
        (1, 2, 2, 0, 16, 1),  # no token
    ],
)
def test_matches_reference(batch, q_heads, k_heads, seq, dim, trig_batch, dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = _trig(trig_batch, seq, dim, dtype, g)
    _compare(_heads(batch, q_heads, seq, dim, dtype, g), _heads(batch, k_heads, seq, dim, dtype, g), cos, sin)


@pytest.mark.interpreter
def test_contiguous_heads_and_distinct_halves():
    """Heads contiguous (``[B, H, S, D]`` in memory) rotate as well, and cos/sin whose halves differ (the kernel
    reads both halves, nothing assumes them equal)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 6, 16, generator=g).to(DEVICE)
    cos, sin = (torch.randn(2, 6, 16, generator=g).to(DEVICE) for _ in range(2))
    _compare(q, k, cos, sin)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["partial rotary", "trig takes a gradient", "odd half", "unsqueeze_dim 2"])
def test_what_the_kernel_does_not_take_runs_the_reference(case):
    g = torch.Generator().manual_seed(2)
    q, k = _heads(1, 2, 5, 16, torch.float32, g), _heads(1, 2, 5, 16, torch.float32, g)
    cos, sin = _trig(1, 5, 16, torch.float32, g)
    if case == "partial rotary":
        cos, sin = cos[..., :8], sin[..., :8]
        with use_backend("triton"), pytest.raises(RuntimeError):  # as Transformers' own: shapes must match
            apply_rotary_pos_emb(q, k, cos, sin)
        return
    if case == "trig takes a gradient":
        cos = cos.detach().requires_grad_()
    if case == "odd half":
        q, k = _heads(1, 2, 5, 12, torch.float32, g), _heads(1, 2, 5, 12, torch.float32, g)
        cos, sin = _trig(1, 5, 12, torch.float32, g)
    if case == "unsqueeze_dim 2":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        with use_backend("triton"):
            got = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        for out, ref in zip(got, rope_reference(q, k, cos, sin, unsqueeze_dim=2), strict=True):
            torch.testing.assert_close(out, ref)
        return
    _compare(q, k, cos, sin, kernel_must_run=False)


@pytest.mark.interpreter
def test_compiled_graphs_take_the_reference_whole():
    """Under torch.compile the reference's elementwise ops go into the graph (the compiler fuses them): no graph
    break, no kernel launch traced."""
    g = torch.Generator().manual_seed(5)
    q, k = _heads(1, 4, 5, 16, torch.float32, g), _heads(1, 2, 5, 16, torch.float32, g)
    cos, sin = _trig(1, 5, 16, torch.float32, g)
    torch._dynamo.reset()
    with use_backend("triton"):
        compiled = torch.compile(apply_rotary_pos_emb, backend="aot_eager", fullgraph=True)
        for got, want in zip(compiled(q, k, cos, sin), rope_reference(q, k, cos, sin), strict=True):
            torch.testing.assert_close(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_rope_is_the_reference_and_switches_for_the_block(family):
    """Each supported family's ``apply_rotary_pos_emb`` computes the reference's formula (bit for bit), and
    :func:`fused_rope` swaps it in the family's modeling code within the block only, with the model's logits
    kept (the kernel in the interpreter on a CPU machine, fp32)."""
    assert family in ROPE_MODEL_TYPES
    model = randomize_(AutoModelForCausalLM.from_config(tiny_config(family)), std=0.5).eval().to(DEVICE)
    module = sys.modules[type(model).__module__]
    own_function = module.apply_rotary_pos_emb
    g = torch.Generator().manual_seed(3)
    q, k = _heads(2, 4, 5, 8, torch.float32, g), _heads(2, 2, 5, 8, torch.float32, g)
    cos, sin = _trig(2, 5, 8, torch.float32, g)
    for got, want in zip(own_function(q, k, cos, sin), rope_reference(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g).to(DEVICE)
    with torch.no_grad():
        own = model(input_ids=ids).logits
        with fused_rope(model) as switched, use_backend("triton"):
            assert switched and module.apply_rotary_pos_emb is apply_rotary_pos_emb
            torch.testing.assert_close(model(input_ids=ids).logits, own, rtol=1e-4, atol=1e-4)
    assert module.apply_rotary_pos_emb is own_function


def test_other_families_are_not_switched():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    model.config.model_type = "not_a_moe_family"
    with fused_rope(model) as switched:
        assert not switched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 kernels)")
@pytest.mark.parametrize("batch,seq", [(1, 16384), (8, 2048)])
def test_bf16_at_qwen3_heads_gpu(batch, seq):
    g = torch.Generator().manual_seed(4)
    cos, sin = _trig(1, seq, 128, torch.bfloat16, g)
    _compare(
        _heads(batch, 32, seq, 128, torch.bfloat16, g),
        _heads(batch, 4, seq, 128, torch.bfloat16, g),
        cos,
        sin,
    )
