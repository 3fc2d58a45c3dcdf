"""The Triton kernels against their PyTorch references: each launcher, then the ops on the Triton backend.

On a CPU machine they run in Triton's interpreter (fp32/fp16, small shapes; bf16 loads are wrong there); the
tests marked ``gpu`` repeat them in bf16 at larger shapes on a CUDA GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import moefuse
from moefuse.ops import triton_gemm
from moefuse.ops.backend import use_backend
from moefuse.ops.gating import SWIGLU, Gating
from moefuse.ops.grouped_gemm import moe_fused_linear_reference
from moefuse.ops.moe import fused_experts_reference
from moefuse.settings import override_settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error ||x - ref|| / ||ref|| allowed per dtype (references in fp64 on the same inputs).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CPU_DTYPES = [torch.float32, torch.float16]

M_SIZES = [
    [3, 0, 5, 1],  # an expert with no rows, one with a single row
    [1],  # E = 1, one row
    [17, 33, 2],  # counts not a multiple of any block size
    [0, 0, 0],  # no rows at all
]
# E = 128 costs the interpreter a second or more per launch (one program per expert at least): fp32 only.
CASES = [(m, dtype) for m in M_SIZES for dtype in CPU_DTYPES] + [
    pytest.param([2] * 128, torch.float32, id="E128-fp32")
]


def rel_err(value: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 24) -> float:
    """``|value - ref| / |ref|`` in fp64, a chunk at a time: whole fp64 copies of a Qwen3-30B-A3B expert stack's
    gradient (3 GiB each) ran GPU test workers sharing one card out of memory."""
    value, ref = value.reshape(-1), ref.reshape(-1)
    err = scale = 0.0
    for start in range(0, value.numel(), chunk):
        v, r = value[start : start + chunk].double(), ref[start : start + chunk].double()
        assert torch.isfinite(v).all()
        err += (v - r).square().sum().item()
        scale += r.square().sum().item()
    return err**0.5 / (scale**0.5 if scale > 0 else 1.0)


def assert_close(value: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    assert value.shape == ref.shape, (name, value.shape, ref.shape)
    err = rel_err(value, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


def group_ids(m_sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(m_sizes)), torch.tensor(m_sizes, dtype=torch.long))


def _m(m_sizes: list[int]) -> torch.Tensor:
    return torch.tensor(m_sizes, dtype=torch.int64, device=DEVICE)


# GPT-OSS's gating (alpha 1.702, up + 1, interleaved rows) with a limit the test values cross, so the clamps and
# their zero gradients are exercised.
CLAMPED = Gating("silu", alpha=1.702, limit=1.0, up_shift=1.0, interleaved=True)
GATINGS = [
    pytest.param(SWIGLU, id="swiglu"),
    pytest.param(Gating("gelu_tanh"), id="geglu"),
    pytest.param(CLAMPED, id="clamped-interleaved"),
]


def stacked(gate_up: torch.Tensor, gating: Gating) -> torch.Tensor:
    """``[..., 2I]`` columns laid out as the weight's rows, as the kernels store them: gate columns, then up."""
    return torch.cat(gating.split(gate_up), dim=-1)


def lora_term(ids: torch.Tensor, num_experts: int, n: int, dtype: torch.dtype, masked: bool = False):
    """A rank-5 LoRA term for grouped rows of experts ``ids`` (``b`` a transposed view, as the kernels get
    ``Aᵀ`` in backward) and its float64 value."""
    t = randn(ids.numel(), 5, dtype=dtype, scale=0.3)
    b = randn(num_experts, 5, n, dtype=dtype, scale=0.3).transpose(1, 2)
    mask = (torch.rand(ids.numel(), n, device=DEVICE) > 0.3).to(dtype) * 1.5 if masked else None
    value = torch.einsum("rk,rnk->rn", t.double(), b.double()[ids.to(b.device)])
    return triton_gemm.LoraTerm(t, b, mask), value if mask is None else value * mask.double()


