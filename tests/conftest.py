"""Shared fixtures: tiny random configs of the MoE families moefuse covers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from packaging.version import Version

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import peft
from transformers import (
    DeepseekV3Config,
    Gemma4TextConfig,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import moefuse  # noqa: F401  (registers the "moefuse" experts implementation)

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


# PEFT 0.19.1 changed the orientation target_parameters adapters are saved in; moefuse reads the new one and
# refuses the old (test_older_peft_orientation_is_refused, run on such a PEFT: CI's oldest pass).
CURRENT_PEFT = Version(peft.__version__) >= Version("0.19.1")
current_orientation = pytest.mark.skipif(not CURRENT_PEFT, reason="PEFT < 0.19.1 saves the older orientation")


def tiny_config(family: str, num_experts: int = 16, top_k: int = 2, intermediate: int = 16):
    """A tiny random config of ``family`` with ``num_experts`` experts of width ``intermediate``."""
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=intermediate,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=24,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
        )
    if family == "mixtral":
        return MixtralConfig(
            **COMMON, intermediate_size=intermediate, num_local_experts=num_experts, num_experts_per_tok=top_k
        )
    if family == "olmoe":
        return OlmoeConfig(
            **COMMON, intermediate_size=intermediate, num_experts=num_experts, num_experts_per_tok=top_k
        )
    if family == "gemma4_text":  # GeGLU experts on the decoder layer
        return Gemma4TextConfig(
            **COMMON, head_dim=8, enable_moe_block=True, num_experts=num_experts, top_k_experts=top_k,
            moe_intermediate_size=intermediate, intermediate_size=64,
        )  # fmt: skip
    if family == "deepseek_v3":  # a dense first layer, a grouped router, multi-head latent attention
        return DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": COMMON["num_attention_heads"]}, n_routed_experts=num_experts,
            num_experts_per_tok=top_k, n_group=1, topk_group=1, intermediate_size=64,
            moe_intermediate_size=intermediate, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    if family == "gpt_oss":  # biases, interleaved gate/up, a clamped SwiGLU
        return GptOssConfig(
            **COMMON, head_dim=8, num_local_experts=num_experts, num_experts_per_tok=top_k,
            intermediate_size=intermediate,
        )  # fmt: skip
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with random values (the router too, so routing spreads over experts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if (
        torch.cuda.is_available()
    ):  # the interpreter is off: tests forcing the kernels on CPU tensors cannot run
        marker, skip = (
            "interpreter",
            pytest.mark.skip(reason="runs the Triton kernels in the CPU interpreter"),
        )
    else:
        marker, skip = "gpu", pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


def trained_precision(model: torch.nn.Module):
    """The precision a model trained by ``moefuse train`` ran in: on a GPU the Trainer trains in bf16 under
    accelerate's autocast (outputs returned in fp32), so a reloaded model compares alike only under it too."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
