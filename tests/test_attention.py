"""``moefuse_varlen`` attention: the op against attention run on each sequence alone, and the Transformers
integration against each document run alone, packed rows, padded rows and ``moefuse train``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import moefuse  # noqa: F401  (registers the attention implementation)
from conftest import tiny_config
from moefuse.attention import ATTN_IMPLEMENTATION, VARLEN_MODEL_TYPES
from moefuse.ops.attention import (
    segments_of_padding,
    segments_of_positions,
    varlen_attention,
    varlen_attention_reference,
)
from moefuse.train import run_train
from moefuse.train import trainer as trainer_module

FEW_ROWS = ["--max_samples", "48", "--save_steps", "1000"]


def _each_sequence_alone(query, key, value, bounds, scale=None, sliding_window=None) -> torch.Tensor:
    """Causal attention run on each sequence by itself (in fp64), laid back end to end."""
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        q, k, v = (x[start:end].transpose(0, 1).double() for x in (query, key, value))
        length = end - start
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        if sliding_window is not None:
            mask &= ~torch.ones(length, length, dtype=torch.bool).tril(-sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    ("bounds", "heads", "sliding_window"),
    [
        ([0, 7, 8, 20, 33], (4, 2), None),  # ragged, a one-token sequence, grouped-query attention
        ([0, 0, 5, 5, 16], (2, 2), None),  # zero-length sequences (a row's padding can make them)
        ([0, 33], (4, 1), None),  # one sequence, one key/value head
        ([0, 12, 33], (4, 2), 5),  # a sliding window shorter than the sequences
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_attention_is_attention_within_each_sequence(bounds, heads, sliding_window, dtype):
    torch.manual_seed(0)
    tokens, (q_heads, kv_heads), head_dim = bounds[-1], heads, 8
    query = torch.randn(tokens, q_heads, head_dim, dtype=dtype, requires_grad=True)
    key = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, requires_grad=True)
    value = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, requires_grad=True)
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)
    out = varlen_attention(query, key, value, cu_seq_lens, 33, scale=0.3, sliding_window=sliding_window)
    expected = _each_sequence_alone(query, key, value, bounds, 0.3, sliding_window)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (query, key, value), grad.to(dtype))
    want = torch.autograd.grad(expected, (query, key, value), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=10 * tol, rtol=10 * tol)


def test_segments_of_padding_keep_real_tokens_apart_from_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert segments_of_padding(mask).tolist() == [0, 0, 3, 5, 7, 10, 10, 10, 15, 15, 15, 15, 20]
    assert segments_of_padding(mask).dtype == torch.int32


def test_segments_of_positions_start_at_each_zero_and_each_row():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    cu_seq_lens, longest = segments_of_positions(position_ids)
    assert cu_seq_lens.tolist() == [0, 3, 5, 7, 10]
    assert longest == 3


def test_a_head_count_that_does_not_group_is_refused():
    q, kv = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        varlen_attention(q, kv, kv, torch.tensor([0, 4], dtype=torch.int32), 4)


def test_reference_masks_across_sequences_and_the_future():
    query = torch.zeros(4, 1, 2)
    value = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 1, 2)
    out = varlen_attention_reference(query, torch.zeros(4, 1, 2), value, torch.tensor([0, 2, 4]))
    # equal scores: each token averages the values it may see
    assert out[:, 0, 0].tolist() == [0.0, 0.5, 2.0, 2.5]


def _tiny_model() -> AutoModelForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=100, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION).eval()


DOCUMENTS = ((0, 10), (10, 16), (16, 24))


@pytest.mark.parametrize("family", VARLEN_MODEL_TYPES)
def test_packed_documents_attend_as_if_each_ran_alone(family):
    """Every family moefuse train gives this attention by default: a packed row's documents, bounded by TRL's
    keywords or by restarting positions, give what each document gives alone."""
    config = tiny_config(family, num_experts=4)
    config.vocab_size = 100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION).eval()
    ids = torch.randint(0, 100, (1, 24))
    position_ids = torch.cat([torch.arange(end - start) for start, end in DOCUMENTS])[None]
    cu_seq_lens = torch.tensor([0, 10, 16, 24], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, a:b]).logits for a, b in DOCUMENTS], dim=1)
        from_positions = model(input_ids=ids, position_ids=position_ids).logits
        from_bounds = model(
            input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
            max_length_q=10, max_length_k=10,
        ).logits  # fmt: skip
    torch.testing.assert_close(from_positions, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_bounds, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_give_their_real_tokens_what_sdpa_gives(side):
    model = _tiny_model()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if side == "right":
        mask[0, 8:] = 0
    else:
        mask[0, :4] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_a_kv_cache_is_refused_by_name():
    model = _tiny_model()
    with pytest.raises(NotImplementedError, match="does not support a KV cache"):
        model.generate(torch.randint(0, 100, (1, 5)), max_new_tokens=2, do_sample=False)


def test_moefuse_train_on_packed_rows_trains_as_with_sdpa(tmp_path, monkeypatch):
    """The same run with ``moefuse_varlen`` and with SDPA under the prepared packed mask: the same losses; the
    decoder is handed the all-true padding mask, so Transformers looks for no packed sequences itself."""
    common = [*FEW_ROWS, "--max_steps", "3", "--logging_steps", "1", "--packing", "true"]
    handed = []
    original = trainer_module.MoefuseSFTTrainer._padding_free_mask

    def record(self, module, args, kwargs):
        result = original(self, module, args, kwargs)
        handed.append(result is not None and bool(result[1]["attention_mask"].all()))
        return result

    monkeypatch.setattr(trainer_module.MoefuseSFTTrainer, "_padding_free_mask", record)
    varlen = run_train(
        None, [*common, "--attn_implementation", ATTN_IMPLEMENTATION, "--output_dir", str(tmp_path / "a")]
    )
    assert handed and all(handed)
    sdpa = run_train(None, [*common, "--attn_implementation", "sdpa", "--output_dir", str(tmp_path / "b")])
    assert varlen.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert varlen.losses == pytest.approx(sdpa.losses, rel=1e-5)
    # the packed rows' documents, as the summary records them: the built-in rows are 20-57 tokens
    packed = varlen.packed_sequences
    assert packed["sequences"] == 48 and 20 <= packed["mean_tokens"] <= packed["max_tokens"] <= 57


@pytest.mark.parametrize(
    ("settings", "cuda", "kernel", "expected"),
    [
        ({"packing": True}, True, True, ATTN_IMPLEMENTATION),
        ({"packing": True, "model_type": "gpt_oss"}, True, True, "sdpa"),  # attention sinks
        ({"packing": True, "model_type": "deepseek_v3"}, True, True, "sdpa"),  # latent attention's head dims
        ({"packing": True, "packing_strategy": "bfd_split"}, True, True, ATTN_IMPLEMENTATION),
        ({"padding_free": True, "fp16": True, "bf16": False}, True, True, ATTN_IMPLEMENTATION),
        ({"packing": True, "packing_strategy": "wrapped"}, True, True, "sdpa"),  # rows padded, not packed
        ({}, True, True, "sdpa"),  # padded batches
        ({"packing": True, "bf16": False}, True, True, "sdpa"),  # fp32: the kernel takes half precision only
        ({"packing": True}, False, True, "sdpa"),  # no CUDA
        ({"packing": True, "use_cpu": True}, True, True, "sdpa"),
        ({"packing": True}, True, False, "sdpa"),  # a torch without the varlen kernel
    ],
)
def test_default_attention(settings, cuda, kernel, expected, monkeypatch):
    from types import SimpleNamespace

    from moefuse.ops import attention as attention_ops
    from moefuse.train import config as config_module

    values = {"padding_free": False, "packing": False, "packing_strategy": "bfd", "bf16": True, "fp16": False}
    model_type = settings.pop("model_type", "qwen3_moe")
    sft_config = SimpleNamespace(**{**values, "use_cpu": False, **settings})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(attention_ops, "varlen_attn", attention_ops.varlen_attn if kernel else None)
    if kernel and attention_ops.varlen_attn is None:
        monkeypatch.setattr(attention_ops, "varlen_attn", object())
    assert config_module.default_attention(sft_config, model_type) == expected


def test_moefuse_train_records_the_attention_it_chose(tmp_path):
    result = run_train(
        None, [*FEW_ROWS, "--max_steps", "1", "--packing", "true", "--output_dir", str(tmp_path)]
    )
    assert result.model.config._attn_implementation == "sdpa"  # this machine: no CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("bounds", [[0, 100, 101, 2048, 4096], [0, 0, 300, 300, 1000]])
def test_flash_varlen_matches_each_sequence_alone_bf16_gpu(bounds):
    torch.manual_seed(0)
    tokens = bounds[-1]
    shape = {"query": (tokens, 32, 128), "key": (tokens, 4, 128), "value": (tokens, 4, 128)}
    q, k, v = (
        torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shape.values()
    )
    cu_seq_lens = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    out = varlen_attention(q, k, v, cu_seq_lens, longest)
    expected = varlen_attention_reference(*(x.float() for x in (q, k, v)), cu_seq_lens)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        # bf16 gradients summed over up to ~2k keys: compare by relative norm
        assert ((g.float() - w).norm() / w.norm()).item() < 2e-2


def test_an_attention_layer_compiles_whole_given_the_bounds():
    """With the bounds given (TRL's collator), the attention traces with no graph break (``fullgraph=True``)."""
    model = _tiny_model()
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 24, 64)
    position_ids = torch.cat([torch.arange(end - start) for start, end in DOCUMENTS])[None]
    rotary = model.model.rotary_emb(hidden, position_ids)
    cu_seq_lens = torch.tensor([0, 10, 16, 24], dtype=torch.int32)

    def attend(hidden: torch.Tensor) -> torch.Tensor:
        return attention(hidden, rotary, None, cu_seq_lens_q=cu_seq_lens, max_length_q=10)[0]

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(attend, fullgraph=True)(hidden), attend(hidden))