@pytest.mark.parametrize("m_sizes,dtype", CASES)
def test_grouped_gemm_plain_and_transposed_weight(m_sizes, dtype):
    rows, experts = sum(m_sizes), len(m_sizes)
    a = randn(rows, 24, dtype=dtype)
    w = randn(experts, 40, 24, dtype=dtype, scale=0.2)
    ids = group_ids(m_sizes).to(DEVICE)
    ref = torch.einsum("rk,rnk->rn", a.double(), w.double()[ids])
    assert_close(triton_gemm.grouped_gemm(a, w, _m(m_sizes)), ref, dtype, "forward")
    # A transposed view of a [E, K, N] buffer: the input-gradient orientation, read through strides.
    wt = randn(experts, 24, 40, dtype=dtype, scale=0.2).transpose(1, 2)
    ref_t = torch.einsum("rk,rnk->rn", a.double(), wt.double()[ids])
    assert_close(triton_gemm.grouped_gemm(a, wt, _m(m_sizes)), ref_t, dtype, "transposed")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lora_kind", [None, "plain", "masked"])
def test_grouped_gemm_gather_scale_and_scatter(dtype, lora_kind):
    m_sizes, tokens, top_k = [5, 0, 9, 1, 7], 11, 2
    ids = group_ids(m_sizes).to(DEVICE)
    token_index = torch.randint(0, tokens, (sum(m_sizes),), device=DEVICE)
    x = randn(tokens, 3 * 20, dtype=dtype)[:, ::3]  # non-contiguous rows
    w = randn(len(m_sizes), 36, 20, dtype=dtype, scale=0.3)
    scale = torch.rand(sum(m_sizes), device=DEVICE)
    rows = torch.einsum("rk,rnk->rn", x.double()[token_index], w.double()[ids])
    lora = None
    if lora_kind is not None:
        lora, lora_value = lora_term(ids, len(m_sizes), 36, dtype, masked=lora_kind == "masked")
        rows = rows + lora_value
    rows = rows * scale.double()[:, None]
    slots = torch.randperm(tokens * top_k, device=DEVICE)[: sum(m_sizes)]
    out = torch.full((tokens * top_k, 36), float("nan"), device=DEVICE, dtype=dtype)
    triton_gemm.grouped_gemm(
        x, w, _m(m_sizes), a_index=token_index, out=out, out_index=slots, row_scale=scale, lora=lora
    )
    out, ref = out[slots], rows  # only the scattered rows were written
    assert_close(out, ref, dtype, "scattered")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m_sizes", M_SIZES)
