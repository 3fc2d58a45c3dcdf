"""``moefuse train``'s speed and memory keys: the optimizer default, the FLOP count behind MFU, the summary's
measurements, the loss metrics and packed masks that need no host sync, and the memory savers (issues 21, 25)."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

from moefuse.train import TrainConfigError, run_train
from moefuse.train import trainer as trainer_module
from moefuse.train.callbacks import FlopsModel, TritonCompiles, busy_seconds, kernel_table
from moefuse.train.run import SUMMARY_FILE, _throughput_lines
from moefuse.train.trainer import MoefuseSFTTrainer, packed_causal_mask, packed_sequence_index

FEW_ROWS = ["--max_samples", "48", "--save_steps", "1000"]


@pytest.fixture
def built_optimizers(monkeypatch):
    """The optimizer each run's Trainer built."""
    built = []
    create = MoefuseSFTTrainer.create_optimizer

    def spy(self, model=None):
        built.append(create(self, model))
        return built[-1]

    monkeypatch.setattr(MoefuseSFTTrainer, "create_optimizer", spy)
    return built


def test_default_optimizer_is_fused_adamw_and_the_run_says_so(tmp_path, built_optimizers, capsys):
    run_train(None, [*FEW_ROWS, "--max_steps", "1", "--output_dir", str(tmp_path / "a")])
    optimizer = built_optimizers[-1]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    out = capsys.readouterr().out
    assert "optimizer  adamw_torch_fused: PyTorch's fused AdamW (the default)" in out
    summary = json.loads((tmp_path / "a" / SUMMARY_FILE).read_text())
    assert summary["optim"] == "adamw_torch_fused"

    run_train(
        None, [*FEW_ROWS, "--max_steps", "1", "--optim", "adamw_torch", "--output_dir", str(tmp_path / "b")]
    )
    assert type(built_optimizers[-1]) is torch.optim.AdamW and not built_optimizers[-1].defaults["fused"]


def test_paged_8bit_adamw_stays_an_option(tmp_path, built_optimizers):
    bnb = pytest.importorskip("bitsandbytes")
    result = run_train(
        None,
        [*FEW_ROWS, "--max_steps", "4", "--logging_steps", "1", "--optim", "paged_adamw_8bit"]
        + ["--output_dir", str(tmp_path)],
    )
    optimizer = built_optimizers[-1]  # Transformers builds bitsandbytes' AdamW, paged, in 8 bits
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.is_paged and optimizer.args.optim_bits == 8
    assert result.losses[-1] < result.losses[0]


def _tiny_qwen3_moe() -> tuple[Qwen3MoeConfig, Qwen3MoeForCausalLM]:
    config = Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    return config, Qwen3MoeForCausalLM(config)


def test_lora_flops_with_and_without_checkpointing_match_a_hand_count():
    config, model = _tiny_qwen3_moe()
    h, q, kv, i, r, layers = 32, 4 * 8, 2 * 8, 16, 4, 2
    attention = h * q + 2 * h * kv + q * h + 2 * 8  # q, k, v, o and the q/k norms
    experts = 8 * 3 * h * i  # 8 experts; a token meets top-2 of them
    lora_attention = r * (h + q) + 2 * r * (h + kv) + r * (q + h)  # A [r, in] and B [out, r] of q, k, v, o
    frozen_layer = attention + 2 * h + 8 * h + experts * 2 / 8  # + norms, router
    head = h + 100 * h  # final norm, output head; the input embedding is a lookup
    model = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    n_layers = layers * (frozen_layer + lora_attention)
    n = n_layers + head
    n_trainable = layers * lora_attention

    plain = FlopsModel.of(model, config)
    assert plain.active_params == pytest.approx(n)
    assert plain.trainable_active_params == pytest.approx(n_trainable)
    assert plain.per_token == pytest.approx(
        4 * n + 2 * n_trainable
    )  # forward, activation grads, LoRA's grads
    assert plain.recompute_flops(10, 100) == 0
    width = layers * q
    assert plain.flops(10, 100) == pytest.approx((4 * n + 2 * n_trainable) * 10 + 12 * width * 100)

    checkpointed = FlopsModel.of(model, config, checkpointing=True)
    assert checkpointed.per_token == plain.per_token  # MFU leaves the recompute out
    # the second forward of each decoder layer: not of the output head
    assert checkpointed.recompute_per_token == pytest.approx(2 * n_layers)
    assert checkpointed.recompute_flops(10, 100) == pytest.approx(2 * n_layers * 10 + 4 * width * 100)


