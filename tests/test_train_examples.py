"""The examples under examples/: the TRL script, the train configs, the accelerate / DeepSpeed configs and
LLaMA-Factory (where it installs)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

import moefuse
from moefuse.cli import tiny_qwen3_moe_config
from moefuse.train import parse_train_args, run_train
from moefuse.train.builtin import DATASET, TOKENIZER_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPERT_FACTOR = "base_model.model.model.layers.0.mlp.experts.gate_proj.lora_A.weight"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint with the built-in tokenizer, as a user's model folder would be."""
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    torch.manual_seed(0)
    moefuse.Qwen3MoeFusedForCausalLM(tiny_qwen3_moe_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def _fused_expert_factor(adapter_dir: Path) -> torch.Tensor:
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return f.get_tensor(EXPERT_FACTOR)


def test_trl_script_trains_lora_on_the_experts(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [
        "trl_sft.py", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name", str(DATASET),
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj", "--max_steps", "3", "--logging_steps", "1", "--bf16", "false",
        "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--output_dir", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "trl_sft.py"), run_name="__main__")
    assert _fused_expert_factor(out).shape == (16, 4, 64)  # [E, r, H]: moefuse's LoRA on the experts
    assert "tokens_per_second" in capsys.readouterr().out  # the throughput callback logged


@pytest.mark.parametrize("config", sorted((EXAMPLES / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_are_valid(config):
    args, sft_config = parse_train_args(config)
    assert args.finetuning_type == "lora" and sft_config.bf16


def test_throughput_config_runs_at_tiny_dims(tmp_path):
    """The H100 throughput config with the model shrunk: packing to full rows, LoRA on attention + experts."""
    result = run_train(
        EXAMPLES / "train" / "qwen3-30b-a3b-dims-4-layers.yaml",
        ["--model_name_or_path", "config:tiny", "--num_layers", "1", "--max_length", "256", "--bf16", "false",
         "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path)],
    )  # fmt: skip
    assert result.global_step == 2 and result.throughput["tokens"] == 2 * 256  # packed: no padding, full rows
    assert not (tmp_path / "base-model").exists()  # save_base_model: false


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp", "deepspeed_zero2", "fsdp2"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / f"{name}.yaml"))  # refuses unknown keys
    expected = {
        "single_gpu": "NO",
        "multi_gpu_ddp": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "fsdp2": "FSDP",
    }
    assert config.distributed_type.value == expected[name]
    if name == "fsdp2":
        from transformers.models.qwen3_moe import modeling_qwen3_moe

        assert config.fsdp_config["fsdp_version"] == 2
        assert hasattr(modeling_qwen3_moe, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if name == "deepspeed_zero2":
        ds_file = EXAMPLES.parent / config.deepspeed_config["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 2


def test_llamafactory_dataset_entry_points_at_the_shipped_dataset():
    info = json.loads((EXAMPLES / "llamafactory" / "data" / "dataset_info.json").read_text())
    entry = info["moefuse_instructions"]
    assert (EXAMPLES / "llamafactory" / "data" / entry["file_name"]).resolve() == DATASET.resolve()


def test_llamafactory_trains_with_moefuse_experts(tiny_checkpoint, tmp_path):
    """LLaMA-Factory 0.9.5 pins transformers<=5.6.0 and trl<=0.24, so it installs only in its own environment
    (README, 'LLaMA-Factory'); this runs where it is installed."""
    pytest.importorskip("llamafactory")
    out = tmp_path / "out"
    overrides = [
        f"model_name_or_path={tiny_checkpoint}", "deepspeed=null", "pure_bf16=false", "bf16=false", "use_cpu=true",
        "max_steps=3", "logging_steps=1", "cutoff_len=128", "gradient_accumulation_steps=1",
        "preprocessing_num_workers=1", f"output_dir={out}",
    ]  # fmt: skip
    subprocess.run(
        [
            sys.executable,
            "-m",
            "moefuse.train.llamafactory",
            "examples/llamafactory/qwen3_moe_lora_sft.yaml",
            *overrides,
        ],
        cwd=EXAMPLES.parent,
        check=True,
    )
    assert _fused_expert_factor(out).shape == (16, 16, 64)  # lora_rank 16 on the fused experts
