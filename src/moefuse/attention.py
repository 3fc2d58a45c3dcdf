"""The ``"moefuse_varlen"`` attention implementation, registered into Transformers' ``AttentionInterface``:
causal attention that computes only within each sequence of a packed row (``moefuse.ops.attention``), with no
dependency beyond PyTorch (its FlashAttention varlen kernel on CUDA).

``from_pretrained(path, attn_implementation="moefuse_varlen")`` or ``moefuse train --attn_implementation
moefuse_varlen``. Where the sequences come from, first that applies:

- ``cu_seq_lens_q`` and ``max_length_q`` (Transformers' flash-attention keywords, which TRL's padding-free
  collator computes on the CPU): no sync with the host. A padding mask is not read then: such batches have none;
- a 2-D padding mask (rows padded on one side): each row's real tokens are one sequence;
- ``position_ids`` restarting at 0 within a row (packed rows without the keywords): one host sync per layer;
- otherwise each row is one sequence.

Training and prefill only: queries and keys must be the same tokens (no KV cache).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .ops.attention import segments_of_padding, segments_of_positions, varlen_attention

ATTN_IMPLEMENTATION = "moefuse_varlen"
# The families whose attention this computes (causal, no sinks, softcapping or latent heads; tested against each
# packed document run alone): `moefuse train`'s default picks it for these only.
VARLEN_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask Transformers hands ``"moefuse_varlen"``: the 2-D padding mask as given (``None`` without one)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function interface: ``query`` ``[B, Hq, S, D]``, ``key``/``value``
    ``[B, Hkv, S, D]``; returns ``[B, S, Hq, D]`` and no weights."""
    unsupported = [
        name
        for name, given in (
            ("attention dropout", dropout > 0),
            ("attention sinks (s_aux)", kwargs.get("s_aux") is not None),
            ("logit softcapping", kwargs.get("softcap") is not None),
            ("output_attentions", kwargs.get("output_attentions", False)),
            ("a KV cache (keys longer than queries)", key.shape[2] != query.shape[2]),
            ("a prepared 4-D mask", attention_mask is not None and attention_mask.dim() != 2),
            ("non-causal attention", not getattr(module, "is_causal", True)),
        )
        if given
    ]
    if unsupported:
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} ({type(module).__name__}) does not support "
            f"{', '.join(unsupported)}; use 'sdpa' or 'eager'"
        )
    batch, heads, length, head_dim = query.shape
    if cu_seq_lens_q is not None:
        cu_seq_lens, max_length = cu_seq_lens_q.to(query.device), max_length_q or length
    elif attention_mask is not None:
        cu_seq_lens, max_length = segments_of_padding(attention_mask), length
    elif position_ids is not None:
        cu_seq_lens, max_length = segments_of_positions(position_ids.expand(batch, -1))
    else:
        cu_seq_lens = torch.arange(0, (batch + 1) * length, length, device=query.device, dtype=torch.int32)
        max_length = length

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B * S, H, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim)

    out = varlen_attention(
        tokens(query),
        tokens(key),
        tokens(value),
        cu_seq_lens,
        max_length,
        scale=scaling,
        sliding_window=sliding_window,
    )
    return out.view(batch, length, heads, head_dim), None


def register() -> None:
    """Register ``"moefuse_varlen"`` with Transformers' attention and mask interfaces (idempotent; done by
    ``import moefuse``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, padding_mask)