def test_qwen3_30b_a3b_lora_with_checkpointing_costs_about_23_gflop_a_token():
    """The issue's figure by count: 48 layers at Qwen3-30B-A3B dims, LoRA r16 on attention and every expert,
    2048-token sequences, with checkpointing (built on the meta device: nothing allocated)."""
    from moefuse.bench.configs import BUILTIN_CONFIGS
    from moefuse.lora import get_peft_model as moefuse_lora
    from moefuse.models import Qwen3MoeFusedForCausalLM

    fields = dict(BUILTIN_CONFIGS["qwen3-30b-a3b"])
    fields.pop("model_type")
    config = Qwen3MoeConfig(**fields)
    with torch.device("meta"):
        model = moefuse_lora(Qwen3MoeFusedForCausalLM(config), r=16)
    flops = FlopsModel.of(model, config, checkpointing=True)
    per_token = (flops.flops(2048, 2048**2) + flops.recompute_flops(2048, 2048**2)) / 2048
    assert 21e9 < per_token < 25e9
    assert 3.0e9 < flops.active_params < 3.6e9  # Qwen3-30B-A3B: "3B active"


def test_kernel_table_ranks_kernels_by_their_summed_time():
    kernels = [("gemm", 0, 3e6), ("norm", 3e6, 4e6), ("gemm", 4e6, 6e6), ("copy", 6e6, 6.5e6)]
    table = kernel_table(kernels, busy=6.5, top=2)
    assert [k["name"] for k in table] == ["gemm", "norm"]
    assert table[0] == {"name": "gemm", "calls": 2, "seconds": 5.0, "share": round(5 / 6.5, 4)}
    assert table[1]["calls"] == 1 and table[1]["seconds"] == 1.0


def test_busy_seconds_counts_overlapping_kernels_once():
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8), (10, 10)]) == pytest.approx(4.0)
    assert busy_seconds([]) == 0


def test_cpu_summary_reports_what_it_measured_and_why_not_the_rest(tmp_path, capsys):
    result = run_train(
        None, [*FEW_ROWS, "--max_steps", "6", "--logging_steps", "2", "--output_dir", str(tmp_path)]
    )
    totals = json.loads((tmp_path / SUMMARY_FILE).read_text())["throughput"]
    assert totals == json.loads(json.dumps(result.throughput))
    steady = totals["after_warmup"]
    assert steady["from_step"] == 2 and 0 < steady["tokens"] < totals["tokens"]
    assert "CPU" in totals["gpu_busy"]["not_measured"] and "CPU" in totals["memory"]["not_measured"]
    assert totals["flops_per_token"]["model"] > 0 and totals["flops_per_token"]["recompute"] == 0
    assert totals["triton_compiles"]["compiles"] == 0  # the interpreter compiles nothing
    assert steady["triton_compile_seconds"] == 0
    logs = totals["by_log"]
    assert [log["step"] for log in logs] == [2, 4, 6] and sum(log["tokens"] for log in logs) == totals[
        "tokens"
    ]
    assert all(log["seconds"] > 0 and log["tokens_per_second"] > 0 for log in logs)
    out = capsys.readouterr().out
    assert "tokens/s after warm-up" in out and "GPU busy   not measured: a CPU run" in out


def test_triton_compiles_are_counted_by_step_and_the_hooks_put_back(monkeypatch):
    """Triton calls its JIT hooks around each compile: the recorder puts each in the step in progress with its
    seconds, calls the hooks that were set before it (the cache hook's answer decides whether Triton compiles,
    so it passes that on), and puts them back when removed."""
    from triton import knobs

    earlier = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: earlier.append("cache") or None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: earlier.append("post"))
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    compiles = TritonCompiles()
    compiles.install()

    def compile_one():  # as Triton's JIT function does around a compile
        assert not knobs.runtime.jit_cache_hook(
            key="k", repr="r", fn=None, compile={}, is_manual_warmup=False
        )
        knobs.runtime.jit_post_compile_hook(key="k", repr="r", fn=None, compile={}, is_manual_warmup=False)

    compile_one()
    compiles.step = 7
    compile_one()
    compile_one()
    compiles.remove()
    compile_one()  # after removal: not counted
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
    assert earlier == ["cache", "post"] * 4
    record = compiles.record()
    assert record["compiles"] == 3 and [e["step"] for e in record["by_step"]] == [0, 7]
    assert [e["compiles"] for e in record["by_step"]] == [1, 2] and record["seconds"] >= 0


