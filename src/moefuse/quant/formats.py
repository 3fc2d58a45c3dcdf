"""bitsandbytes' blockwise 4-bit format (NF4, FP4, nested absmax), quantized per expert and batched over experts.

One expert matrix ``W [out, in]`` is read as a flat vector of ``n = out * in`` values (row-major) and cut into
blocks of ``blocksize`` values (the last one may be short). Each block keeps its absolute maximum ``absmax``
(fp32) and each value the index of the nearest entry of a 16-value code (NF4 or FP4) to ``value / absmax``;
two indices share a byte, the first in the high nibble. With nested statistics (bitsandbytes'
``compress_statistics``, Transformers' ``bnb_4bit_use_double_quant``) the absmax vector loses its mean
(``offset``) and is itself quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic code:
``absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // 256] + offset``.

Everything is computed per expert exactly as ``bitsandbytes.functional.quantize_4bit`` computes it on one expert
slice, so every expert's bytes, absmax, offset and nested statistics equal that function's. bitsandbytes rounds
slightly differently on the CPU than in its CUDA kernels (FP4: which of its two zero codes a tiny value takes,
thresholds an ulp apart; the nested 8-bit absmax goes through a 65536-entry lookup table on the CPU and a binary
search on CUDA). Dequantized values agree; the bits follow the device: tensors quantized on a CUDA device
match bitsandbytes' CUDA kernels, elsewhere its CPU backend.

Its CUDA kernels are built with ``--use_fast_math``: ``value / absmax`` is ``value * (1.0f / absmax)`` where the
reciprocal is the GPU's approximate one (``rcp.approx.ftz.f32``, one MUFU.RCP instruction), at times an ulp
from the correctly rounded reciprocal, and fp32 subnormals read and written as zero. The ulp matters for 16-bit
weights: their ratios often sit exactly on an FP4 threshold, and the reciprocal's last bit picks the side. On an
NVIDIA GPU the same instruction is run (through Triton); ``rounding="cuda"`` elsewhere has no such instruction
and takes the correctly rounded reciprocal, so its FP4 bytes of fp16/bf16 weights may differ from the GPU's
where a value sits on a threshold. (The CPU backend divides instead, and clamps absmax at 1e-38.)
"""

from __future__ import annotations

import functools
import warnings

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes' block for the nested absmax quantization

# NormalFloat4 (QLoRA, Dettmers et al. 2023, appendix E): the 16 quantiles of N(0, 1) scaled to [-1, 1],
# indexed by the 4-bit code, as bitsandbytes stores them.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, exponent bias 3), divided by its largest magnitude 12; code 8 is a
# second zero.
FP4_VALUES = tuple(
    v / 12.0
    for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
# bitsandbytes' CUDA FP4 rounding: a sign bit, then the magnitude against these thresholds (its kernel's fp32
# constants, which differ from the exact midpoints by up to 4e-7) gives the codes of the magnitude buckets.
_FP4_CUDA_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
_FP4_CUDA_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
# bitsandbytes' CPU FP4 rounding: nearest value of the sorted code, whose positions map back to codes thus
# (the order its argsort gives the two zeros included).
_FP4_CPU_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a table of this many bins of [-1, 1]


def code_values(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp32 values of ``quant_type``'s code (bitsandbytes' ``get_4bit_type``), indexed by 4-bit code."""
    values = {"nf4": NF4_VALUES, "fp4": FP4_VALUES}
    if quant_type not in values:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return torch.tensor(values[quant_type], dtype=torch.float32, device=device)


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    # Exponents 10^-6 .. 10^0; at exponent i the fraction takes 2^i values: midpoints of a linear grid on [0.1, 1].
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = (10 ** (-6 + i)) * mids
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``): 256 sorted fp32 values in [-1, 1]."""
    return _dynamic_code_cpu().to(device, copy=True)


ROUNDINGS = ("cuda", "cpu")


def _cuda_rounding(device: torch.device, rounding: str | None) -> bool:
    """Whether to round as bitsandbytes' CUDA kernels (``rounding="cuda"``) or its CPU backend (``"cpu"``);
    default: as bitsandbytes would on ``device``."""
    if rounding is None:
        return device.type == "cuda"
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS} or None, got {rounding!r}")
    return rounding == "cuda"