@pytest.mark.parametrize(
    "with_lora,scaled,biased", [(False, False, False), (True, False, True), (False, True, False)]
)
@pytest.mark.parametrize("gating", GATINGS)
def test_gate_up_glu(m_sizes, dtype, with_lora, scaled, biased, gating):
    tokens, inter, hidden = 7, 24, 40
    ids = group_ids(m_sizes).to(DEVICE)
    token_index = torch.randint(0, tokens, (sum(m_sizes),), device=DEVICE)
    x = randn(tokens, hidden, dtype=dtype)
    w = randn(len(m_sizes), 2 * inter, hidden, dtype=dtype, scale=0.2)
    lora = None
    gate_up_ref = torch.einsum("rk,rnk->rn", x.double()[token_index], w.double()[ids])
    if with_lora:
        lora, lora_value = lora_term(ids, len(m_sizes), 2 * inter, dtype)
        gate_up_ref = gate_up_ref + lora_value
    where = dict(lora=lora, gating=gating)
    if biased:  # laid out as the weight's rows
        where["bias"] = randn(len(m_sizes), 2 * inter, dtype=dtype, scale=0.5)
        gate_up_ref = gate_up_ref + where["bias"].double()[ids]
    h_ref = gating(gate_up_ref)
    gate_up_ref = stacked(gate_up_ref, gating)
    if scaled:  # h times each row's routing weight
        where["row_scale"] = torch.rand(ids.numel(), device=DEVICE)
        h_ref = h_ref * where["row_scale"].double()[:, None]
    h, gate_up = triton_gemm.gate_up_glu(x, w, _m(m_sizes), token_index, store_gate_up=True, **where)
    assert_close(gate_up, gate_up_ref, dtype, "gate_up")
    assert_close(h, h_ref, dtype, "h")
    h_only, none = triton_gemm.gate_up_glu(x, w, _m(m_sizes), token_index, store_gate_up=False, **where)
    assert none is None and torch.equal(h_only, h)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(  # 264 columns: a second column block (the row kernel's BLOCK_C is 256)
    ("m_sizes", "inter"),
    [*((m, 40) for m in M_SIZES), pytest.param([17, 33, 2], 264, id="two-column-blocks")],
)
@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("gating", GATINGS)
def test_glu_backward(m_sizes, inter, dtype, with_lora, gating):
    tokens, hidden = 6, 24
    ids = group_ids(m_sizes).to(DEVICE)
    token_index = torch.randint(0, tokens, (sum(m_sizes),), device=DEVICE)
    gate_up = randn(sum(m_sizes), 2 * inter, dtype=dtype)
    down = randn(len(m_sizes), hidden, inter, dtype=dtype, scale=0.2)
    scale = torch.rand(sum(m_sizes), device=DEVICE)
    grad_out = randn(tokens, hidden, dtype=dtype)

    g64 = gate_up.double().requires_grad_()  # gate columns, then up columns, as the forward stores them
    s64 = scale.double().requires_grad_()
    h = dataclasses.replace(gating, interleaved=False)(g64)
    y = torch.einsum("rn,rkn->rk", h, down.double()[ids]) * s64[:, None]
    loss = (y * grad_out.double()[token_index]).sum()
    lora = None
    if with_lora:  # the gradient reaching h through a LoRA on the down projection, masked as under dropout
        lora, lora_value = lora_term(ids, len(m_sizes), inter, dtype, masked=True)
        loss = loss + (h * lora_value * s64[:, None]).sum()
    loss.backward()

    d_gate_up, d_scale = triton_gemm.glu_backward(
        grad_out, down, gate_up, scale, _m(m_sizes), token_index, lora=lora, gating=gating
    )
    d_gate, d_up = g64.grad.chunk(2, dim=-1)  # laid out as the weight's rows
    expected = torch.stack((d_gate, d_up), -1).flatten(-2) if gating.interleaved else g64.grad
    assert_close(d_gate_up, expected, dtype, "d_gate_up")
    # d_scale sums each row's products g * h, which cancel: its error is measured against their sizes' sum
    g = torch.einsum("rk,rkn->rn", grad_out.double()[token_index], down.double()[ids])
    if with_lora:
        g = g + lora_value
    size = (g * h).abs().sum(1).detach()
    err = ((d_scale.double() - s64.grad).abs() / size.clamp_min(1e-30)).max().item() if size.numel() else 0.0
    assert err <= TOLERANCE[dtype], (
        f"d_scale: error {err:.2e} of the products' sizes > {TOLERANCE[dtype]:.0e}"
    )
    # The same sums stored at given positions in another dtype (the routing weights' order and dtype).
    positions = torch.randperm(sum(m_sizes), device=DEVICE)
    placed = torch.full((sum(m_sizes),), float("nan"), device=DEVICE, dtype=dtype)
    _, out = triton_gemm.glu_backward(
        grad_out,
        down,
        gate_up,
        scale,
        _m(m_sizes),
        token_index,
        lora=lora,
        gating=gating,
        d_scale_out=placed,
        d_scale_index=positions,
    )
    assert out is placed and torch.equal(placed[positions], d_scale.to(dtype))
    with pytest.raises(ValueError, match="d_scale_out must be 1-D and contiguous"):
        triton_gemm.glu_backward_rows(d_gate_up[:, :inter], gate_up, scale, d_scale_out=placed)
    with pytest.raises(ValueError, match="d_scale_out must be 1-D and contiguous"):
        triton_gemm.glu_backward_rows(d_gate_up[:, :inter], gate_up, scale, d_scale_index=positions)