def test_compile_seconds_within_the_steady_window_leave_out_the_profiled_steps():
    compiles = TritonCompiles()
    compiles.by_step = {1: [80, 30.0], 6: [2, 1.5], 7: [1, 0.25], 23: [14, 12.0]}
    assert compiles.seconds_within(6) == pytest.approx(13.75)
    assert compiles.seconds_within(6, range(6, 8)) == pytest.approx(12.0)
    assert compiles.seconds_within(24) == 0


def test_the_summary_says_what_compiles_and_allocator_retries_cost():
    steady = {"tokens_per_second": 714.0, "from_step": 5, "seconds": 61.1, "triton_compile_seconds": 12.0}
    memory = {"peak_allocated_gib": 18.2, "peak_reserved_gib": 18.9, "alloc_retries": 42}
    memory["after_warmup"] = {"cuda_mallocs": 310, "cuda_frees": 305}
    text = "\n".join(
        _throughput_lines({"tokens_per_second": 456.0, "tokens": 1, "after_warmup": steady, "memory": memory})
    )
    assert "12.0 s went to Triton compiles" in text and "42 allocations retried" in text
    assert "310 cudaMalloc and 305 cudaFree calls after the warm-up" in text
    memory["after_warmup"] = {"cuda_mallocs": 2, "cuda_frees": 0}
    quiet = {**steady, "triton_compile_seconds": 0.0}
    text = "\n".join(
        _throughput_lines(
            {
                "tokens_per_second": 1.0,
                "tokens": 1,
                "after_warmup": quiet,
                "memory": {**memory, "alloc_retries": 0},
            }
        )
    )
    assert "Triton compiles" not in text and "retried" not in text and "cudaFree" not in text


def test_throughput_warmup_steps_moves_the_steady_window(tmp_path):
    result = run_train(
        None,
        [*FEW_ROWS, "--max_steps", "6", "--logging_steps", "1", "--throughput_warmup_steps", "3"]
        + ["--output_dir", str(tmp_path)],
    )
    assert result.throughput["after_warmup"]["from_step"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--gpu_busy_steps", "3"], "this run is on the CPU"),
        (["--host_profile_steps=-1"], "host_profile_steps: -1 must be 0"),
        (["--memory_cap_gib", "20"], "memory_cap_gib: 20.0: the cap is on GPU memory"),
        (["--step_in_backward", "true", "--max_grad_norm", "1.0"], "set max_grad_norm: 0"),
        (
            ["--step_in_backward", "true", "--gradient_accumulation_steps", "2"],
            "the step runs in every backward",
        ),
        (["--offload_activations", "true", "--activation_offloading", "true"], "set one"),
    ],
)
def test_keys_that_cannot_work_here_are_refused(tmp_path, overrides, message):
    if torch.cuda.is_available() and "CPU" in message.upper():
        pytest.skip("the refusal is for CPU runs")
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(")):
        run_train(None, [*overrides, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _history(run_dir) -> list[dict]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [log for log in history if "loss" in log]


def test_loss_metrics_kept_on_the_device_are_trls(tmp_path, monkeypatch):
    """The per-step loss, entropy, token accuracy, auxiliary loss and token count logged from the device once
    a log are those TRL's own compute_loss logs (which reads them on the host every micro-batch)."""
    common = [*FEW_ROWS, "--max_steps", "4", "--logging_steps", "2", "--gradient_accumulation_steps", "2"]
    run_train(None, [*common, "--output_dir", str(tmp_path / "deferred")])
    monkeypatch.setattr(MoefuseSFTTrainer, "_deferred_metrics_path", lambda *a: False)
    run_train(None, [*common, "--output_dir", str(tmp_path / "trl")])
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "aux_loss", "num_tokens")
    deferred, trl = _history(tmp_path / "deferred"), _history(tmp_path / "trl")
    assert len(deferred) == len(trl) == 2
    for ours, theirs in zip(deferred, trl, strict=True):
        assert set(keys) <= set(ours)
        assert {k: ours[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys}, rel=1e-5)


def test_packed_mask_is_transformers_own():
    config, _ = _tiny_qwen3_moe()
    config._attn_implementation = "sdpa"
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    embeds = torch.zeros(1, 10, 32)
    # No cache: Transformers 5.6 names it past_key_values, newer releases cache.
    parameters = inspect.signature(create_causal_mask).parameters
    no_cache = {"cache": None} if "cache" in parameters else {"past_key_values": None}
    expected = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=None, position_ids=position_ids, **no_cache
    )
    index = packed_sequence_index({"position_ids": position_ids})
    assert index.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]]
    assert torch.equal(packed_causal_mask(config, index, torch.float32), expected)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]], dtype=torch.int32)  # TRL's collator, on the CPU
    assert torch.equal(packed_causal_mask(config, seq_idx, torch.float32), expected)
    assert packed_sequence_index({"position_ids": position_ids, "attention_mask": torch.ones(1, 10)}) is None


