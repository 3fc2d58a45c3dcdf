"""Model configs the benchmark runs at: built-in names, a ``config.json`` path, and tiny CPU versions of them."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# The published configs of a few MoE models, reduced to the fields that set the shapes (no download needed).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "qwen3-235b-a22b": dict(
        model_type="qwen3_moe",
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=50304,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Biases, interleaved gate/up rows and a clamped SwiGLU (swiglu_limit): fused as a Gating on the Triton path.
    "gpt-oss-20b": dict(
        model_type="gpt_oss",
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=201088,
        max_position_embeddings=131072,
        sliding_window=128,
        rope_theta=150000.0,
        rms_norm_eps=1e-5,
        swiglu_limit=7.0,
        tie_word_embeddings=False,
    ),
    # DeepSeek-V3's routing (sigmoid scores, expert groups, a correction bias) and a shared expert; its first three
    # layers are dense, so the MoE block is built from layer 3 on.
    "deepseek-v3": dict(
        model_type="deepseek_v3",
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=3,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=129280,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # The same architecture at a size one GPU fine-tunes.
    "moonlight-16b-a3b": dict(
        model_type="deepseek_v3",
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=163840,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # The text model of Qwen3.5-35B-A3B (its config nests it as text_config): a gated shared expert beside 256
    # routed ones; three of every four layers are linear attention (gated delta-net), which the MoE block omits.
    "qwen3.5-35b-a3b": dict(
        model_type="qwen3_5_moe_text",
        hidden_size=2048,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts=256,
        num_experts_per_tok=8,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        vocab_size=248320,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # The text model of Gemma 4 26B-A4B (text_config): 128 experts beside a dense MLP in every layer, GeGLU, five
    # sliding-window layers to one global.
    "gemma-4-26b-a4b": dict(
        model_type="gemma4_text",
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_experts=128,
        top_k_experts=8,
        enable_moe_block=True,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        attention_k_eq_v=True,
        sliding_window=1024,
        vocab_size=262144,
        max_position_embeddings=262144,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
}
BUILTIN_CONFIGS["tiny"] = json.loads((files("moefuse") / "data" / "tiny-qwen3-moe.json").read_text())
DEFAULT_CONFIG = "qwen3-30b-a3b"

# The names families give the routed experts' count and the experts chosen per token.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_top_k", "moe_k")


def num_experts(config: PretrainedConfig) -> int | None:
    """The routed experts per MoE layer, whatever the family calls the field."""
    return next((getattr(config, k) for k in _EXPERT_COUNT_FIELDS if getattr(config, k, None)), None)


def experts_per_token(config: PretrainedConfig) -> int | None:
    """The experts each token is routed to (``num_experts_per_tok``; Gemma 4's ``top_k_experts``, ...), or ``None``
    for a dense model."""
    return next((getattr(config, k) for k in _TOP_K_FIELDS if getattr(config, k, None)), None)


# What --tiny sets (where the config has the field): every family keeps its structure at toy sizes.
_TINY_FIELDS = dict(
    hidden_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_attention_heads=4,
    head_dim=16,
    vocab_size=512,
)


def _require_moe(config: PretrainedConfig, source: str) -> PretrainedConfig:
    if experts_per_token(config):
        return config
    raise SystemExit(
        f"moefuse bench: {source} (model type '{config.model_type}') is not a Mixture-of-Experts config "
        f"(none of {', '.join(_TOP_K_FIELDS)}); give the config of an MoE model"
    )


def load_config(name_or_path: str) -> tuple[str, PretrainedConfig]:
    """A built-in name, a ``config.json`` file or a directory holding one, or a Hub model id (its config only)
    → ``(label, config)``."""
    if name_or_path in BUILTIN_CONFIGS:
        fields = dict(BUILTIN_CONFIGS[name_or_path])
        return name_or_path, AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        fields = json.loads(path.read_text())
        if "model_type" not in fields:
            raise SystemExit(
                f"moefuse bench: {path} has no 'model_type'; give the config.json of a Transformers model"
            )
        return str(path), _require_moe(AutoConfig.for_model(fields.pop("model_type"), **fields), str(path))
    if name_or_path.count("/") == 1 and not path.exists():
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"moefuse bench: --config {name_or_path!r}: no such file, and the Hub gave no config for it "
                f"({str(error).splitlines()[0]})"
            ) from None
        return name_or_path, _require_moe(config, name_or_path)
    raise SystemExit(
        f"moefuse bench: --config {name_or_path!r} is neither a built-in name "
        f"({', '.join(BUILTIN_CONFIGS)}), a config.json file or a directory holding one, nor a Hub model id"
    )


def with_layers(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """A copy of ``config`` with its first ``num_layers`` decoder layers. A config that describes each layer
    (``layer_types``, Gemma 4's ``per_layer_config``) gives at most the layers it describes."""
    fields = config.to_dict()
    layer_types = fields.get("layer_types")
    if isinstance(layer_types, list):
        num_layers = min(num_layers, len(layer_types))
        fields["layer_types"] = layer_types[:num_layers]
    if isinstance(fields.get("per_layer_config"), dict):
        fields["per_layer_config"] = {
            index: layer for index, layer in fields["per_layer_config"].items() if int(index) < num_layers
        }
    fields["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def tiny_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same family and structure at toy sizes (for CPU runs and CI): at most 8 experts, top-2."""
    fields = config.to_dict()
    heads, kv_heads = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    for key, value in _TINY_FIELDS.items():
        if key in fields:
            fields[key] = value
    if kv_heads is not None and heads is not None:
        fields["num_key_value_heads"] = fields["num_attention_heads"] if kv_heads == heads else 2
    # Where experts are sized by intermediate_size (Mixtral, OLMoE) it is their width; otherwise the dense MLP's.
    if "intermediate_size" in fields:
        fields["intermediate_size"] = 32 if "moe_intermediate_size" not in fields else 128
    for key in _EXPERT_COUNT_FIELDS:
        if key in fields and fields[key]:
            fields[key] = min(fields[key], 8)
    for key in _TOP_K_FIELDS:
        if fields.get(key):
            fields[key] = min(fields[key], 2)
    if "qk_rope_head_dim" in fields:  # DeepSeek-V3's latent attention: its head_dim is the rotary part's
        fields.update(
            qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16, kv_lora_rank=16, head_dim=8
        )
        if fields.get("q_lora_rank"):
            fields["q_lora_rank"] = 32
    if (fields.get("n_group") or 1) > 1:  # DeepSeek-V3's expert groups: two of four experts, one group picked
        fields["n_group"], fields["topk_group"] = 2, 1
    if isinstance(fields.get("layer_types"), list):
        fields["layer_types"] = fields["layer_types"][: fields["num_hidden_layers"]]
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
