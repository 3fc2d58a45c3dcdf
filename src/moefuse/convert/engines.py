"""Who reads each LoRA adapter format as it is: one frozen table behind ``moefuse inspect``, the engine names
``moefuse convert --to`` takes, and docs/adapter-formats.md.

An engine's format that is one of moefuse's LoRA layouts tensor for tensor is an alias of that layout
(:data:`ALIASES`), never a second writer. What an engine reads was taken from its source, cited per reader;
``checked`` says whether a test here loads the adapter with that code (vLLM and SGLang cannot run here: their
key names and shapes are pinned in tests/test_convert_engines.py instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_VLLM = "vllm-project/vllm"
_VLLM_MANAGER = f"{_VLLM} vllm/lora/model_manager.py@01533aa8f9c07da9766323fbaf4c8b81bb2aa958"
_SGLANG_POOL = (
    "sgl-project/sglang python/sglang/srt/lora/mem_pool.py@00639c4d198ed9596d73d45ca54d2d39b98b0b3e"
)


@dataclass(frozen=True)
class Reader:
    """An engine that loads a format as it is: which versions or models, and how we know."""

    engine: str
    scope: str
    checked: bool  # a test here loads the adapter with the engine's own code
    source: str  # where the reading was taken from (a test, or repository, path and commit)

    def line(self) -> str:
        how = "checked: a test loads it with this engine" if self.checked else "from its source, not run here"
        return f"{self.engine}: {self.scope} ({how})"


@dataclass(frozen=True)
class AdapterFormat:
    layout: str
    writers: tuple[str, ...]
    readers: tuple[Reader, ...]


FORMATS: Mapping[str, AdapterFormat] = MappingProxyType(
    {
        "per_expert": AdapterFormat(
            "per_expert",
            ("PEFT on per-expert nn.Linear experts (Transformers 4, Unsloth)",),
            (
                Reader(
                    "PEFT",
                    "on per-expert nn.Linear experts; PEFT >= 0.21 also on Transformers 5's fused experts",
                    True,
                    "tests/test_convert_lora.py",
                ),
                Reader(
                    "vLLM",
                    "MoE models without is_3d_moe_weight (e.g. Qwen3-MoE), every expert present",
                    False,
                    f"{_VLLM_MANAGER}; {_VLLM} vllm/model_executor/models/qwen3_moe.py"
                    "@2e0831b0ab951c8896d4dd5d6cb9c3350a4574de",
                ),
                Reader("SGLang", "MoE LoRA (per-expert keys)", False, _SGLANG_POOL),
            ),
        ),
        "fused": AdapterFormat(
            "fused",
            ("moefuse's LoRA (moefuse train, moefuse.lora)",),
            (
                Reader("moefuse", "moefuse.lora on fused experts", True, "tests/test_convert_lora.py"),
                Reader(
                    "SGLang",
                    "MoE LoRA (3-D experts.<proj> keys, gate and up stacked when loaded)",
                    False,
                    f"{_SGLANG_POOL}; sgl-project/sglang python/sglang/srt/lora/lora.py "
                    "(LoRAAdapter.normalize_gate_up_proj)",
                ),
            ),
        ),
        "qwen3_moe_fused": AdapterFormat(
            "qwen3_moe_fused",
            ("transformers-qwen3-moe-fused",),
            (Reader("transformers-qwen3-moe-fused", "its fused Qwen3-MoE", False, "not read"),),
        ),
        "peft_target_parameters": AdapterFormat(
            "peft_target_parameters",
            (
                'PEFT >= 0.19.1, LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])',
            ),
            (
                Reader(
                    "PEFT",
                    ">= 0.19.1 on Transformers 5's fused experts",
                    True,
                    "tests/test_convert_peft_adapters.py",
                ),
                Reader(
                    "vLLM",
                    "MoE models with is_3d_moe_weight (GPT-OSS, Qwen3.5-MoE), gate_up_proj and down_proj both "
                    "present; other MoE models only with --enable-mixed-moe-lora-format and is_3d_lora_weight "
                    "in the request",
                    False,
                    f"{_VLLM_MANAGER}; {_VLLM} vllm/lora/lora_model.py@0306474e9d1f26d8717aad457b9511f0c9e57d60; "
                    f"{_VLLM} vllm/model_executor/models/gpt_oss.py@a6b6cfaa0cedff84872a0118380c6cfea91b635d",
                ),
            ),
        ),
        "mixtral": AdapterFormat(
            "mixtral",
            (
                "PEFT on Transformers 4's Mixtral-style experts (per-expert nn.Linear w1/w2/w3: Mixtral, PhiMoE)",
            ),
            (
                Reader(
                    "PEFT",
                    "on Transformers 4's Mixtral-style experts (Transformers 5 fuses them: convert to fused)",
                    False,
                    "huggingface/transformers src/transformers/models/mixtral/modeling_mixtral.py, 4.x "
                    "(MixtralBlockSparseTop2MLP: w1, w2, w3 nn.Linear)",
                ),
            ),
        ),
    }
)
# Engine names for moefuse layouts they read tensor for tensor (tests/test_convert_engines.py).
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "vllm_per_expert": "per_expert",
        "vllm_3d": "peft_target_parameters",
        "sglang_per_expert": "per_expert",
        "sglang_fused": "fused",
    }
)


def resolve(name: str) -> str:
    """The LoRA layout ``name`` names: itself, or the layout an engine alias stands for."""
    return ALIASES.get(name, name)


def aliases_of(layout: str) -> list[str]:
    return [alias for alias, target in ALIASES.items() if target == layout]


def readers(layout: str) -> list[str]:
    """One line per engine that reads ``layout`` as it is."""
    return [reader.line() for reader in FORMATS[layout].readers]


def single_scaling_warning(config: dict) -> str | None:
    """vLLM and SGLang scale every module by ``lora_alpha / r`` of ``adapter_config.json`` (vLLM's PEFTHelper
    keeps no rank_pattern/alpha_pattern; SGLang's LoRAAdapter has one scaling): a line naming the pattern keys
    whose scaling differs, which those engines would apply wrongly, or ``None``."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(r, int) or r <= 0 or alpha is None:
        return None
    root = math.sqrt if config.get("use_rslora") else (lambda x: x)
    differ = sorted(
        key
        for key in set(ranks) | set(alphas)
        if alphas.get(key, alpha) / root(ranks.get(key, r)) != alpha / root(r)
    )
    if not differ:
        return None
    return (
        f"{', '.join(differ)} scale by other than lora_alpha / r; vLLM and SGLang apply one scaling to every "
        "module, so they would read these wrong"
    )