def test_packed_rows_train_alike_with_the_prepared_mask(tmp_path, monkeypatch):
    common = [*FEW_ROWS, "--max_steps", "3", "--logging_steps", "1", "--packing", "true"]
    built = []
    make = trainer_module.packed_causal_mask
    monkeypatch.setattr(trainer_module, "packed_causal_mask", lambda *a: built.append(1) or make(*a))
    prepared = run_train(None, [*common, "--output_dir", str(tmp_path / "a")])
    assert built  # the decoder got the mask ready-made
    monkeypatch.setattr(trainer_module, "takes_prepared_mask", lambda config: False)
    own = run_train(None, [*common, "--output_dir", str(tmp_path / "b")])
    assert prepared.losses == pytest.approx(own.losses, rel=1e-5)


def _frozen_loss(result) -> float:
    """The first logged loss: the model before any step (B factors start at zero: the frozen base's loss)."""
    return result.losses[0]


@pytest.mark.parametrize(
    "optim",
    [
        "adamw_torch_fused",
        # torchao's low-bit AdamWs take their learning rate as a tensor, set in place
        pytest.param("adamw_torch_8bit", marks=pytest.mark.slow),
        pytest.param("adamw_torch_4bit", marks=pytest.mark.slow),
    ],
)
def test_step_in_backward_trains_like_the_usual_step(tmp_path, built_optimizers, optim):
    if optim != "adamw_torch_fused":
        pytest.importorskip("torchao")
    common = [*FEW_ROWS, "--max_steps", "6", "--logging_steps", "1", "--optim", optim]
    usual = run_train(None, [*common, "--max_grad_norm", "0", "--output_dir", str(tmp_path / "a")])
    in_backward = run_train(
        None, [*common, "--step_in_backward", "true", "--output_dir", str(tmp_path / "b")]
    )
    optimizer = built_optimizers[-1]
    assert isinstance(optimizer, LayerWiseDummyOptimizer)
    trainable = [p for p in in_backward.model.parameters() if p.requires_grad]
    assert set(map(id, optimizer.optimizer_dict)) == set(map(id, trainable))
    assert all(p.grad is None for p in trainable)  # each gradient freed as soon as its step used it
    assert in_backward.losses == pytest.approx(usual.losses, rel=1e-4)
    assert in_backward.losses[-1] < _frozen_loss(in_backward) - 0.1
    # the learning-rate schedule reached the per-tensor optimizers
    lrs = {float(o.param_groups[0]["lr"]) for o in optimizer.optimizer_dict.values()}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(3e-3)


