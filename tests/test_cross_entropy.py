"""The causal-LM loss against Transformers' ForCausalLMLoss (values and gradients), and its Triton kernels against
the chunked PyTorch path (in the interpreter on the CPU: fp32/fp16; bf16 at Qwen3's vocabulary on a GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.loss.loss_utils import ForCausalLMLoss

from conftest import tiny_config
from moefuse.ops import cross_entropy
from moefuse.ops.backend import use_backend
from moefuse.ops.cross_entropy import causal_lm_loss, cross_entropy_rows, use_chunked_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
    assert use_chunked_loss(peft_model, enable=False) and model.loss_function is ForCausalLMLoss


def test_moefuse_model_class_computes_its_loss_with_causal_lm_loss():
    from moefuse import Qwen3MoeFusedForCausalLM

    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    model = Qwen3MoeFusedForCausalLM(config)
    assert model.loss_function is causal_lm_loss
    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert use_chunked_loss(model, enable=False) and model.loss_function is ForCausalLMLoss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, loss)
    model.loss_function = causal_lm_loss  # set back like any Transformers model
    assert model.loss_function is causal_lm_loss


def _rows_loss_and_grad(logits, target, grad_rows, backend, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    with use_backend(backend):
        loss = cross_entropy_rows(logits, target, **kwargs)
        # Without grad_rows the loss is summed: its gradient reaches the kernel as an expanded (stride 0) tensor.
        (loss.sum() if grad_rows is None else (loss * grad_rows).sum()).backward()
    return loss.detach(), logits.grad


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [1, 37, 300])
def test_triton_kernels_equal_chunked_path(dtype, vocab, monkeypatch):
    monkeypatch.setattr(cross_entropy, "_block_v", lambda v: 64)  # several column blocks, a partial last one
    g = torch.Generator().manual_seed(vocab)
    rows = 13
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    logits[2, : vocab // 2] = float("-inf")  # masked-out vocabulary entries
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[[0, 7]] = -100
    target[2] = vocab - 1  # an entry that is not masked
    grad_rows = torch.randn(rows, generator=g)
    expected, expected_grad = _rows_loss_and_grad(logits, target, grad_rows, "torch")
    loss, grad = _rows_loss_and_grad(logits, target, grad_rows, "triton")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert loss[0] == loss[7] == 0 and (grad[[0, 7]] == 0).all()
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-6)


@pytest.mark.interpreter
def test_triton_strided_inputs_and_ignore_index():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 50, generator=g)
    logits = wide[:, 5:45]  # rows 50 apart: read in place
    transposed = torch.randn(40, 9, generator=g).t()  # columns not contiguous: copied first
    target = torch.arange(0, 36, 2)[::2]  # a strided view
    target[4] = 3
    for x in (logits, transposed):
        expected, expected_grad = _rows_loss_and_grad(x, target, None, "torch", ignore_index=3)
        loss, grad = _rows_loss_and_grad(x, target, None, "triton", ignore_index=3)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
        assert loss[4] == 0


@pytest.mark.interpreter
def test_triton_target_outside_vocabulary_gives_nan():
    logits = torch.randn(3, 10)
    target = torch.tensor([1, 10, -5])
    with use_backend("triton"):
        loss = cross_entropy_rows(logits, target)
    assert loss[0].isfinite() and loss[1:].isnan().all()


@pytest.mark.interpreter
def test_triton_causal_lm_loss_equals_transformers():
    logits, labels = _case(torch.float16)
    expected, expected_grad = _loss_and_grad(ForCausalLMLoss, logits, labels)
    with use_backend("triton"):
        loss, grad = _loss_and_grad(causal_lm_loss, logits, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cross_entropy_gpu_qwen3_vocab(dtype):
    vocab = 151936
    g = torch.Generator(DEVICE).manual_seed(0)
    logits = (torch.randn(257, vocab, generator=g, device=DEVICE) * 2).to(dtype)
    target = torch.randint(0, vocab, (257,), generator=g, device=DEVICE)
    target[::7] = -100
    grad_rows = torch.rand(257, generator=g, device=DEVICE)
    loss, grad = _rows_loss_and_grad(logits, target, grad_rows, "triton")
    expected, expected_grad = _rows_loss_and_grad(logits, target, grad_rows, "torch")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-7)
    reference = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.interpreter
def test_compiled_graphs_take_the_chunked_path_whole():
    """Under torch.compile the loss goes into the graph as the chunked PyTorch path (no kernel launch traced, no
    graph break) with Transformers' values and gradient."""
    logits, labels = _case(torch.float32)
    want_loss, want_grad = _loss_and_grad(ForCausalLMLoss, logits, labels)
    torch._dynamo.reset()
    with use_backend("triton"):
        compiled = torch.compile(causal_lm_loss, backend="aot_eager", fullgraph=True)
        loss, grad = _loss_and_grad(compiled, logits, labels)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
