"""Cross-entropy of a causal LM without fp32 copies of the logits.

Transformers' ``ForCausalLMLoss`` upcasts the whole ``[tokens, vocab]`` logits to fp32 and PyTorch's
``cross_entropy`` saves an fp32 log-softmax of the same size for backward: with Qwen3's 151936-token vocabulary
that is 1.2 GB each per 2048 tokens, on top of the bf16 logits. :func:`cross_entropy_rows` keeps only one
log-sum-exp per row for backward, which recomputes the softmax and writes the gradient in the logits' dtype. On
the Triton backend (CUDA) each pass is one kernel that reads the logits once in their own dtype
(:mod:`moefuse.kernels.cross_entropy`); elsewhere PyTorch ops run it a chunk of rows at a time in fp32 (the
reference the kernels are tested against). :func:`causal_lm_loss` is a drop-in for ``ForCausalLMLoss`` (same
label shift, ``ignore_index``, ``num_items_in_batch``); :func:`use_chunked_loss` sets it as a model's
``loss_function``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backend import launches_triton
from .launch import unit_columns

# fp32 values of one chunk (~64 MiB): the working set of forward and backward.
_CHUNK_ELEMENTS = 1 << 24


def _chunks(rows: int, vocab: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of rows."""
    step = chunk_rows if chunk_rows is not None else max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _block_v(vocab: int) -> int:
    """Columns a program streams per step: 2048 (and 8 warps), near memory bandwidth already; wider blocks and
    other warp counts gained nothing (docs/measurements.md)."""
    from .launch import next_power_of_2

    return min(2048, next_power_of_2(vocab))


def _forward_chunked(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    for start, end in _chunks(rows, vocab, chunk_rows):
        x = logits[start:end].float()
        lse[start:end] = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, safe_target[start:end, None]).squeeze(1)
        loss[start:end] = lse[start:end] - picked
    return torch.where(valid, loss, 0.0), lse


def _backward_chunked(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    chunk_rows: int | None,
) -> torch.Tensor:
    rows, vocab = logits.shape
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    grad_rows = torch.where(valid, grad_loss.float(), 0.0)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for start, end in _chunks(rows, vocab, chunk_rows):
        p = torch.exp(logits[start:end].float() - lse[start:end, None])
        p.scatter_add_(1, safe_target[start:end, None], p.new_full((end - start, 1), -1.0))
        grad[start:end] = (p * grad_rows[start:end, None]).to(grad.dtype)
    return grad


def _forward_triton(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.cross_entropy import cross_entropy_forward_kernel
    from .launch import launch

    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        launch(
            cross_entropy_forward_kernel,
            lambda meta: (rows,),
            logits_ptr=logits,
            target_ptr=target,
            loss_ptr=loss,
            lse_ptr=lse,
            V=vocab,
            stride_row=logits.stride(0),
            ignore_index=ignore_index,
            BLOCK_V=_block_v(vocab),
            num_warps=8,
        )
    return loss, lse


def _backward_triton(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    from ..kernels.cross_entropy import cross_entropy_backward_kernel
    from .launch import launch

    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows:
        launch(
            cross_entropy_backward_kernel,
            lambda meta: (rows,),
            logits_ptr=logits,
            target_ptr=target,
            lse_ptr=lse,
            grad_loss_ptr=grad_loss,
            grad_ptr=grad,
            V=vocab,
            stride_row=logits.stride(0),
            stride_grad_row=grad.stride(0),
            stride_grad_loss=grad_loss.stride(0),
            ignore_index=ignore_index,
            BLOCK_V=_block_v(vocab),
            num_warps=8,
        )
    return grad


class _CrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk_rows: int | None):
        ctx.triton = launches_triton(logits)
        if ctx.triton:
            logits = unit_columns(logits)
            target = target.contiguous()
            loss, lse = _forward_triton(logits, target, ignore_index)
        else:
            loss, lse = _forward_chunked(logits, target, ignore_index, chunk_rows)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        if ctx.triton:
            grad = _backward_triton(logits, target, lse, grad_loss, ctx.ignore_index)
        else:
            grad = _backward_chunked(logits, target, lse, grad_loss, ctx.ignore_index, ctx.chunk_rows)
        return grad, None, None, None


def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-row cross-entropy (fp32 ``[N]``, 0 where ``target == ignore_index``) of ``logits [N, V]`` (any float
    dtype) against ``target [N]``, gradient in ``logits``' dtype. fp32 math: on the Triton backend a row per
    program; otherwise PyTorch ops a chunk of rows at a time (``chunk_rows``, default ~64 MiB of fp32 values).
    On the Triton backend a target outside ``[0, V)`` (other than ``ignore_index``) gives a NaN loss."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy_rows takes logits [N, V] and target [N], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"cross_entropy_rows: chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return _CrossEntropyRows.apply(logits, target.to(logits.device), ignore_index, chunk_rows)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Transformers' ``ForCausalLMLoss`` (tokens < n predict n; mean over the labelled tokens, or sum divided
    by ``num_items_in_batch``), computed by :func:`cross_entropy_rows`: no fp32 copy of the logits."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    total = cross_entropy_rows(logits.reshape(-1, vocab_size), target, ignore_index).sum()
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()  # nan when nothing is labelled, as PyTorch's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_loss(model: nn.Module, enable: bool = True) -> bool:
    """Make ``model`` (a Transformers causal LM, or a PEFT model around one) compute its training loss with
    :func:`causal_lm_loss` (``enable=False``: with Transformers' ``ForCausalLMLoss``). Returns whether the model's
    loss is now the one asked for; ``False`` (and nothing changed) when its loss is neither of the two."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    choices = (LOSS_MAPPING["ForCausalLM"], causal_lm_loss)
    if getattr(base, "loss_function", None) not in choices:
        return False
    base.loss_function = choices[enable]
    return True