@pytest.mark.parametrize("m_sizes,dtype", CASES)
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_weight_grad(m_sizes, dtype, gather):
    rows, n, k, tokens = sum(m_sizes), 36, 20, 9
    ids = group_ids(m_sizes).to(DEVICE)
    a = randn(rows, n, dtype=dtype)
    b = randn(tokens if gather else rows, k, dtype=dtype)
    b_index = torch.randint(0, tokens, (rows,), device=DEVICE) if gather else None
    scale = torch.rand(rows, device=DEVICE) if gather else None
    b_rows = b.double()[b_index] if gather else b.double()
    a_rows = a.double() * (scale.double()[:, None] if gather else 1.0)
    ref = torch.zeros(len(m_sizes), n, k, dtype=torch.float64, device=DEVICE)
    ref.index_add_(0, ids, torch.einsum("rn,rk->rnk", a_rows, b_rows))
    out = torch.full((len(m_sizes), n, k), float("nan"), device=DEVICE, dtype=dtype)
    triton_gemm.grouped_weight_grad(a, b, _m(m_sizes), b_index=b_index, row_scale=scale, out=out)
    assert_close(out, ref, dtype, "dW")


@pytest.mark.parametrize("m_sizes,dtype", CASES)
def test_moe_fused_linear_on_triton(m_sizes, dtype):
    m = _m(m_sizes)
    x = randn(sum(m_sizes), 2 * 24, dtype=dtype)[:, ::2].requires_grad_()  # non-contiguous
    w = randn(len(m_sizes), 16, 24, dtype=dtype, scale=0.2).requires_grad_()
    with use_backend("triton"):
        y = moefuse.moe_fused_linear(x, w, m)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = moe_fused_linear_reference(xr, wr, m.cpu())
    assert_close(y, yr, dtype, "forward")
    dy = randn(*y.shape, dtype=dtype)
    y.backward(dy)
    yr.backward(dy.double())
    assert_close(x.grad, xr.grad, dtype, "grad input")
    assert_close(w.grad, wr.grad, dtype, "grad weight")


def experts_problem(tokens, hidden, inter, experts, top_k, unused=0, *, dtype, scale=1.0):
    x = randn(tokens, hidden, dtype=dtype)
    gate_up = randn(experts, 2 * inter, hidden, dtype=dtype, scale=scale * hidden**-0.5)
    down = randn(experts, hidden, inter, dtype=dtype, scale=scale * inter**-0.5)
    logits = torch.randn(tokens, experts - unused, device=DEVICE)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return [t.requires_grad_() for t in (x, gate_up, down)] + [index, weights.to(dtype).requires_grad_()]


EXPERT_CASES = [
    # tokens, hidden, inter, experts, top_k, experts without tokens
    (9, 32, 16, 8, 2, 3),
    (1, 32, 16, 4, 1, 0),  # one token, top-1
    (5, 16, 16, 1, 1, 0),  # E = 1
    (13, 24, 40, 6, 3, 1),  # sizes not a multiple of the block
    (7, 16, 72, 4, 2, 1),  # two column tiles of the interpreter's block (64), the second partial
]
E128_TOP8 = (24, 32, 16, 128, 8, 0)


