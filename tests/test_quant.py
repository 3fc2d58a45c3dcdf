"""4-bit expert stacks: bitsandbytes' blockwise format per expert, bit for bit, and the tensor that holds them.

bitsandbytes rounds a little differently on the CPU and in its CUDA kernels; each device's result is compared
with bitsandbytes' own function on that device (the CPU cases run everywhere, the CUDA ones on a GPU).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moefuse.quant import ExpertWeights4bit, formats

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (E, out, in): blocks that fit rows exactly, a short last block and an odd count of values, several nested
# blocks of 256 with a short one (300 x 257 / 64 = 1205 blocks).
SHAPES = [(3, 48, 64), (2, 7, 9), (2, 300, 257)]


def _stack(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    weight = torch.randn(*shape, dtype=torch.float32) * 0.05
    weight[0, 0, :5] = 0.0  # exact zeros and a tiny value: the cases where FP4's two zero codes differ
    weight[0, 0, 5] = 1e-5
    return weight.to(device, dtype)


def _assert_each_expert_equals_bitsandbytes(weight: torch.Tensor, quant_type: str) -> None:
    plain = ExpertWeights4bit.quantize(weight, quant_type, 64, compress_statistics=False)
    nested = ExpertWeights4bit.quantize(weight, quant_type, 64, compress_statistics=True)
    dense = nested.dequantize()
    for e in range(weight.shape[0]):
        packed, state = bnb_functional.quantize_4bit(weight[e], blocksize=64, quant_type=quant_type)
        packed_n, state_n = bnb_functional.quantize_4bit(
            weight[e], blocksize=64, quant_type=quant_type, compress_statistics=True
        )
        assert torch.equal(plain.packed[e], packed.flatten()) and torch.equal(
            nested.packed[e], packed.flatten()
        )
        assert torch.equal(plain.absmax[e], state.absmax)
        assert torch.equal(nested.absmax[e], state_n.absmax)  # uint8 nested codes
        assert torch.equal(nested.nested_absmax[e], state_n.state2.absmax)
        assert torch.equal(nested.offset[e], state_n.offset)
        assert torch.equal(nested.code, state_n.code) and torch.equal(nested.nested_code, state_n.state2.code)
        assert torch.equal(dense[e], bnb_functional.dequantize_4bit(packed_n, state_n))
        if not _bnb_avx512_fp16(weight):
            assert torch.equal(plain.dequantize()[e], bnb_functional.dequantize_4bit(packed, state))


def _bnb_avx512_fp16(weight: torch.Tensor) -> bool:
    """Whether bitsandbytes dequantizes ``weight`` with its AVX512 CPU kernel in fp16: seen on an AVX512 Xeon to
    differ in some values from its other CPU path, which moefuse's CPU dequantization equals bit for bit (CPUs
    without AVX512; on CUDA, bitsandbytes' kernel and moefuse's agree too)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float16:
        return False
    cpu_ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
    return bool(getattr(cpu_ops, "_has_avx512", False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_expert_equals_bitsandbytes_quantize_4bit(device, shape, quant_type, dtype):
    _assert_each_expert_equals_bitsandbytes(_stack(shape, dtype, device), quant_type)


# FP4's decision thresholds: the midpoints of its code values (÷ 12) 0, 0.0625, 2, 3, 4, 6, 8, 12.
FP4_MIDPOINTS = (1 / 384, 11 / 128, 5 / 24, 7 / 24, 5 / 12, 7 / 12, 5 / 6)


def _threshold_ties(dtype: torch.dtype) -> torch.Tensor:
    """``[1, M, 64]``: one block per mantissa a 16-bit absmax can have (bf16: 128, fp16: 1024; fp32 gets the
    fp16 values): the absmax ``a``, then for each FP4 threshold ``t`` the ``dtype`` value nearest ``a * t`` and
    its two neighbours, both signs; zeros after. Most of these ratios are exactly on a threshold or an fp32 ulp
    from it, where the last bit of the kernel's reciprocal ``1 / a`` picks the code."""
    bits = 7 if dtype == torch.bfloat16 else 10
    absmax = (1 + torch.arange(2**bits, dtype=torch.float64) / 2**bits) * 2**-3
    storage = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    near = (absmax[:, None] * torch.tensor(FP4_MIDPOINTS, dtype=torch.float64)).to(storage)
    ties = torch.cat(
        [torch.nextafter(near, torch.zeros_like(near)), near, torch.nextafter(near, torch.ones_like(near))], 1
    )
    rows = torch.cat([absmax.to(storage)[:, None], ties, -ties], 1)
    return torch.nn.functional.pad(rows, (0, 64 - rows.shape[1]))[None].to(dtype)


def _subnormal_cases() -> torch.Tensor:
    """``[1, 193]`` bf16, blocks of 64: (1, -2**-130 (subnormal), zeros); (1024, -2**-120 (its ratio is
    subnormal), zeros); (2**-130, -2**-131: only subnormals, zeros); a last block of one zero (odd count)."""
    row = torch.zeros(193)
    row[[0, 1, 64, 65, 128, 129]] = torch.tensor(
        [1.0, -(2.0**-130), 1024.0, -(2.0**-120), 2.0**-130, -(2.0**-131)]
    )
    return row[None].to(torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threshold_ties_and_subnormals_equal_bitsandbytes(device, dtype, quant_type):
    """Values whose ratio to their block's absmax sits on an FP4 threshold, for every 16-bit absmax mantissa,
    and subnormal values and ratios: bitsandbytes' CUDA kernel decides these through its approximate reciprocal
    and flush-to-zero arithmetic, its CPU backend by dividing and clamping."""
    _assert_each_expert_equals_bitsandbytes(_threshold_ties(dtype).to(device), quant_type)
    _assert_each_expert_equals_bitsandbytes(
        _subnormal_cases().reshape(1, 1, 193).to(device, dtype), quant_type
    )


def _nibbles(packed: torch.Tensor) -> list[int]:
    return torch.stack([packed >> 4, packed & 0xF], -1).flatten().tolist()


@pytest.mark.parametrize(
    "quant_type, zero, one", [("fp4", 0b0000, 0b0011), ("nf4", 0b0111, 0b1111)], ids=["fp4", "nf4"]
)
def test_cuda_rounding_flushes_subnormals_as_the_kernel(quant_type, zero, one):
    """bitsandbytes' CUDA kernels are built with --use_fast_math, so fp32 subnormals count as zero: in the
    absmax (FMNMX.FTZ), as the value read and as the ratio (FMUL.FTZ). Derived from the kernel, code by code:
    block 0: 1 → x = 1 → FP4 0b0011 / NF4 0b1111; -2**-130 is read as -0: FP4's sign test ``x < 0`` is false
    (code 0b0000, not the negative zero 0b1000), NF4's zero 0b0111. Block 1: -2**-120 * 2**-10 = -2**-130 is
    flushed, the same codes. Block 2 holds only subnormals: absmax 0, ``1.0f / 0`` = inf, every ratio 0 * inf =
    NaN, for which every comparison of both decision trees is false: code 0b0000. Block 3: its zero and the
    zero padding the odd count are NaN likewise (0b0000, where NF4 codes a plain zero 0b0111)."""
    packed, absmax = formats.quantize_rows_4bit(_subnormal_cases(), quant_type, 64, rounding="cuda")
    assert absmax.tolist() == [[1.0, 1024.0, 0.0, 0.0]]
    expected = [one, zero] + [zero] * 62 + [one, zero] + [zero] * 62 + [0] * 64 + [0, 0]
    assert _nibbles(packed) == expected


def test_cuda_rounding_of_a_threshold_tie_follows_the_kernels_reciprocal(monkeypatch):
    """The kernel computes ``x = v * (1.0f / a)`` in fp32 and compares ``|x| > t`` with fp32 constants; for bf16
    v = 0.01953125 = 5 * 2**-8 in a block with a = 0.09375 = 3 * 2**-5, v / a = 5/24 exactly, the threshold
    between 2/12 and 3/12, whose constant 0.20833333f is 0x3E555555 (5/24 rounded). The correctly rounded
    reciprocal 0x412AAAAB gives x = 0x3E555556 > t: code 0b0111 (3/12), 0b1111 for -v. The GPU's approximate
    reciprocal may be an ulp lower, 0x412AAAAA: x = 0x3E555554 < t, code 0b0110 (0b1110). Dividing would give
    x = t exactly, not above: 0b0110. So the reciprocal's last bit decides, and ``rounding="cuda"`` must take
    the kernel's reciprocal (on the GPU its instruction) and multiply."""
    row = torch.zeros(1, 64, dtype=torch.bfloat16)
    row[0, :3] = torch.tensor([0.09375, 0.01953125, -0.01953125])
    packed, _ = formats.quantize_rows_4bit(row, "fp4", 64, rounding="cuda")
    assert _nibbles(packed)[:3] == [0b0011, 0b0111, 0b1111]
    correctly_rounded = formats._kernel_reciprocal
    monkeypatch.setattr(
        formats,
        "_kernel_reciprocal",
        lambda absmax: torch.nextafter(correctly_rounded(absmax), torch.zeros_like(absmax)),
    )
    packed, _ = formats.quantize_rows_4bit(row, "fp4", 64, rounding="cuda")
    assert _nibbles(packed)[:3] == [0b0011, 0b0110, 0b1110]


def test_dynamic_code_is_bitsandbytes():
    assert torch.equal(formats.dynamic_code(), bnb_functional.create_dynamic_map())


def test_cuda_rounding_of_nested_absmax_is_nearest_code():
    """The CUDA kernel's binary search, as emulated, is the nearest code value (ties aside), including ±1 ends."""
    code = formats.dynamic_code()
    values = torch.cat([torch.rand(20000) * 2 - 1, torch.randn(5000) * 1e-3, torch.tensor([-1.0, 1.0, 0.0])])
    search = formats._quantize_8bit_dynamic(values, cuda=True).long()
    nearest = torch.bucketize(values, (code[:-1] + code[1:]) / 2)
    assert torch.equal(search, nearest)
    midpoints = (code[:-1] + code[1:]) / 2  # at an exact midpoint either neighbour is nearest
    tie = formats._quantize_8bit_dynamic(midpoints, cuda=True).long()
    assert bool(((tie == torch.arange(255)) | (tie == torch.arange(1, 256))).all())


@pytest.mark.parametrize("rounding", ["cuda", "cpu"])
def test_roundings_decode_alike(rounding):
    """Both roundings give codes whose values are within one code step; NF4 without nesting is identical."""
    weight = _stack((2, 32, 64), torch.float32, "cpu")
    other = {"cuda": "cpu", "cpu": "cuda"}[rounding]
    a = ExpertWeights4bit.quantize(weight, "nf4", 64, False, rounding=rounding)
    b = ExpertWeights4bit.quantize(weight, "nf4", 64, False, rounding=other)
    assert torch.equal(a.packed, b.packed)
    a = ExpertWeights4bit.quantize(weight, "fp4", 64, True, rounding=rounding)
    b = ExpertWeights4bit.quantize(weight, "fp4", 64, True, rounding=other)
    assert (a.dequantize() - b.dequantize()).abs().max() < 0.01
    with pytest.raises(ValueError, match="rounding"):
        ExpertWeights4bit.quantize(weight, rounding="gpu")


def test_from_quant_states_and_back():
    weight = _stack((3, 16, 64), torch.bfloat16, "cpu")
    outputs = [bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in weight]
    stacked = ExpertWeights4bit.from_quant_states([p for p, _ in outputs], [s for _, s in outputs])
    assert torch.equal(stacked.dequantize(), ExpertWeights4bit.quantize(weight).dequantize())
    for e, (packed, state) in enumerate(outputs):
        packed_e, state_e = stacked.quant_state(e)
        assert torch.equal(packed_e, packed)
        assert torch.equal(
            bnb_functional.dequantize_4bit(packed_e, state_e), bnb_functional.dequantize_4bit(packed, state)
        )


def test_tensor_in_a_module():
    weight = _stack((3, 10, 20), torch.bfloat16, "cpu")
    q = ExpertWeights4bit.quantize(weight, "fp4", 64)
    dense = q.dequantize()
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(q, requires_grad=False)
    assert isinstance(module.w, torch.nn.Parameter) and isinstance(module.w, ExpertWeights4bit)
    assert module.w.shape == (3, 10, 20) and module.w.dtype == torch.bfloat16 and not module.w.requires_grad
    module.to("cpu")  # no move: still a fresh tensor swapped in
    module.float()  # the compute dtype changes, the data stays 4-bit
    assert isinstance(module.w, ExpertWeights4bit) and module.w.dtype == torch.float32
    assert torch.equal(module.w.packed, q.packed)
    module.to(torch.bfloat16)
    t = module.w.transpose(1, 2)
    assert t.shape == (3, 20, 10) and t.transposed and torch.equal(t.dequantize(), dense.transpose(1, 2))
    assert torch.equal(t.transpose(1, 2).dequantize(), dense)
    assert torch.equal(module.w[1], dense[1])  # one expert, dequantized alone
    x = torch.randn(4, 20, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, module.w[0]), torch.nn.functional.linear(x, dense[0]))
    assert torch.equal(module.w * 2, dense * 2)  # any other op sees the dense tensor
    with pytest.raises(NotImplementedError, match="frozen"):
        module.w.mul_(2)


def test_copy_requantizes_and_components_round_trip():
    weight = _stack((2, 8, 64), torch.bfloat16, "cpu")
    q = ExpertWeights4bit.quantize(weight)
    components = q.components("experts.gate_up_proj")
    assert set(components) == {
        "experts.gate_up_proj",
        "experts.gate_up_proj.absmax",
        "experts.gate_up_proj.quant_map",
        "experts.gate_up_proj.nested_absmax",
        "experts.gate_up_proj.nested_quant_map",
        "experts.gate_up_proj.nested_offset",
        "experts.gate_up_proj.quant_state.moefuse__nf4",
    }
    assert all(ExpertWeights4bit.is_component(k, "experts.gate_up_proj") for k in components)
    assert not ExpertWeights4bit.is_component("experts.gate_up_proj_bias", "experts.gate_up_proj")
    again = ExpertWeights4bit.from_components(components, "experts.gate_up_proj")
    assert torch.equal(again.dequantize(), q.dequantize()) and again.dtype == torch.bfloat16
    target = ExpertWeights4bit.quantize(torch.zeros_like(weight))
    target.copy_(weight)  # a dense tensor is requantized in the target's format
    assert torch.equal(target.packed, q.packed) and torch.equal(target.dequantize(), q.dequantize())
    with pytest.raises(KeyError, match="no 4-bit expert weight"):
        ExpertWeights4bit.from_components({}, "x")


def test_quantize_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\[E, out, in\]"):
        ExpertWeights4bit.quantize(torch.randn(4, 4))
    with pytest.raises(ValueError, match="quant_type"):
        ExpertWeights4bit.quantize(torch.randn(1, 4, 4), "int4")
    with pytest.raises(ValueError, match="blocksize"):
        ExpertWeights4bit.quantize(torch.randn(1, 4, 4), blocksize=48)


@pytest.mark.gpu
def test_a_stack_on_the_cpu_goes_to_the_gpu_in_slices():
    """Quantizing a CPU stack onto the GPU never holds the bf16 stack there: peak well under its size."""
    weight = torch.randn(
        64, 1536, 2048, dtype=torch.bfloat16
    )  # one Qwen3-30B-A3B gate_up stack's half, 403 MB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    quantized = ExpertWeights4bit.quantize(weight, device="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert quantized.packed.is_cuda and peak < weight.numel() * weight.element_size() / 2, peak
    expected = ExpertWeights4bit.quantize(weight[:2].cuda())
    assert torch.equal(quantized.packed[:2], expected.packed) and torch.equal(
        quantized.absmax[:2], expected.absmax
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantizing_in_pieces_gives_the_whole_stacks_bytes(monkeypatch, quant_type):
    """Steps of a few experts, or of block-aligned pieces of one expert (odd last value included), change
    nothing: blocks are quantized independently."""
    from moefuse.quant import tensor

    weight = _stack((3, 37, 129), torch.float32, "cpu")  # 4773 values per expert: odd, short last block
    whole = ExpertWeights4bit.quantize(weight, quant_type, compress_statistics=True)
    for step in (2 * 4773, 1000, 64):  # two experts per step; pieces of 960 and of one block
        monkeypatch.setattr(tensor, "_DEFAULT_STEP_ELEMENTS", step)
        pieces = ExpertWeights4bit.quantize(weight, quant_type, compress_statistics=True)
        assert torch.equal(pieces.packed, whole.packed) and torch.equal(pieces.absmax, whole.absmax)
        assert torch.equal(pieces.nested_absmax, whole.nested_absmax)


@pytest.mark.parametrize("nested", [True, False])
def test_tensor_flatten_round_trip(nested):
    """__tensor_flatten__ / __tensor_unflatten__ (torch.compile, FSDP) give back the same view of the same data."""
    weight = ExpertWeights4bit.quantize(_stack((2, 8, 64), torch.float32, "cpu"), compress_statistics=nested)
    view = weight.transpose(1, 2)
    names, meta = view.__tensor_flatten__()
    assert ("nested_absmax" in names) == nested
    back = ExpertWeights4bit.__tensor_unflatten__({n: getattr(view, n) for n in names}, meta, None, None)
    assert back.shape == view.shape and back.transposed and torch.equal(back.dequantize(), view.dequantize())
