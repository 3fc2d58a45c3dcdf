"""The chunked causal-LM loss against Transformers' ForCausalLMLoss: values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.loss.loss_utils import ForCausalLMLoss

from conftest import tiny_config
from moefuse.ops.cross_entropy import causal_lm_loss, cross_entropy_rows, use_chunked_loss

VOCAB = 37


def _case(dtype: torch.dtype, batch: int = 3, seq: int = 11):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, VOCAB, generator=g) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, -3:] = -100  # padding
    return logits, labels


def _loss_and_grad(fn, logits, labels, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, labels, VOCAB, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(19)}, {"num_items_in_batch": 7}],
    ids=["mean", "num_items_tensor", "num_items_int"],
)
def test_causal_lm_loss_equals_transformers(dtype, kwargs, monkeypatch):
    from moefuse.ops import cross_entropy

    monkeypatch.setattr(
        cross_entropy, "_CHUNK_ELEMENTS", 4 * VOCAB
    )  # chunks of 4 rows: 33 rows, a short last
    logits, labels = _case(dtype)
    expected, expected_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    loss, grad = _loss_and_grad(causal_lm_loss, logits, labels, **kwargs)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    # Both round the fp32 gradient to the logits' dtype once.
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_given_shift_labels_and_ignore_index():
    logits, labels = _case(torch.float32)
    shift = torch.roll(labels, -1, dims=1).clamp(min=0)
    shift[:, -1] = 5  # labels that need no shifting, with a custom ignored id
    kwargs = {"shift_labels": shift, "ignore_index": 5}
    expected, expected_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    loss, grad = _loss_and_grad(causal_lm_loss, logits, labels, **kwargs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_rows_ignore_and_chunking():
    logits = torch.randn(10, VOCAB, requires_grad=True)
    target = torch.randint(0, VOCAB, (10,))
    target[3] = -100
    per_row = cross_entropy_rows(logits, target, chunk_rows=3)
    expected = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(per_row, expected)
    assert per_row[3] == 0
    (per_row * torch.arange(10.0)).sum().backward()  # an uneven upstream gradient reaches each row
    ref = logits.detach().clone().requires_grad_(True)
    (torch.nn.functional.cross_entropy(ref, target, reduction="none") * torch.arange(10.0)).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    with pytest.raises(ValueError, match=r"logits \[N, V\]"):
        cross_entropy_rows(logits[None], target)
    for bad in (0, -3, 2.5):  # no chunk at all would leave the losses unwritten
        with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
            cross_entropy_rows(logits, target, chunk_rows=bad)


def test_everything_ignored_gives_nan_as_transformers():
    logits, labels = _case(torch.float32)
    labels[:] = -100
    assert torch.isnan(causal_lm_loss(logits, labels, VOCAB)) and torch.isnan(
        ForCausalLMLoss(logits, labels, VOCAB)
    )


def test_use_chunked_loss_on_a_model_and_through_peft():
    from peft import LoraConfig, get_peft_model

    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="moefuse")
    ids = torch.randint(0, config.vocab_size, (2, 16))
    expected = model(input_ids=ids, labels=ids).loss
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert use_chunked_loss(peft_model) and model.loss_function is causal_lm_loss
    loss = peft_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)

    classifier = AutoModelForSequenceClassification.from_config(config)
    assert not use_chunked_loss(classifier)  # not a causal-LM loss: left alone
