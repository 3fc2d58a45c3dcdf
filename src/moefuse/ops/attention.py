"""Causal attention within each of several sequences laid end to end (packed rows):

    out[t] = softmax(scale · q[t] · k[s]ᵀ) · v[s] over the positions s <= t of t's own sequence (and of the
    window, with a sliding window)

On CUDA in fp16/bf16 this is PyTorch's FlashAttention varlen kernel (``torch.nn.attention.varlen``), which
computes only the blocks inside each sequence: packed rows of short documents cost what the documents cost, not
what a whole row's square costs. Elsewhere it is the PyTorch reference twin below, SDPA under a block-diagonal
causal mask (memory grows with the square of the tokens: for tests and small inputs).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # a torch without it computes the reference everywhere
    varlen_attn = None

# (left, 0) windows are causal, left -1 for none; older releases take is_causal and have no window. Read once:
# a signature inspected inside the call would stop torch.compile's tracing.
VARLEN_TAKES_WINDOW = varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters

__all__ = ["varlen_attention", "varlen_attention_reference", "segments_of_padding", "segments_of_positions"]

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over ``key``/``value`` ``[T, Hkv, D]`` (``Hq`` a multiple of
    ``Hkv``: grouped-query attention) within the sequences that ``cu_seq_lens`` ``[N + 1]`` (int32, on the
    tokens' device, from 0 to ``T``) bounds; ``max_length`` is the longest sequence's length or more. A sliding
    window lets each token see itself and the ``sliding_window - 1`` before it. Returns ``[T, Hq, D]``."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(
            f"varlen attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]}"
        )
    flash = varlen_attn is not None and query.is_cuda and query.dtype in FLASH_DTYPES
    if flash and query.shape[-1] <= FLASH_MAX_HEAD_DIM:
        return _flash_varlen(query, key, value, cu_seq_lens, max_length, scale, sliding_window)
    return varlen_attention_reference(
        query, key, value, cu_seq_lens, scale=scale, sliding_window=sliding_window
    )


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    if VARLEN_TAKES_WINDOW:
        left = -1 if sliding_window is None else sliding_window - 1
        mask = {"window_size": (left, 0)}
    elif sliding_window is None:
        mask = {"is_causal": True}
    else:
        raise NotImplementedError(
            f"varlen attention with a sliding window needs torch.nn.attention.varlen's window_size (torch "
            f"{torch.__version__} has none)"
        )
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    return varlen_attn(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale, **mask
    )


def varlen_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """:func:`varlen_attention` by SDPA under the block-diagonal causal mask (PyTorch twin, any device/dtype)."""
    tokens = query.shape[0]
    position = torch.arange(tokens, device=query.device)
    sequence = torch.searchsorted(cu_seq_lens[1:].to(position.dtype), position, right=True)
    mask = (sequence[:, None] == sequence[None, :]) & (position[:, None] >= position[None, :])
    if sliding_window is not None:
        mask &= position[:, None] - position[None, :] < sliding_window
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),
        key.transpose(0, 1),
        value.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(0, 1)


def segments_of_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cu_seq_lens`` for rows ``[B, S]`` padded on one side (``attention_mask`` true on the real tokens): each
    row's real tokens are one sequence and its padding on either side another, so no real token sees padding.
    Computed on the device, without reading anything back; zero-length sequences are allowed."""
    batch, length = attention_mask.shape
    mask = attention_mask.bool()
    real = mask.sum(-1)
    first = mask.int().argmax(-1)  # 0 for a row of padding only: then real is 0 too
    row = torch.arange(batch, device=mask.device) * length
    bounds = torch.stack([row, row + first, row + first + real], dim=-1).flatten()
    end = torch.full((1,), batch * length, device=mask.device, dtype=bounds.dtype)
    return torch.cat([bounds, end]).to(torch.int32)


def segments_of_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seq_lens`` and the longest length of rows ``[B, S]`` packed with sequences whose positions restart at
    0 (each row also starts one). Reads the boundaries back to the host: give ``cu_seq_lens`` directly (TRL's
    padding-free collator computes them on the CPU) to keep a step free of syncs."""
    batch, length = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten()
    end = torch.full((1,), batch * length, device=bounds.device, dtype=bounds.dtype)
    cu_seq_lens = torch.cat([bounds, end]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())
