"""``moefuse train``: the built-in default end to end, resume, saved adapters and models, and clear refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moefuse
from conftest import current_orientation, tiny_config, trained_precision
from moefuse import cli
from moefuse.bench import configs as bench_configs
from moefuse.bench.provenance import source_provenance
from moefuse.convert.checkpoint import CheckpointError
from moefuse.convert.lora import adapter_layout, convert_lora
from moefuse.ops.cross_entropy import causal_lm_loss
from moefuse.train import TrainConfigError, run_train
from moefuse.train.builtin import DATASET, TOKENIZER_DIR, build_dataset, build_tokenizer
from moefuse.train.callbacks import FlopsModel, _batch_counts
from moefuse.train.config import parse_train_args, trl_fused_lm_head
from moefuse.train.data import to_sft_format
from moefuse.train.model import apply_lora, draw_lora_a, load_model, resolve_model
from moefuse.train.run import SUMMARY_FILE

# The built-in default, shortened; everything else as `moefuse train` runs it.
SHORT = ["--max_steps", "20", "--logging_steps", "5", "--save_steps", "1000"]
# Runs that test the plumbing, not the learning: a slice of the dataset tokenizes faster.
FEW_ROWS = ["--max_samples", "48"]


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    return run_train(None, [*SHORT, "--output_dir", str(out)])


def test_default_run_loss_falls_and_writes_everything(default_run):
    result = default_run
    assert result.global_step == 20
    assert len(result.losses) == 4
    assert result.losses[-1] < result.losses[0] - 1.0, result.losses
    assert result.throughput["tokens"] > 0 and result.throughput["tokens_per_second"] > 0
    base = result.model.get_base_model() if hasattr(result.model, "get_base_model") else result.model
    if not trl_fused_lm_head():  # TRL >= 1.0 computes the loss itself (test below)
        assert base.loss_function is causal_lm_loss  # chunked_loss is on by default
    norms = [m for m in base.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    assert norms and all("forward" in vars(m) for m in norms)  # fused_norm is on by default
    steady = result.throughput["after_warmup"]  # 4 logs: the last 3 intervals' tokens
    assert (
        0 < steady["tokens"] < result.throughput["tokens"]
        and steady["seconds"] < result.throughput["seconds"]
    )
    summary = json.loads((result.output_dir / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 20 and summary["losses"] == result.losses
    # the run names the commit it ran (this checkout's) and the device, by itself
    assert summary["environment"]["moefuse_commit"].startswith(source_provenance()["commit"])
    assert summary["environment"]["device"] == "cpu"
    # and the step it measured: enough to rerun it and compare like for like
    setup = summary["setup"]  # the built-in default's step (train-default.yaml)
    assert (setup["per_device_train_batch_size"], setup["max_length"], setup["torch_compile"]) == (
        8,
        128,
        False,
    )
    assert setup["attn_implementation"] is not None
    assert setup["attn_implementation"] == result.model.config._attn_implementation
    assert setup["packed_sequences"] is None  # the default does not pack
    # tokens/s is in every training log, also in the saved history
    history = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert all("tokens_per_second" in log for log in history if "loss" in log)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (result.final_dir / name).is_file()
    assert (result.output_dir / "base-model" / "config.json").is_file()


def test_per_expert_adapter_holds_the_trained_factors(default_run):
    fused_file = default_run.final_dir / "adapter_model.safetensors"
    per_expert_file = default_run.per_expert_adapter / "adapter_model.safetensors"
    with safe_open(fused_file, "pt") as fused, safe_open(per_expert_file, "pt") as per_expert:
        name = "base_model.model.model.layers.1.mlp.experts.down_proj.lora_B.weight"
        stacked = fused.get_tensor(name)
        assert stacked.shape == (16, 64, 8) and stacked.abs().sum() > 0  # trained: B starts at zero
        for e in (0, 7, 15):
            expert = per_expert.get_tensor(name.replace("experts.", f"experts.{e}."))
            assert torch.equal(expert, stacked[e])
        assert not any(".experts.down_proj." in key for key in per_expert.keys())


def test_saved_adapter_reloads_to_the_same_outputs(default_run):
    trained = default_run.model.eval()
    base = moefuse.Qwen3MoeFusedForCausalLM.from_pretrained(default_run.base_model).to(trained.device)
    reloaded = PeftModel.from_pretrained(base, default_run.final_dir).eval()
    ids = _ids().to(trained.device)
    with torch.no_grad(), trained_precision(trained):
        expected = trained(input_ids=ids).logits.float()
        got = reloaded(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with reloaded.disable_adapter(), torch.no_grad(), trained_precision(trained):
        assert not torch.allclose(reloaded(input_ids=ids).logits.float(), expected, atol=1e-3)


def test_resume_continues_from_the_saved_step(tmp_path):
    common = [*FEW_ROWS, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"]
    first = run_train(None, [*common, "--output_dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "checkpoint-2").is_dir()
    resumed = run_train(
        None,
        [
            *common,
            "--output_dir",
            str(tmp_path / "b"),
            "--resume_from_checkpoint",
            str(tmp_path / "a" / "checkpoint-2"),
        ],
    )
    assert resumed.global_step == 4
    history = json.loads((tmp_path / "b" / "trainer_state.json").read_text())["log_history"]
    assert [log["step"] for log in history if "loss" in log] == [1, 2, 3, 4]
    # steps 3 and 4 after the resume are the uninterrupted run's steps 3 and 4
    assert resumed.losses[2:] == pytest.approx(first.losses[2:], rel=1e-5)
    assert resumed.losses[:2] == pytest.approx(first.losses[:2], rel=1e-5)  # carried over from the checkpoint


def test_resume_true_takes_the_last_checkpoint(tmp_path):
    common = [*FEW_ROWS, "--save_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path)]
    run_train(None, [*common, "--max_steps", "2"])
    resumed = run_train(None, [*common, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    assert resumed.global_step == 3 and len(resumed.losses) == 3


def test_full_finetuning_saves_a_per_expert_model(tmp_path):
    result = run_train(
        None,
        [
            "--finetuning_type",
            "full",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-3",
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert result.final_dir.name == "model" and result.per_expert_adapter is None
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    with safe_open(next(result.final_dir.glob("*.safetensors")), "pt") as f:
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in f.keys()  # the Hub layout
    reloaded = (
        moefuse.Qwen3MoeFusedForCausalLM.from_pretrained(result.final_dir).to(result.model.device).eval()
    )
    ids = _ids().to(result.model.device)
    with torch.no_grad(), trained_precision(result.model):
        expected = result.model.eval()(input_ids=ids).logits.float()
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), expected)


def test_cli_runs_the_default_and_prints_the_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert cli.main(["train", *FEW_ROWS, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "moefuse train: done" in out and str(tmp_path / "adapter-per-expert") in out
    assert "vllm serve" in out and "PeftModel.from_pretrained" in out
    assert torch.get_num_threads() == threads  # the default's cpu_threads: 1 lasts for the run only


def test_summary_offers_no_loading_without_a_saved_base_or_checkpoints(tmp_path, capsys):
    args = [*FEW_ROWS, "--max_steps", "2", "--save_strategy", "no", "--save_base_model", "false"]
    assert cli.main(["train", *args, "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the random base this adapter was trained on is gone" in out
    assert "from_pretrained" not in out and "vllm serve" not in out and "Checkpoints" not in out


def test_cli_help_lists_the_keys(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--model_name_or_path", "--finetuning_type", "--expert_lora_rank", "--ep_size", "SFTConfig"):
        assert key in out


def _write_config(tmp_path, config) -> str:
    path = tmp_path / "model-config"
    config.save_pretrained(path)
    return f"config:{path}"


def _bad_dataset(tmp_path) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    return str(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--lora_r", "8"], "unknown key 'lora_r' (did you mean 'lora_rank'?)"),
        (["--dataset", "no/such/rows.jsonl"], "no such file"),
        (["--dataset", "{bad_dataset}"], "expected 'messages'"),
        (["--model_name_or_path", "{llama}"], "not a Mixture-of-Experts model"),
        (["--model_name_or_path", "config:no-such-model"], "neither a built-in config"),
        (
            ["--finetuning_type", "qlora", "--experts_implementation", "grouped_mm"],
            "qlora needs experts_implementation",
        ),
        (["--finetuning_type", "prefix"], "not one of lora, full, qlora"),
        (["--ep_size", "2"], "expert parallelism is not wired into moefuse train"),
        (["--resume_from_checkpoint", "true"], "holds no checkpoint"),
        (["--eval_strategy", "steps"], "needs an evaluation set"),
        (["--config_overrides", '{"no_such_field": 1}'], "have no field 'no_such_field'"),
        (["--num_layers", "9"], "num_layers: 9 must be between 1"),
        (["--lora_dtype", "bfloat16"], "lora_dtype: 'bfloat16'; choose one of float32, model"),
        (
            ["--model_name_or_path", "config:gpt-oss-20b", "--fused_rope", "true"],
            "not model type 'gpt_oss'; set fused_rope: false",
        ),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, overrides, message):
    llama = _write_config(tmp_path, LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1))
    overrides = [
        o.replace("{llama}", llama).replace("{bad_dataset}", _bad_dataset(tmp_path)) for o in overrides
    ]
    out = tmp_path / "out"
    with pytest.raises(TrainConfigError) as error:
        run_train(None, [*overrides, "--output_dir", str(out)])
    assert message in str(error.value)
    assert not out.exists()  # refused before the Trainer made anything


def test_moefuse_loss_runs_exactly_where_trl_calls_the_model_loss(tmp_path, monkeypatch):
    """TRL >= 1.0's fused LM head never reaches the model's loss: moefuse's cross-entropy kernel runs 0 times
    there (and the run says so); with an older TRL it computes every step's loss."""
    from moefuse.ops import cross_entropy

    calls = []
    rows = cross_entropy.cross_entropy_rows
    monkeypatch.setattr(cross_entropy, "cross_entropy_rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    run_train(None, ["--max_steps", "2", *FEW_ROWS, "--output_dir", str(tmp_path / "out")])
    assert (len(calls) == 0) is trl_fused_lm_head()


def test_chunked_loss_is_refused_where_trl_computes_the_loss(tmp_path):
    if not trl_fused_lm_head():
        pytest.skip("this TRL computes the loss through the model: chunked_loss applies")
    with pytest.raises(TrainConfigError, match="fused LM head"):
        parse_train_args(None, ["--chunked_loss", "true", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    "versions, refused",
    [
        ({"peft": "0.18.1", "torchao": "0.18.0"}, True),
        ({"peft": "0.18.1", "torchao": "0.17.0"}, False),
        ({"peft": "0.19.0", "torchao": "0.18.0"}, False),
        ({"peft": "0.18.1"}, False),  # torchao not installed
    ],
)
def test_lora_beside_a_torchao_old_peft_cannot_import_is_refused(tmp_path, monkeypatch, versions, refused):
    import importlib.metadata

    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    keys = ["--output_dir", str(tmp_path / "out")]
    if refused:
        with pytest.raises(TrainConfigError, match=r"PEFT 0.18.1 cannot apply LoRA beside torchao 0.18.0"):
            parse_train_args(None, keys)
    else:
        parse_train_args(None, keys)
    parse_train_args(None, [*keys, "--finetuning_type", "full"])  # no LoRA, no PEFT layer


def test_unknown_key_in_a_yaml_names_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: config:tiny\ndataset: {DATASET}\nlearning_rat: 1.0e-4\n")
    with pytest.raises(
        TrainConfigError, match=r"run.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'"
    ):
        parse_train_args(config)


def test_yaml_values_and_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: config:tiny\ndataset: {DATASET}\nlearning_rate: 1e-4\nmax_steps: 7\n"
        "report_to: [tensorboard]\n"
    )
    args, sft = parse_train_args(config, ["--max_steps", "3", "--expert_lora_rank=16"])
    assert sft.learning_rate == 1e-4 and isinstance(sft.learning_rate, float)  # YAML's "1e-4" is a string
    assert sft.max_steps == 3 and args.expert_lora_rank == 16 and sft.report_to == ["tensorboard"]
    # moefuse's defaults: no checkpointing, bf16 where the GPU has it
    assert sft.gradient_checkpointing is False
    assert sft.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    args = [
        "train",
        "--finetuning_type",
        "qlora",
        "--experts_implementation",
        "eager",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moefuse train: finetuning_type: qlora") and "\n" not in err


def test_expert_lora_rank_and_alpha_reach_the_experts(tmp_path):
    args, sft_config = parse_train_args(
        None, ["--lora_rank", "4", "--expert_lora_rank", "8", "--output_dir", "unused"]
    )
    model = apply_lora(
        load_model(resolve_model(args, sft_config), torch.float32, torch.device("cpu")), args, tmp_path
    )
    shapes = {
        n.split("layers.0.")[1]: tuple(p.shape) for n, p in model.named_parameters() if "layers.0." in n
    }
    assert shapes["self_attn.q_proj.lora_A.default.weight"] == (4, 64)
    # "all": gate and up together (one A for both, PEFT target_parameters' LoRA), and down
    assert shapes["mlp.experts.gate_up_proj.lora_A.default.weight"] == (16, 8, 64)
    assert shapes["mlp.experts.gate_up_proj.lora_B.default.weight"] == (16, 64, 8)
    assert shapes["mlp.experts.down_proj.lora_B.default.weight"] == (16, 64, 8)
    experts = model.base_model.model.model.layers[0].mlp.experts
    # the experts keep the attention's alpha/rank ratio (2) unless expert_lora_alpha says otherwise
    assert experts.scaling["default"] == {"gate_up_proj": 2.0, "down_proj": 2.0}


@pytest.mark.parametrize("experts", ["moefuse", "grouped_mm"])
def test_lora_dtype_model_trains_the_adapter_in_the_weights_dtype(tmp_path, experts):
    """bf16 weights: the adapter in float32 by default (PEFT's), in bf16 with lora_dtype: model, on moefuse's
    experts and on Transformers' alike; the bf16 adapter trains and is saved in bf16."""
    bf16 = ["--dtype", "bfloat16", "--experts_implementation", experts, "--learning_rate", "0.01"]
    result = run_train(
        None,
        [*FEW_ROWS, *bf16, "--lora_dtype", "model", "--max_steps", "6", "--logging_steps", "3"]
        + ["--output_dir", str(tmp_path)],
    )
    trainable = {p.dtype for p in result.model.parameters() if p.requires_grad}
    assert trainable == {torch.bfloat16}
    assert result.losses[-1] < result.losses[0], result.losses
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    setup = json.loads((result.output_dir / SUMMARY_FILE).read_text())["setup"]
    assert setup["lora_dtype"] == "model"

    args, sft_config = parse_train_args(None, [*bf16, "--output_dir", "unused"])
    model = apply_lora(
        load_model(resolve_model(args, sft_config), torch.bfloat16, torch.device("cpu")), args, tmp_path
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_fused_rope_applies_through_training_only_and_keeps_the_losses(tmp_path, monkeypatch):
    """``--fused_rope true`` sends Qwen3-MoE's rotary embeddings through moefuse's function while training (on this
    CPU's PyTorch path: Transformers' formula, so the losses are the same to the bit), and puts the modeling
    code's own back afterwards."""
    import sys

    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from moefuse.ops import rope

    own = modeling_qwen3_moe.apply_rotary_pos_emb
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return rope.rope_reference(*args, **kwargs)

    monkeypatch.setattr(rope, "apply_rotary_pos_emb", counted)
    runs = {}
    for on in ("false", "true"):
        runs[on] = run_train(
            None,
            [*FEW_ROWS, "--max_steps", "3", "--logging_steps", "1", "--fused_rope", on]
            + ["--output_dir", str(tmp_path / on)],
        )
        assert bool(calls) == (on == "true")
    assert runs["true"].losses == runs["false"].losses
    assert sys.modules[own.__module__].apply_rotary_pos_emb is own
    summary = json.loads((runs["true"].output_dir / SUMMARY_FILE).read_text())
    assert summary["setup"]["fused_rope"] is True


def _family_config(family: str):
    """A tiny config of ``family`` that the built-in tokenizer's 512 words fit."""
    config = tiny_config(family, num_experts=8)
    config.vocab_size = 512
    return config


@pytest.mark.parametrize("finetuning_type", ["lora", "qlora"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gemma4_text"])
def test_every_family_with_plain_gated_experts_trains_lora_on_moefuse(tmp_path, family, finetuning_type):
    """The experts' structure decides what moefuse train takes, not a list of model types: Qwen2-MoE's shared
    expert, DeepSeek-V3's dense first layer and grouped router, Gemma 4's GeGLU experts on the decoder layer;
    with QLoRA their experts are moefuse's 4-bit stacks."""
    if finetuning_type == "qlora":
        pytest.importorskip("bitsandbytes")
    _family_config(family).save_pretrained(tmp_path / "config")
    result = run_train(
        None,
        [*FEW_ROWS, "--model_name_or_path", f"config:{tmp_path / 'config'}", "--max_steps", "2"]
        + [
            "--finetuning_type",
            finetuning_type,
            "--logging_steps",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.global_step == 2 and all(math.isfinite(loss) for loss in result.losses)
    experts_lora = [
        n for n, p in result.model.named_parameters() if p.requires_grad and ".experts." in n and "lora_" in n
    ]
    assert experts_lora, "no LoRA on the experts"
    assert (result.per_expert_adapter / "adapter_model.safetensors").is_file()
    if finetuning_type == "qlora":
        from moefuse.quant import is_4bit

        stacks = [
            m.get_base_layer().down_proj for n, m in result.model.named_modules() if n.endswith(".experts")
        ]
        assert stacks and all(is_4bit(stack) for stack in stacks)


@pytest.mark.parametrize("name", sorted(bench_configs.BUILTIN_CONFIGS))
def test_every_builtin_config_trains_at_tiny_dims(tmp_path, name):
    """Each built-in config (``moefuse bench --config``'s names: Qwen3-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V3's
    latent attention and expert groups, Moonlight, Qwen3.5-MoE's linear attention, Gemma 4) at the sizes of
    ``tiny_config`` and two layers (DeepSeek-V3's: its dense first layers and one MoE layer): one LoRA step of
    moefuse train."""
    _, config = bench_configs.load_config(name)
    layers = max(
        2, (getattr(config, "first_k_dense_replace", None) or 0) + 1
    )  # DeepSeek-V3's first are dense
    bench_configs.with_layers(bench_configs.tiny_config(config), layers).save_pretrained(tmp_path / "config")
    attention = (
        ["--attn_implementation", "eager"] if config.model_type == "gpt_oss" else []
    )  # sinks: eager only
    result = run_train(
        None,
        ["--max_samples", "8", "--model_name_or_path", f"config:{tmp_path / 'config'}", "--max_steps", "1"]
        + [
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            *attention,
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.global_step == 1 and all(math.isfinite(loss) for loss in result.losses)
    assert any(
        ".experts." in n and "lora_" in n for n, p in result.model.named_parameters() if p.requires_grad
    )


def test_gpt_oss_experts_train_lora_on_gate_up_proj(tmp_path):
    """GPT-OSS's experts (biases, interleaved gate/up rows, a clamped SwiGLU) take LoRA on gate_up_proj and
    down_proj, lora_target all's (on the CPU composed; fused on the Triton path). A standalone conversion that
    would split the adapter's gate_up_proj LoRA into gate and up is refused, its base model read from the adapter
    config; the formats that keep it whole are written."""
    _family_config("gpt_oss").save_pretrained(tmp_path / "config")
    result = run_train(
        None,
        [*FEW_ROWS, "--model_name_or_path", f"config:{tmp_path / 'config'}", "--max_steps", "2"]
        + [
            "--attn_implementation",
            "eager",
            "--adapter_format",
            "vllm_3d",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.global_step == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert any(".experts.gate_up_proj.lora_B" in n for n, _ in result.model.named_parameters())
    # gate and up rows interleave: no per-expert gate_proj/up_proj copy; PEFT's (vLLM's) 3-D format holds it whole
    assert result.per_expert_adapter is None
    assert adapter_layout(result.adapter_in_format) == "peft_target_parameters"
    for layout in ("per_expert", "qwen3_moe_fused"):
        with pytest.raises(CheckpointError, match=r"model type 'gpt_oss'\) interleaves gate and up rows"):
            convert_lora(result.adapter_in_format, tmp_path / layout, layout, progress=False)
        assert not (tmp_path / layout).exists()
    convert_lora(result.adapter_in_format, tmp_path / "fused", "fused", progress=False)
    assert adapter_layout(tmp_path / "fused") == "fused"


def test_gpt_oss_experts_train_qlora_and_reload(tmp_path):
    """QLoRA on GPT-OSS: its expert stacks (stored transposed) become moefuse's 4-bit ones, its biases stay dense,
    LoRA reaches gate_up_proj and down_proj; the saved 4-bit base and adapter reload to the trained outputs."""
    pytest.importorskip("bitsandbytes")
    from moefuse.quant import from_pretrained, is_4bit

    _family_config("gpt_oss").save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    result = run_train(
        None,
        [*FEW_ROWS, "--model_name_or_path", f"config:{tmp_path / 'config'}", "--max_steps", "2"]
        + ["--attn_implementation", "eager", "--finetuning_type", "qlora", "--output_dir", str(out)],
    )
    assert result.global_step == 2 and all(math.isfinite(loss) for loss in result.losses)
    experts = [m.get_base_layer() for n, m in result.model.named_modules() if n.endswith(".experts")]
    assert experts and all(is_4bit(e.gate_up_proj) and is_4bit(e.down_proj) for e in experts)
    assert all(not is_4bit(e.gate_up_proj_bias) for e in experts)
    assert any(".experts.gate_up_proj.lora_B" in n for n, _ in result.model.named_parameters())

    trained = result.model.eval()
    reloaded = PeftModel.from_pretrained(
        from_pretrained(out / "base-model", device=trained.device), out / "adapter"
    )
    with torch.no_grad(), trained_precision(trained):
        torch.testing.assert_close(reloaded(_ids()).logits, trained(_ids()).logits, rtol=0, atol=0)


def test_experts_moefuse_cannot_take_are_refused_before_loading(tmp_path):
    _family_config("gpt_oss").save_pretrained(tmp_path / "config")
    argv = [
        *FEW_ROWS,
        "--model_name_or_path",
        f"config:{tmp_path / 'config'}",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(
        TrainConfigError,
        match=r"so LoRA on gate_proj and up_proj apart cannot be placed; target gate_up_proj",
    ):
        run_train(
            None, [*argv, "--attn_implementation", "eager", "--lora_target", "gate_proj,up_proj,down_proj"]
        )
    with pytest.raises(TrainConfigError, match=r"adapter_format: per_expert splits gate_up_proj's LoRA"):
        run_train(None, [*argv, "--attn_implementation", "eager", "--adapter_format", "per_expert"])
    # the config's attention is Transformers' to refuse, in one line naming the key
    with pytest.raises(TrainConfigError, match="Transformers cannot build this model: GptOssForCausalLM"):
        run_train(None, argv)
    assert not (tmp_path / "o").exists()


def test_grouped_mm_baseline_trains_experts_through_peft_target_parameters(tmp_path):
    result = run_train(
        None,
        [
            *FEW_ROWS,
            "--experts_implementation",
            "grouped_mm",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert result.global_step == 2
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts.lora_A." in n for n in trainable)
    assert type(result.model.get_base_model()) is Qwen3MoeForCausalLM
    assert result.per_expert_adapter is None  # PEFT's own expert LoRA: nothing fused to convert


def _trained_on_grouped_mm(output_dir: Path, *keys: str):
    """Two steps of LoRA on Transformers' grouped_mm experts (PEFT's target_parameters there)."""
    return run_train(
        None,
        [*FEW_ROWS, *keys, "--max_steps", "2", "--experts_implementation", "grouped_mm"]
        + ["--output_dir", str(output_dir)],
    )


@current_orientation  # PEFT < 0.19.1 saves target_parameters in the orientation moefuse refuses
def test_goes_on_training_a_target_parameters_adapter_and_saves_it_in_any_format(tmp_path):
    """An adapter Transformers + PEFT trained (target_parameters on the stacked experts) goes on training on
    moefuse's experts (converted to the fused layout first) and is saved again in vLLM's 3-D format. At learning
    rate 0 the adapter leaves training unchanged, so the saved copy is the first adapter bit for bit: the run
    started from its weights."""
    first = _trained_on_grouped_mm(tmp_path / "a")
    assert adapter_layout(first.final_dir) == "peft_target_parameters"
    again = [*FEW_ROWS, "--max_steps", "2", "--adapter_name_or_path", str(first.final_dir)]
    second = run_train(
        None,
        [*again, "--learning_rate", "0", "--adapter_format", "vllm_3d", "--output_dir", str(tmp_path / "b")],
    )
    assert adapter_layout(tmp_path / "b" / "adapter-start") == adapter_layout(second.final_dir) == "fused"
    assert second.adapter_in_format == tmp_path / "b" / "adapter-vllm_3d"
    with (
        safe_open(first.final_dir / "adapter_model.safetensors", "pt") as before,
        safe_open(second.adapter_in_format / "adapter_model.safetensors", "pt") as after,
    ):
        assert set(before.keys()) == set(after.keys())
        for key in before.keys():
            assert torch.equal(before.get_tensor(key), after.get_tensor(key)), key
    # and it trains: at a learning rate the experts' factors move
    third = run_train(None, [*again, "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "c")])
    with safe_open(third.final_dir / "adapter_model.safetensors", "pt") as moved:
        key = next(k for k in moved.keys() if ".experts.gate_up_proj.lora_B" in k)
        assert moved.get_tensor(key).abs().sum() > 0  # PEFT starts B at zero; training moved it


@current_orientation
def test_one_adapter_trains_to_the_same_losses_on_moefuse_and_on_grouped_mm(tmp_path):
    """lora_target all is the same adapter on moefuse's experts and on Transformers' (gate and up together, one A;
    PEFT's target_parameters there): from one starting adapter, with the same seed and rows, the two give the same
    losses step after step (fp32, CPU)."""
    lr = ["--learning_rate", "1e-2", "--logging_steps", "1"]
    start = _trained_on_grouped_mm(tmp_path / "s", *lr)
    losses, setups = {}, {}
    for implementation in ("grouped_mm", "moefuse"):
        result = run_train(
            None,
            [*FEW_ROWS, *lr, "--max_steps", "6", "--adapter_name_or_path", str(start.final_dir)]
            + ["--experts_implementation", implementation, "--output_dir", str(tmp_path / implementation)],
        )
        losses[implementation] = torch.tensor(result.losses)
        setups[implementation] = json.loads((result.output_dir / SUMMARY_FILE).read_text())["setup"]
    assert setups["moefuse"]["trainable_parameters"] == setups["grouped_mm"]["trainable_parameters"] > 0
    assert setups["moefuse"]["attn_implementation"] == setups["grouped_mm"]["attn_implementation"]
    assert len(losses["moefuse"]) == 6 and not torch.equal(losses["moefuse"][0], losses["moefuse"][-1])
    torch.testing.assert_close(losses["moefuse"], losses["grouped_mm"], rtol=1e-4, atol=0)


@current_orientation
def test_one_seed_starts_both_experts_implementations_from_one_adapter(tmp_path):
    """A new adapter's A factors are drawn by their place in the model (draw_lora_a): with one seed, moefuse's
    experts LoRA and PEFT's target_parameters on Transformers' experts start from the same factors (PEFT's own
    draws differ: it consumes the global stream in another order), so from scratch the two train to the same
    losses step after step (fp32, CPU). Another seed draws other factors."""
    parsed = {
        impl: parse_train_args(None, ["--experts_implementation", impl, "--output_dir", "unused"])
        for impl in ("moefuse", "grouped_mm")
    }
    args = {impl: train_args for impl, (train_args, _) in parsed.items()}
    factors = {}
    for impl, seed in [("moefuse", 0), ("grouped_mm", 0), ("grouped_mm", 1)]:
        model = apply_lora(
            load_model(resolve_model(*parsed[impl]), torch.float32, torch.device("cpu")),
            args[impl],
            tmp_path,
            seed,
        )
        params = dict(model.named_parameters())
        experts = "base_model.model.model.layers.1.mlp.experts"
        gate_up = (
            params[f"{experts}.gate_up_proj.lora_A.default.weight"]
            if impl == "moefuse"
            else params[f"{experts}.base_layer.lora_A.default.weight"].reshape(16, 8, -1)
        )
        q = params["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
        factors[impl, seed] = (gate_up.detach().clone(), q.detach().clone())
        # every factor drawn again, the same ones on both sides: four attention projections and two expert
        # stacks a layer
        assert draw_lora_a(model, seed) == 6 * model.config.num_hidden_layers
    for same, other in zip(factors["moefuse", 0], factors["grouped_mm", 0], strict=True):
        assert torch.equal(same, other)
    assert not torch.equal(factors["grouped_mm", 0][0], factors["grouped_mm", 1][0])
    lr = ["--learning_rate", "1e-2", "--logging_steps", "1", "--max_steps", "5"]
    losses = {
        impl: torch.tensor(
            run_train(
                None, [*FEW_ROWS, *lr, "--experts_implementation", impl, "--output_dir", str(tmp_path / impl)]
            ).losses
        )
        for impl in ("moefuse", "grouped_mm")
    }
    assert not torch.equal(losses["moefuse"][0], losses["moefuse"][-1])
    torch.testing.assert_close(losses["moefuse"], losses["grouped_mm"], rtol=1e-5, atol=0)


def test_an_adapter_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path, capsys):
    first = run_train(None, [*FEW_ROWS, "--max_steps", "1", "--output_dir", str(tmp_path / "a")])
    bad = tmp_path / "bad"
    shutil.copytree(first.final_dir, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(k for k in tensors if "self_attn.q_proj.lora_A" in k)
    tensors[name] = tensors[name][:, :-1].contiguous()  # one input column short of the model's hidden size
    save_file(tensors, bad / "adapter_model.safetensors")
    capsys.readouterr()
    argv = ["train", *FEW_ROWS, "--max_steps", "1", "--adapter_name_or_path", str(bad)]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "b")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the base model's save progress
    assert last.startswith(f"moefuse train: adapter_name_or_path: {bad}:") and "size mismatch" in last


@pytest.mark.parametrize(
    "keys,message",
    [
        (["--adapter_format", "onnx"], "adapter_format: 'onnx' is not one of per_expert, fused"),
        (["--adapter_name_or_path", "."], "adapter_name_or_path: . is not a PEFT adapter folder"),
        (
            ["--finetuning_type", "full", "--adapter_format", "per_expert"],
            "adapter_format: needs finetuning_type",
        ),
    ],
)
def test_adapter_keys_refuse_what_cannot_work(keys, message):
    with pytest.raises(TrainConfigError, match=message):
        parse_train_args(None, [*keys, "--output_dir", "unused"])


def test_dataset_formats_become_what_sft_trainer_reads():
    from datasets import Dataset

    alpaca = Dataset.from_list(
        [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}]
    )
    assert to_sft_format(alpaca, "text", "x")[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    sharegpt = Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    )
    assert to_sft_format(sharegpt, "text", "x")[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    for kept in (
        {"prompt": "a", "completion": "b"},
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "q"}]},
    ):
        assert to_sft_format(Dataset.from_list([kept]), "text", "x")[0] == kept


def test_flops_model_counts_the_parameters_a_token_meets():
    config = Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config)
    h, q, kv, i = 32, 4 * 8, 2 * 8, 16
    attention = h * q + 2 * h * kv + q * h + 2 * 8  # q, k, v, o and the q/k norms
    experts = 8 * 3 * h * i
    per_layer = attention + 2 * h + 8 * h + experts * 2 / 8  # norms, router, top-2 of 8 experts
    dense = 2 * per_layer + h + 100 * h  # final norm, output head; the input embedding is a lookup
    flops = FlopsModel.of(model, config)
    assert flops.active_params == pytest.approx(dense)
    assert flops.per_token == pytest.approx(6 * dense)  # full fine-tuning: everything trains
    for p in model.parameters():
        p.requires_grad_(False)
    assert FlopsModel.of(model, config).per_token == pytest.approx(4 * dense)
    assert flops.flops(10, 100) == pytest.approx(6 * dense * 10 + 12 * 2 * q * 100)


def test_batch_counts_count_real_tokens_and_sequences():
    def counts(*args, **kwargs):
        return tuple(int(c) for c in _batch_counts(args, kwargs))

    mask = torch.tensor([[1, 1, 1, 0], [1] * 4])
    assert counts(input_ids=torch.zeros(2, 4), attention_mask=mask) == (7, 9 + 16)
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    assert counts(input_ids=torch.zeros(1, 10), position_ids=packed) == (10, 9 + 4 + 25)
    assert counts(torch.zeros(2, 4)) == (8, 32)


def test_builtin_dataset_and_tokenizer_are_what_the_builder_makes(tmp_path):
    from transformers import AutoTokenizer

    assert build_dataset(tmp_path / "rows.jsonl").read_bytes() == DATASET.read_bytes()
    shipped = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    rebuilt = AutoTokenizer.from_pretrained(build_tokenizer(DATASET, tmp_path / "tok"))
    assert rebuilt.get_vocab() == shipped.get_vocab() and rebuilt.chat_template == shipped.chat_template
    assert len(shipped) <= 512  # the tiny model's vocabulary
    rows = [json.loads(line)["messages"] for line in DATASET.read_text().splitlines()]
    assert 200 <= len(rows) and DATASET.stat().st_size < 200_000
    text = shipped.apply_chat_template(rows[0], tokenize=False)
    assert shipped.decode(shipped(text)["input_ids"]) == text
    masks = shipped.apply_chat_template(rows[0], return_dict=True, return_assistant_tokens_mask=True)
    assert sum(masks["assistant_masks"]) > 0  # {% generation %} marks the answer for assistant_only_loss


@pytest.mark.parametrize("fused", [True, False])
def test_fused_lora_linear_reaches_new_and_resumed_adapters(tmp_path, fused):
    """fused_lora_linear (on by default) gives the attention projections moefuse's LoraLinear, for a new adapter and
    for one training goes on from; false leaves PEFT's Linear. Either way the adapter is PEFT's, key for key."""
    from peft.tuners.lora import Linear as PeftLinear

    from moefuse.lora.linear import LoraLinear

    keys = [] if fused else ["--fused_lora_linear", "false"]
    args, sft_config = parse_train_args(None, [*keys, "--output_dir", "unused"])
    assert args.fused_lora_linear is fused
    expected = LoraLinear if fused else PeftLinear

    def attention_types(model):
        return {type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj"))}

    model = apply_lora(
        load_model(resolve_model(args, sft_config), torch.float32, torch.device("cpu")), args, tmp_path
    )
    assert attention_types(model) == {expected}
    model.save_pretrained(tmp_path / "adapter")
    args.adapter_name_or_path = str(tmp_path / "adapter")
    resumed = apply_lora(
        load_model(resolve_model(args, sft_config), torch.float32, torch.device("cpu")), args, tmp_path
    )
    assert attention_types(resumed) == {expected}
    assert resumed.state_dict().keys() == model.state_dict().keys()