def test_offload_activations_moves_saved_tensors_and_trains_alike(tmp_path, monkeypatch):
    copied, kept = [], []

    class RecordingOffload(trainer_module.OffloadSavedTensors):
        def __init__(self, device_type: str):
            super().__init__(device_type)
            pack = self.pack_hook

            def recording_pack(tensor):
                packed = pack(tensor)
                (kept if packed is tensor else copied).append(tensor)
                return packed

            self.pack_hook = recording_pack

    common = [*FEW_ROWS, "--max_steps", "4", "--logging_steps", "1"]
    plain = run_train(None, [*common, "--output_dir", str(tmp_path / "a")])
    monkeypatch.setattr(trainer_module, "OffloadSavedTensors", RecordingOffload)
    offloaded = run_train(
        None, [*common, "--offload_activations", "true", "--output_dir", str(tmp_path / "b")]
    )
    assert len(copied) > 100  # the tensors saved for the backward
    weights = [t for t in kept if isinstance(t if t._base is None else t._base, torch.nn.Parameter)]
    assert weights  # the weights autograd saves (or their transposes) stay in place
    assert not any(isinstance(t if t._base is None else t._base, torch.nn.Parameter) for t in copied)
    assert offloaded.losses == pytest.approx(plain.losses, rel=1e-5)
    assert offloaded.losses[-1] < _frozen_loss(offloaded)


def test_offloaded_tensors_come_back_with_their_values_and_strides():
    weight = torch.nn.Parameter(torch.randn(64, 48))
    x = torch.randn(48, 32).t().requires_grad_()  # saved non-contiguous
    packed = []
    hooks = trainer_module.OffloadSavedTensors("cpu", min_bytes=1024)
    pack = hooks.pack_hook
    hooks.pack_hook = lambda t: packed.append(pack(t)) or packed[-1]
    with hooks:
        y = (torch.nn.functional.linear(x, weight).sin() * x.sum()).sum()
    y.backward()
    grads = weight.grad.clone(), x.grad.clone()
    weight.grad = x.grad = None
    (torch.nn.functional.linear(x, weight).sin() * x.sum()).sum().backward()
    assert torch.equal(grads[0], weight.grad) and torch.equal(grads[1], x.grad)
    copies = [p[1] for p in packed if isinstance(p, tuple)]
    assert any(c.stride() == x.stride() and torch.equal(c, x) for c in copies)
    assert any(isinstance(p, torch.Tensor) and p._base is weight for p in packed)  # nor is a parameter's view
    assert all(c.numel() * c.element_size() >= 1024 for c in copies)  # nor a small tensor


@pytest.mark.parametrize(
    "keys, options",
    [
        ({"torch_compile": True, "gradient_checkpointing": True}, {"backend": "inductor", "mode": None}),
        (
            {
                "torch_compile_backend": "aot_eager",
                "torch_compile_mode": "max-autotune",
                "gradient_checkpointing": True,
            },
            {"backend": "aot_eager", "mode": "max-autotune"},
        ),
        (
            {"torch_compile": True, "gradient_checkpointing": False},
            None,
        ),  # the Trainer compiles the whole model
        ({"gradient_checkpointing": True}, None),
    ],
)
def test_compile_goes_below_the_checkpoints_only_with_checkpointing(tmp_path, keys, options):
    from trl import SFTConfig

    from moefuse.train.config import compile_below_checkpoints

    sft_config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **keys)
    compiled_by_trainer = sft_config.torch_compile
    assert compile_below_checkpoints(sft_config) == options
    # the Trainer's own compile is off where the layers compile, and untouched elsewhere
    assert sft_config.torch_compile == (compiled_by_trainer and options is None)
    if options is not None:
        assert sft_config.torch_compile_backend is None and sft_config.torch_compile_mode is None


