import json
import subprocess
import sys

import pytest

from conftest import tiny_config
from moefuse.cli import main
from moefuse.settings import override_settings, reload_settings


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out


def test_info_prints_versions_and_kernels(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in (
        "moefuse",
        "torch",
        "transformers",
        "device",
        "backend",
        "experts on cpu",
        "'moefuse' registered",
        "under torch.compile",
    ):
        assert key in out


def test_info_names_the_forced_backend(capsys, monkeypatch):
    with monkeypatch.context() as environment:
        environment.setenv("MOEFUSE_BACKEND", "torch")
        reload_settings()
        try:
            assert main(["info"]) == 0
        finally:
            environment.undo()
            reload_settings()
    out = capsys.readouterr().out
    assert "torch (MOEFUSE_BACKEND" in out and "PyTorch: torch.nn.functional.grouped_mm" in out


@pytest.mark.parametrize(
    "finetuning_type,expected",
    [
        ("lora", "torch, composed (the PyTorch backend runs these tensors); weights dense, LoRA composed"),
        ("full", "torch, composed (the PyTorch backend runs these tensors); weights dense, LoRA none"),
    ],
)
def test_info_prints_a_models_experts_plan(capsys, finetuning_type, expected):
    argv = ["info", "--model", "qwen3-30b-a3b", "--tokens", "8192", "--finetuning_type", finetuning_type]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"plan (qwen3-30b-a3b, 8192 tokens, {finetuning_type}, cpu)  {expected}" in out


def test_info_says_whether_the_models_experts_train(tmp_path, capsys):
    """GPT-OSS's experts (biases, interleaved gate/up, a clamped SwiGLU) take LoRA and QLoRA on gate_up_proj, fused
    on the Triton kernels, and expert parallelism, not LoRA on gate and up apart: info says so and plans the LoRA
    forward; Qwen3-MoE's take everything."""
    tiny_config("gpt_oss").save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert (
        "LoRA and QLoRA on gate_up_proj and down_proj, full fine-tuning, expert parallelism (fused on the Triton "
        "kernels); refused: these experts " in out
    )
    # Transformers releases that flag interleaved rows say so (is_concatenated); older ones name the own gate
    assert "so LoRA on gate_proj and up_proj apart cannot be placed" in out
    assert f"plan ({tmp_path / 'config.json'}, 64 tokens, lora, cpu)" in out and "LoRA composed" in out
    with override_settings(backend="triton"):
        assert main(["info", "--model", str(tmp_path), "--tokens", "64"]) == 0
    gating = "silu, alpha 1.702, limit 7, up + 1, interleaved"
    assert (
        f"64 tokens, lora, cpu)  triton, fused ({gating}); weights dense, LoRA fused"
        in capsys.readouterr().out
    )
    assert main(["info", "--model", "qwen3-30b-a3b", "--tokens", "64"]) == 0
    assert "yes: expert LoRA, 4-bit experts (QLoRA), expert parallelism" in capsys.readouterr().out


def test_info_plan_of_gemma4_names_its_gelu_tanh_experts(tmp_path, capsys):
    """Gemma 4 names its top-k ``top_k_experts``; on the Triton backend its GeGLU experts plan fused."""
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, vocab_size=512,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    with override_settings(backend="triton"):
        assert main(["info", "--model", str(tmp_path), "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"plan ({tmp_path / 'config.json'}, 64 tokens, lora, cpu)  triton, fused (gelu_tanh)" in out


def test_info_plan_of_a_model_without_stacked_experts_says_why_in_one_line(tmp_path):
    """An MoE config whose every layer is dense (Qwen3-MoE's mlp_only_layers): no experts to plan."""
    from moefuse.bench.configs import BUILTIN_CONFIGS

    tiny = BUILTIN_CONFIGS["tiny"]
    config = {**tiny, "mlp_only_layers": list(range(tiny["num_hidden_layers"]))}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SystemExit, match=r"^moefuse info: .*model type 'qwen3_moe' has no experts module storing"
    ):
        main(["info", "--model", str(tmp_path)])


def test_info_plan_of_a_dense_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1}'
    )
    with pytest.raises(SystemExit, match="is not a Mixture-of-Experts config"):
        main(["info", "--model", str(tmp_path)])


def test_demo_agrees_with_eager(capsys):
    assert main(["demo", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "tokens/s" in out


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "moefuse.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: moefuse" in result.stdout