def _code_indices_4bit(scaled: torch.Tensor, quant_type: str, cuda: bool) -> torch.Tensor:
    """4-bit code (int64) of each ``value / absmax``; NaN (a block whose absmax is 0, on CUDA) gives code 0, as
    there every comparison of the kernel's decision tree is false."""
    if quant_type == "nf4":
        code = code_values("nf4", scaled.device)
        index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    elif cuda:
        thresholds = torch.tensor(_FP4_CUDA_THRESHOLDS, dtype=torch.float32, device=scaled.device)
        magnitude = torch.tensor(_FP4_CUDA_MAGNITUDE_CODES, device=scaled.device)
        index = magnitude[torch.bucketize(scaled.abs(), thresholds)] + 8 * (scaled < 0)
    else:
        order = torch.tensor(_FP4_CPU_SORTED_CODES, device=scaled.device)
        sorted_code = code_values("fp4", scaled.device)[order]
        index = order[torch.bucketize(scaled, (sorted_code[:-1] + sorted_code[1:]) / 2)]
    return torch.where(torch.isnan(scaled), 0, index)


def _blocks(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``[rows, n]`` → ``[rows, ceil(n / blocksize), blocksize]``, the last block padded with zeros."""
    pad = -values.shape[1] % blocksize
    return torch.nn.functional.pad(values, (0, pad)).view(values.shape[0], -1, blocksize)


_FP32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32, 2**-126


def _flush_subnormals(values: torch.Tensor) -> torch.Tensor:
    """fp32 subnormals as zero, as bitsandbytes' CUDA kernels (``--use_fast_math``, hence ``-ftz``) read and
    write them; the sign of a flushed value is dropped too (FP4's sign test ``x < 0`` is false for -0)."""
    return values.masked_fill(values.abs() < _FP32_TINY, 0.0)


@functools.cache
def _gpu_reciprocal_kernel():  # Triton is imported only on this path: the CPU needs none
    import triton
    import triton.language as tl

    @triton.jit
    def reciprocal_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
        # The instruction bitsandbytes' ``1.0f / local_abs_max`` compiles to under --use_fast_math (MUFU.RCP).
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
        tl.store(out_ptr + offsets, r, mask=mask)

    return reciprocal_kernel


def _kernel_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """``1.0f / absmax`` as bitsandbytes' CUDA kernels compute it: on an NVIDIA GPU the GPU's approximate
    reciprocal instruction itself; elsewhere (or without Triton) the correctly rounded reciprocal, flushed as the
    instruction flushes (``1 / 0 = inf``, a subnormal reciprocal of an absmax over 2**126 gives 0)."""
    if absmax.is_cuda and torch.version.hip is None:
        try:
            kernel = _gpu_reciprocal_kernel()
        except ImportError:
            warnings.warn(
                "moefuse.quant: Triton is missing, so FP4 bytes may differ from bitsandbytes' CUDA kernels where a "
                "value sits on a threshold; fix: pip install triton",
                stacklevel=3,
            )
        else:
            flat = absmax.contiguous().view(-1)
            out = torch.empty_like(flat)
            block = 1024
            with torch.cuda.device(flat.device):
                kernel[(-(-flat.numel() // block),)](flat, out, flat.numel(), BLOCK=block)
            return out.view(absmax.shape)
    return _flush_subnormals(1.0 / absmax)


def _scale_blocks(values: torch.Tensor, blocksize: int, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row blockwise absmax ``[rows, blocks]`` of ``values [rows, n]`` (fp32) and ``value / absmax`` as
    bitsandbytes computes it, ``[rows, blocks * blocksize]`` (the padding after ``n`` scaled zeros, as the
    kernels load them). CUDA: subnormals flushed, times the kernel's reciprocal (an all-zero block: 0 * inf, NaN);
    the CPU backend clamps absmax at 1e-38 and divides a short last block instead of multiplying."""
    n = values.shape[1]
    if cuda:
        values = _flush_subnormals(values)
    blocks = _blocks(values, blocksize)
    absmax = blocks.abs().amax(dim=2)
    if cuda:
        return absmax, _flush_subnormals(blocks * _kernel_reciprocal(absmax)[..., None]).view(
            values.shape[0], -1
        )
    clamped = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / clamped)[..., None]
    if n % blocksize:
        scaled[:, -1] = blocks[:, -1] / clamped[:, -1, None]
    return absmax, scaled.view(values.shape[0], -1)


def _quantize_8bit_dynamic(scaled: torch.Tensor, cuda: bool) -> torch.Tensor:
    """uint8 index into :func:`dynamic_code` of each ``value / absmax`` (bitsandbytes' blockwise 8-bit)."""
    code = dynamic_code(scaled.device)
    if not cuda:
        # The CPU backend maps [-1, 1] onto 65536 bins and takes, per bin, the code of the bin's left edge.
        bins = -1.0 + (2.0 * torch.arange(_LUT_SIZE, device=scaled.device, dtype=torch.float32)) / (
            _LUT_SIZE - 1
        )
        table = torch.searchsorted((code[:-1] + code[1:]) / 2, bins, side="left")
        nan = torch.isnan(scaled)
        bin_index = ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).nan_to_num(0).long()
        return torch.where(nan, 0, table[bin_index]).to(torch.uint8)
    # The CUDA kernel's binary search over the sorted code: nearest value, ties to the last pivot compared.
    pivot = torch.full_like(scaled, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = scaled > value
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, value, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, value)
        pivot = torch.where(above, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = scaled > value
    up = torch.where(scaled > (upper + value) * 0.5, upper_pivot, pivot)
    down = torch.where(scaled < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(above, up, down).to(torch.uint8)


def quantize_rows_4bit(
    values: torch.Tensor, quant_type: str, blocksize: int, rounding: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``values [rows, n]`` as bitsandbytes' ``quantize_4bit`` quantizes a tensor of ``n``
    values: ``(packed uint8 [rows, ceil(n / 2)], absmax fp32 [rows, ceil(n / blocksize)])``."""
    cuda = _cuda_rounding(values.device, rounding)
    n = values.shape[1]
    absmax, scaled = _scale_blocks(values.float(), blocksize, cuda)
    if not cuda and n % blocksize:
        absmax[:, -1] = absmax[:, -1].clamp(min=1e-38)  # the CPU backend keeps a short last block's clamped
    # An odd last value pairs with the block's padding: a zero scaled like the block's values.
    index = _code_indices_4bit(scaled[:, : n + n % 2].contiguous(), quant_type, cuda).to(torch.uint8)
    return (index[:, 0::2] << 4) | index[:, 1::2], absmax


def quantize_absmax_nested(
    absmax: torch.Tensor, rounding: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' nested statistics of each row of ``absmax [rows, blocks]`` (one row per expert):
    ``(qabsmax uint8 [rows, blocks], nested_absmax fp32 [rows, ceil(blocks / 256)], offset fp32 [rows])``."""
    cuda = _cuda_rounding(absmax.device, rounding)
    # One mean per row, each over a 1-D tensor as bitsandbytes takes it (a batched mean may round differently).
    # (Cloned: a row view's alignment can change how the reduction is vectorised, hence its rounding.)
    offset = torch.stack([row.clone().mean() for row in absmax])
    nested_absmax, scaled = _scale_blocks(absmax - offset[:, None], NESTED_BLOCKSIZE, cuda)
    qabsmax = _quantize_8bit_dynamic(scaled[:, : absmax.shape[1]].contiguous(), cuda)
    # A block of equal absmax values has no scale: code 0 on both backends (the CPU one skips it, and on CUDA
    # the binary search over NaN ends there).
    empty = (nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, : absmax.shape[1]]
    return torch.where(empty, 0, qabsmax).to(torch.uint8), nested_absmax, offset


def dequantize_absmax(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """fp32 absmax ``[rows, blocks]`` back from the nested statistics."""
    blocks = qabsmax.shape[1]
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, :blocks]
    return dynamic_code(qabsmax.device)[qabsmax.long()] * scale + offset[:, None]


def dequantize_rows_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int
) -> torch.Tensor:
    """fp32 ``[rows, n]`` from packed 4-bit rows and their fp32 absmax (the reference the kernels are tested
    against; bitsandbytes multiplies code value and absmax in fp32 too)."""
    index = torch.stack([packed >> 4, packed & 0xF], dim=2).view(packed.shape[0], -1)[:, :n]
    scale = absmax.repeat_interleave(blocksize, dim=1)[:, :n]
    return code[index.long()] * scale