@pytest.mark.slow
@pytest.mark.interpreter
def test_torch_compile_with_checkpointing_compiles_each_layer_below_its_checkpoint(tmp_path, monkeypatch):
    """With gradient checkpointing Dynamo would run every checkpointed layer eagerly (the checkpoint, traced as one
    operator, takes no graph break or side effect, and this stack's hooks make both): ``torch_compile`` compiles
    each layer's forward below its checkpoint instead. Graphs then hold moefuse's experts, and the losses are
    eager's."""
    import torch._dynamo.backends.registry as registry

    from moefuse.settings import override_settings

    registry.list_backends(exclude_tags=())  # the built-in backends are registered before one is wrapped
    aot_eager = registry.lookup_backend("aot_eager")
    graphs: list[list[str]] = []

    def recording(gm, example_inputs, **kwargs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return aot_eager(gm, example_inputs, **kwargs)

    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", recording)
    common = ["--max_samples", "8", "--max_steps", "1", "--logging_steps", "1", "--save_strategy", "no"]
    common += ["--save_base_model", "false", "--gradient_checkpointing", "true"]
    torch._dynamo.reset()
    try:
        with override_settings(backend="triton"):
            eager = run_train(None, [*common, "--output_dir", str(tmp_path / "a")])
            compiled = run_train(
                None,
                [*common, "--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
                + ["--output_dir", str(tmp_path / "b")],
            )
    finally:
        torch._dynamo.reset()
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert any(any("moefuse" in target for target in graph) for graph in graphs)
    setup = json.loads((tmp_path / "b" / SUMMARY_FILE).read_text())["setup"]
    assert setup["torch_compile"] and setup["compiled"] == "2 decoder layers, each below its checkpoint"
    assert json.loads((tmp_path / "a" / SUMMARY_FILE).read_text())["setup"]["compiled"] is None


def test_all_savers_together_with_checkpointing_still_train(tmp_path, capsys):
    result = run_train(
        None,
        [*FEW_ROWS, "--max_steps", "6", "--logging_steps", "1", "--step_in_backward", "true"]
        + [
            "--offload_activations",
            "true",
            "--gradient_checkpointing",
            "true",
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert result.losses[-1] < _frozen_loss(result) - 0.1
    out = capsys.readouterr().out
    assert "gradient checkpointing, optimizer step in backward, activations offloaded to CPU" in out
    assert result.throughput["flops_per_token"]["recompute"] > 0


@pytest.mark.slow
@pytest.mark.interpreter
def test_torch_compile_trains_to_eager_losses_and_moefuse_breaks_no_graph(tmp_path):
    """``torch_compile: true`` (the Trainer compiles the PEFT model; Dynamo's graphs run on ``aot_eager`` here) with
    moefuse's experts on the Triton path: eager's loss, and every graph break Dynamo logs is outside moefuse's
    source (TRL's, Transformers' and PEFT's are theirs to remove)."""
    import logging
    import re
    from pathlib import Path

    import moefuse
    from moefuse.settings import override_settings

    breaks: list[str] = []

    class Breaks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"Graph break in user code at (\S+):\d+", record.getMessage())
            if found:
                breaks.append(found[1])

    common = ["--max_samples", "16", "--max_steps", "1", "--logging_steps", "1"]
    common += ["--save_strategy", "no", "--save_base_model", "false"]
    logger = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    handler = Breaks()
    torch._dynamo.reset()
    with override_settings(backend="triton"):
        eager = run_train(None, [*common, "--output_dir", str(tmp_path / "a")])
        torch._logging.set_logs(graph_breaks=True)
        logger.addHandler(handler)
        try:
            compiled = run_train(
                None,
                [*common, "--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
                + ["--output_dir", str(tmp_path / "b")],
            )
        finally:
            logger.removeHandler(handler)
            torch._logging.set_logs()
            torch._dynamo.reset()
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert breaks  # the recorder sees Dynamo's breaks (TRL's, Transformers', PEFT's)
    source = str(Path(moefuse.__file__).parent)
    assert not [b for b in breaks if b.startswith(source)], breaks


@pytest.mark.gpu
@pytest.mark.parametrize(
    "attention, keys",
    [
        ("sdpa", []),
        ("moefuse_varlen", []),
        # QLoRA's memory without bitsandbytes' per-tensor syncs: torchao's 8-bit AdamW, one tensor at a time
        ("moefuse_varlen", ["--optim", "adamw_torch_8bit", "--step_in_backward", "true"]),
        # QLoRA with every saver its capped runs use: 4-bit experts, bitsandbytes' 4-bit attention, offload
        (
            "moefuse_varlen",
            ["--finetuning_type", "qlora", "--optim", "adamw_torch_4bit", "--step_in_backward", "true"]
            + ["--offload_activations", "true", "--lora_dtype", "model", "--gradient_checkpointing", "true"],
        ),
    ],
)
def test_a_step_after_warmup_waits_for_the_gpu_only_in_trls_loss(tmp_path, monkeypatch, attention, keys):
    """A few steps of the tiny built-in model on packed rows, then one whole step (forward, backward, clipping,
    optimizer, scheduler, callbacks) with every host sync recorded with its stack. TRL >= 1.0's fused LM head
    syncs inside TRL: it picks the scored positions with a boolean mask, and the load-balancing loss it calls counts
    experts with ``torch.bincount``. No other code may: not moefuse's ops, the model, PEFT, the loss's metrics (kept
    on the device by MoefuseSFTTrainer), the Trainer's loop, clipping, the optimizer or the callbacks. A sync in the
    backward pass belongs to the forward call that built its autograd node (kept by anomaly mode)."""
    from contextlib import ExitStack

    if any(key.startswith("adamw_torch_") for key in keys):
        pytest.importorskip("torchao")
    if "qlora" in keys:
        pytest.importorskip("bitsandbytes")

    from transformers import TrainerCallback

    from moefuse.bench.measure import format_sync_site, recorded_syncs, sync_owner

    recorded = []

    class RecordSyncs(TrainerCallback):
        def __init__(self):
            self.stack = ExitStack()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                torch.cuda.synchronize()
                # anomaly mode keeps each autograd node's forward call: a sync in the backward names its owner
                self.stack.enter_context(torch.autograd.set_detect_anomaly(True, check_nan=False))
                recorded.append(self.stack.enter_context(recorded_syncs()))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                self.stack.close()

    original = MoefuseSFTTrainer.__init__

    def with_recorder(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(RecordSyncs())

    monkeypatch.setattr(MoefuseSFTTrainer, "__init__", with_recorder)
    run_train(
        None,
        [*FEW_ROWS, "--max_steps", "8", "--logging_steps", "4", "--packing", "true"]
        + ["--attn_implementation", attention, "--gpu_busy_steps", "0", "--output_dir", str(tmp_path), *keys],
    )
    assert len(recorded) == 1
    outside_trl = [stack for stack in recorded[0] if f"{os.sep}trl{os.sep}" not in sync_owner(stack)]
    assert not outside_trl, "host syncs outside TRL's loss:\n" + "\n".join(map(format_sync_site, outside_trl))


def test_host_profile_lists_the_functions_of_its_steps_and_leaves_them_out(tmp_path, capsys):
    run_train(
        None,
        [*FEW_ROWS, "--max_steps", "8", "--logging_steps", "2", "--host_profile_steps", "2"]
        + ["--output_dir", str(tmp_path)],
    )
    totals = json.loads((tmp_path / SUMMARY_FILE).read_text())["throughput"]
    host = totals["host_profile"]
    assert host["steps"] == [3, 4] and host["wall_seconds"] > 0  # right after the warm-up's log at step 2
    functions = host["functions"]
    own = [f["own_seconds"] for f in functions]
    assert own == sorted(own, reverse=True) and all(f["calls"] > 0 for f in functions)
    assert all(f["cumulative_seconds"] >= f["own_seconds"] for f in functions)
    assert sum(f["own_share"] for f in functions) <= 1.0
    # the profiled steps are left out of the steady figures: the logs at steps 6 and 8 make them up
    logs = {log["step"]: log["tokens"] for log in totals["by_log"]}
    assert totals["after_warmup"]["tokens"] == logs[6] + logs[8]
    assert functions[0]["name"][-70:] in capsys.readouterr().out  # the summary names the top functions


@pytest.mark.gpu
def test_gpu_busy_profiles_steps_and_lists_their_kernels(tmp_path, capsys):
    run_train(
        None,
        [*FEW_ROWS, "--max_steps", "6", "--logging_steps", "2", "--gpu_busy_steps", "2"]
        + ["--output_dir", str(tmp_path)],
    )
    throughput = json.loads((tmp_path / SUMMARY_FILE).read_text())["throughput"]
    busy = throughput["gpu_busy"]
    first, last = busy["steps"]
    steady = throughput["memory"]["after_warmup"]  # the allocator's calls to the driver after the warm-up
    assert steady["cuda_mallocs"] >= 0 and steady["cuda_frees"] >= 0
    assert 0 < busy["fraction"] <= 1 and last - first == 1
    kernels = busy["kernels"]
    assert kernels and all(k["calls"] > 0 and 0 < k["share"] for k in kernels)
    assert [k["seconds"] for k in kernels] == sorted((k["seconds"] for k in kernels), reverse=True)
    assert kernels[0]["name"][:70] in capsys.readouterr().out  # the summary names the top kernels