def check_experts(args, dtype, names=("x", "gate_up_proj", "down_proj", "index", "weights"), **keywords):
    """The Triton path's output and every gradient (of ``args`` and of the tensors among ``keywords``: biases)
    against the fp64 reference."""
    tensors = {k: v for k, v in keywords.items() if isinstance(v, torch.Tensor)}
    ref_args = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    ref_tensors = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    with use_backend("triton"):
        out = moefuse.fused_experts(*args, **keywords)
    ref = fused_experts_reference(*ref_args, **{**keywords, **ref_tensors})
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    grad = randn(*out.shape, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.double())
    pairs = [*zip(args, ref_args, names, strict=True), *((tensors[k], ref_tensors[k], k) for k in tensors)]
    for a, r, name in pairs:
        if a.is_floating_point():
            assert_close(a.grad, r.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_fused_experts_on_triton(case, dtype):
    check_experts(experts_problem(*case, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_fused_gelu_tanh_experts_on_triton(case, dtype, monkeypatch):
    """GeGLU experts (GELU's tanh form on the gate, as Gemma 4's) run fused, with the forward and every gradient
    of the reference."""
    from moefuse.ops import moe_triton

    fused = []
    original = moe_triton.triton_fused_experts
    monkeypatch.setattr(moe_triton, "triton_fused_experts", lambda *a: fused.append(a[6]) or original(*a))
    check_experts(experts_problem(*case, dtype=dtype), dtype, act_fn=torch.nn.GELU(approximate="tanh"))
    assert [plan.gating for plan in fused] == [Gating("gelu_tanh")]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_fused_clamped_biased_experts_on_triton(case, dtype, monkeypatch):
    """GPT-OSS's experts (clamped SwiGLU with alpha and up + 1, interleaved gate/up rows, biases on both
    projections) run fused, with the forward and every gradient (biases' and routing weights' included) of the
    reference."""
    from moefuse.ops import moe_triton

    fused = []
    original = moe_triton.triton_fused_experts
    monkeypatch.setattr(moe_triton, "triton_fused_experts", lambda *a: fused.append(a[6]) or original(*a))
    args = experts_problem(*case, dtype=dtype, scale=3.0)  # pre-activations past the limit: the clamps cut
    # A pre-activation within a rounding of the limit passes or stops its gradient as it rounds: the clamps are
    # checked end to end in fp32, and in fp16 on given pre-activations (test_glu_backward).
    gating = CLAMPED if dtype == torch.float32 else dataclasses.replace(CLAMPED, limit=1e3)
    num_experts, two_i, hidden = args[1].shape
    biases = dict(
        gate_up_bias=randn(num_experts, two_i, dtype=dtype, scale=0.5).requires_grad_(),
        down_bias=randn(num_experts, hidden, dtype=dtype, scale=0.5).requires_grad_(),
    )
    check_experts(args, dtype, gate_fn=gating, **biases)
    assert [plan.gating for plan in fused] == [gating]


def test_fused_experts_on_triton_128_experts_top8():
    check_experts(experts_problem(*E128_TOP8, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("case", [EXPERT_CASES[0], EXPERT_CASES[2], E128_TOP8])
def test_fused_experts_base_weight_grads_on_grouped_mm(case, monkeypatch):
    """The base weights' gradients through torch's grouped_mm (what Hopper takes), on operands copied into
    grouped order; forced here on every device, counting that the path ran."""
    from moefuse.ops import moe_triton, plan

    calls = []

    def counted(*args):
        calls.append(1)
        return grouped_mm_weight_grad(*args)

    grouped_mm_weight_grad = moe_triton.grouped_mm_weight_grad
    monkeypatch.setattr(plan, "grouped_mm_competes", lambda t, dtype: True)
    monkeypatch.setattr(moe_triton, "grouped_mm_weight_grad", counted)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # grouped_mm takes bf16 only on a GPU
    with override_settings(grouped_mm_weight_grad_rows=0, grouped_mm_combine_rows=1 << 30):
        check_experts(experts_problem(*case, dtype=dtype), dtype)
    assert len(calls) == 2  # gate/up and down


@pytest.mark.parametrize("case", [EXPERT_CASES[0], EXPERT_CASES[2], E128_TOP8])
def test_fused_experts_combines_on_grouped_mm(case, monkeypatch):
    """The down projection and the gate/up input gradient on torch's grouped_mm in grouped order, each token's
    rows then summed by routing.token_sums (what Hopper takes at long per-expert batches); forced here, counting
    the sums."""
    from moefuse.ops import plan
    from moefuse.ops.routing import ExpertRouting

    sums = []
    token_sums = ExpertRouting.token_sums

    def counted(self, y):
        sums.append(1)
        return token_sums(self, y)

    monkeypatch.setattr(plan, "grouped_mm_competes", lambda t, dtype: True)
    monkeypatch.setattr(ExpertRouting, "token_sums", counted)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    problem = experts_problem(*case, dtype=dtype)
    with override_settings(grouped_mm_combine_rows=0, grouped_mm_weight_grad_rows=1 << 30):
        check_experts(problem, dtype)
    assert len(sums) == 2  # forward (down) and backward (gate/up input gradient)


def test_fused_experts_triton_non_contiguous_and_repeats_bit_for_bit():
    x, gu, d, idx, w = experts_problem(11, 32, 16, 8, 2, dtype=torch.float32)
    xt = randn(32, 11, dtype=torch.float32).t().requires_grad_()
    gut = gu.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # transposed storage
    check_experts([xt, gut, d, idx, w], torch.float32)
    with use_backend("triton"):  # no atomics: the same inputs give the same bits
        first = moefuse.fused_experts(xt, gut, d, idx, w)
        again = moefuse.fused_experts(xt, gut, d, idx, w)
    assert torch.equal(first, again)


def test_fused_experts_no_grad_path_matches():
    args = experts_problem(9, 32, 16, 8, 2, dtype=torch.float32)
    with use_backend("triton"):
        with torch.no_grad():
            out = moefuse.fused_experts(*args)
        ref = moefuse.fused_experts(*args)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        moefuse.moe_fused_linear(torch.randn(2, 4), torch.randn(1, 3, 4), torch.tensor([2]))


# --- on a GPU: bf16 at larger shapes, Qwen3-30B-A3B's included --------------------------------------------


def card_sized(*case: int):
    """A case at a real model's expert dims: its fp64 reference takes 10-15 GiB. GPU runs share one card among
    several pytest-xdist workers; these cases go to one worker (``--dist loadgroup``), one after another."""
    return pytest.param(case, marks=pytest.mark.xdist_group("card-sized"))


QWEN3_30B_EXPERTS = card_sized(1000, 2048, 768, 128, 8, 0)  # Qwen3-30B-A3B's expert dims
GPU_EXPERT_CASES = EXPERT_CASES + [E128_TOP8, (512, 256, 128, 16, 4, 2), QWEN3_30B_EXPERTS]


@pytest.mark.gpu
@pytest.mark.parametrize("act_fn", [F.silu, torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("case", GPU_EXPERT_CASES)
def test_fused_experts_bf16_gpu(case, act_fn):
    check_experts(experts_problem(*case, dtype=torch.bfloat16), torch.bfloat16, act_fn=act_fn)


# GPT-OSS's gating as gpt-oss-20b configures it.
GPT_OSS = Gating("silu", alpha=1.702, limit=7.0, up_shift=1.0, interleaved=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    EXPERT_CASES
    + [
        E128_TOP8,
        (512, 256, 128, 16, 4, 2),
        (4096, 256, 128, 4, 2, 0),  # ~2k rows an expert: the biases' gradients sum many rows
        card_sized(512, 2880, 2880, 8, 4, 0),  # gpt-oss-20b's expert dims (8 of its 32 experts)
    ],
)
def test_fused_gpt_oss_experts_bf16_gpu(case):
    """GPT-OSS's experts (clamped SwiGLU, interleaved rows, biases) fused in bf16; every gradient, biases' included."""
    args = experts_problem(*case, dtype=torch.bfloat16)
    num_experts, two_i, hidden = args[1].shape
    biases = dict(
        gate_up_bias=randn(num_experts, two_i, dtype=torch.bfloat16, scale=0.5).requires_grad_(),
        down_bias=randn(num_experts, hidden, dtype=torch.bfloat16, scale=0.5).requires_grad_(),
    )
    check_experts(args, torch.bfloat16, gate_fn=GPT_OSS, **biases)


@pytest.mark.gpu
@pytest.mark.parametrize("m_sizes", M_SIZES + [[2] * 128, [300, 0, 1, 129, 64, 7]])
@pytest.mark.parametrize("dims", [(24, 40), (2048, 1536), (768, 2048), (2048, 16), (16, 768)])
def test_moe_fused_linear_bf16_gpu(m_sizes, dims):
    k, n = dims
    m = _m(m_sizes)
    x = randn(sum(m_sizes), k, dtype=torch.bfloat16).requires_grad_()
    w = randn(len(m_sizes), n, k, dtype=torch.bfloat16, scale=k**-0.5).requires_grad_()
    with use_backend("triton"):
        y = moefuse.moe_fused_linear(x, w, m)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = moe_fused_linear_reference(xr, wr, m.cpu())
    assert_close(y, yr, torch.bfloat16, "forward")
    dy = randn(*y.shape, dtype=torch.bfloat16)
    y.backward(dy)
    yr.backward(dy.double())
    assert_close(x.grad, xr.grad, torch.bfloat16, "grad input")
    assert_close(w.grad, wr.grad, torch.bfloat16, "grad weight")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(64, 256, 128, 16, 4, 2), QWEN3_30B_EXPERTS])
@pytest.mark.parametrize(
    "projections,structure",
    [
        (("gate", "up", "down"), "swiglu"),
        (("down",), "swiglu"),
        (("gate_up", "down"), "swiglu"),
        (("gate_up", "down"), "gpt_oss"),
    ],
)
def test_fused_lora_bf16_gpu(case, projections, structure):
    """One LoRA adapter on the fused Triton path (factors in fp32 as PEFT keeps them), base frozen; gate and up
    apart or together; on SwiGLU experts or on GPT-OSS's (clamped SwiGLU, interleaved rows, frozen biases)."""
    from moefuse.ops import ExpertsLora, LoraWeights

    x, gate_up, down, index, weights = experts_problem(*case, dtype=torch.bfloat16)
    gate_up.requires_grad_(False)
    down.requires_grad_(False)
    inter, hidden, experts = down.shape[2], down.shape[1], down.shape[0]
    shapes = {
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
        "gate_up": (2 * inter, hidden),
    }
    lora = ExpertsLora(
        **{
            name: LoraWeights(
                randn(experts, 16, shapes[name][1], dtype=torch.float32, scale=shapes[name][1] ** -0.5),
                randn(experts, shapes[name][0], 16, dtype=torch.float32, scale=0.25),
                scaling=2.0,
            )
            for name in projections
        }
    )
    for name in projections:
        getattr(lora, name).lora_A.requires_grad_()
        getattr(lora, name).lora_B.requires_grad_()
    ref_lora = ExpertsLora(
        **{
            name: LoraWeights(
                f.lora_A.detach().double().requires_grad_(),
                f.lora_B.detach().double().requires_grad_(),
                f.scaling,
            )
            for name in projections
            for f in [getattr(lora, name)]
        }
    )
    ref_args = [
        a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a
        for a in (x, gate_up, down, index, weights)
    ]
    structured = {}
    if structure == "gpt_oss":
        structured = dict(
            gate_fn=GPT_OSS,
            gate_up_bias=randn(experts, 2 * inter, dtype=torch.bfloat16, scale=0.5),
            down_bias=randn(experts, hidden, dtype=torch.bfloat16, scale=0.5),
        )
    with use_backend("triton"):
        out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=[lora], **structured)
    ref_structured = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in structured.items()}
    ref = fused_experts_reference(*ref_args, lora=[ref_lora], **ref_structured)
    assert_close(out, ref, torch.bfloat16, "output")
    grad = randn(*out.shape, dtype=torch.bfloat16)
    out.backward(grad)
    ref.backward(grad.double())
    assert_close(x.grad, ref_args[0].grad, torch.bfloat16, "grad x")
    assert_close(weights.grad, ref_args[4].grad, torch.bfloat16, "grad weights")
    for name in projections:
        got, want = getattr(lora, name), getattr(ref_lora, name)
        assert_close(got.lora_A.grad, want.lora_A.grad, torch.bfloat16, f"{name} lora_A")
        assert_close(got.lora_B.grad, want.lora_B.grad, torch.bfloat16, f"{name} lora_B")


class _FakeCudaTensor:
    """What the config pruning reads of a kernel's operand: is it on a GPU, which one, its element size."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def element_size(self) -> int:
        return 2  # bf16


@pytest.mark.parametrize("limit,gpu", [(232448, "H100"), (166912, "A100"), (101376, "RTX 4090 / L40 (sm89)")])
@pytest.mark.parametrize("autotune", [True, False])
def test_configs_fit_the_gpus_shared_memory(monkeypatch, limit, gpu, autotune):
    from moefuse.kernels import grouped_gemm as kernels

    # The count reproduces the one config an H100 refused during tuning (gate/up loads two weight tiles).
    assert kernels.shared_memory(kernels._config(128, 256, 64, 8, 3), 2, 2, False) == 245760
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda index: limit)
    cases = [  # (operand, weight tiles, weight grad, configs, N, K): Qwen3-30B-A3B's GEMMs
        ("b_ptr", 1, False, kernels.TILE_CONFIGS, 2048, 768),
        ("w_ptr", 2, False, kernels.TILE_CONFIGS, 768, 2048),
        ("w_ptr", 1, False, kernels.TILE_CONFIGS, 768, 2048),
        ("a_ptr", 1, True, kernels.WEIGHT_GRAD_CONFIGS, 1536, 2048),
    ]
    for operand, tiles, weight_grad, configs, n, k in cases:
        prune = kernels._prune("N", "K", operand, weight_tiles=tiles, weight_grad=weight_grad)[
            "early_config_prune"
        ]
        for rows_per_expert in (16, 256, 1024):
            args = {"N": n, "K": k, "ROWS_PER_EXPERT": rows_per_expert, operand: _FakeCudaTensor()}
            with override_settings(autotune=autotune):
                kept = prune(configs, args)
            assert kept, (gpu, operand)
            assert all(kernels.shared_memory(c, 2, tiles, weight_grad) <= limit for c in kept), (gpu, operand)
            if not autotune or rows_per_expert < 64:
                assert len(kept) == 1


def test_thin_problems_get_tiles_shrunk_to_them(monkeypatch):
    """A LoRA expand (``[rows, r] @ [r, N]``, K = rank) keeps full-width row and column tiles with ``BLOCK_K`` cut to
    the rank; a LoRA reduce (N = rank) gets ``BLOCK_N`` cut to it. (Dropping the wide configs instead once left
    every rank-16 expand on 64 x 16 tiles.)"""
    from moefuse.kernels import grouped_gemm as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda index: 232448)
    prune = kernels._prune("N", "K", "b_ptr")["early_config_prune"]
    for n, k in ((2048, 16), (1536, 32), (16, 2048), (32, 768)):
        args = {"N": n, "K": k, "ROWS_PER_EXPERT": 256, "b_ptr": _FakeCudaTensor()}
        with override_settings(autotune=True):
            kept = prune(kernels.TILE_CONFIGS, args)
        sizes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]
        assert all(bn <= max(16, n) and bk <= max(16, k) for _, bn, bk in sizes), sizes
        assert len(set(map(str, kept))) == len(kept), "duplicate configs after shrinking"
        if k < 64:  # an expand: the first (untuned) config keeps its 128 x 128 output tile
            assert sizes[0] == (128, 128, k), sizes
        if n < 64:
            assert sizes[0] == (128, n, 64), sizes
