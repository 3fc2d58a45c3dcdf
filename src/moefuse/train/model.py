"""The model and tokenizer of a ``moefuse train`` run: a checkpoint (or random weights from a built-in config),
its experts on moefuse, and PEFT LoRA on attention and experts."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import PreTrainedTokenizerBase as Tokenizer
from trl import SFTConfig

from ..bench.configs import experts_per_token
from ..convert import CheckpointError, convert_lora
from ..convert.engines import resolve
from ..convert.lora import adapter_layout
from ..convert.peft_params import PEFT_LAYOUT
from ..experts import (
    EXPERTS_IMPLEMENTATION,
    UnsupportedExpertsError,
    check_lora_supported,
    experts_structure,
    gate_and_up_apart,
)
from ..lora import ATTENTION_PROJECTIONS
from ..lora.layer import ExpertsLoraFactor, ExpertsProjectionLora
from ..lora.linear import use_fused_lora_linear
from ..lora.targets import PROJECTIONS, moefuse_experts
from ..models import Qwen3MoeFusedForCausalLM
from ..ops.rope import ROPE_MODEL_TYPES
from .builtin import TOKENIZER_DIR
from .config import MoefuseTrainArguments, TrainConfigError, default_attention

START_ADAPTER_DIR = "adapter-start"  # adapter_name_or_path converted into the layout this run trains

CONFIG_PREFIX = "config:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where the weights come from: a checkpoint (``path``) or random initialisation from ``config``."""

    config: PretrainedConfig
    path: str | None  # None: random weights
    description: str

    @property
    def random_init(self) -> bool:
        return self.path is None


def _builtin_config(name: str) -> tuple[PretrainedConfig, str]:
    # The bench's table of published MoE configs (shapes only, no download).
    from ..bench.configs import BUILTIN_CONFIGS

    if name in BUILTIN_CONFIGS:
        fields = dict(BUILTIN_CONFIGS[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields), f"built-in config '{name}'"
    path = Path(name).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path), f"config {path}"
    raise TrainConfigError(
        f"model_name_or_path: {CONFIG_PREFIX}{name} is neither a built-in config "
        f"({', '.join(sorted(BUILTIN_CONFIGS))}) nor a config.json file or a folder holding one"
    )


def resolve_model(args: MoefuseTrainArguments, sft_config: SFTConfig) -> ModelSource:
    """Read the model's config (no weights), settle its attention (``attn_implementation``, or
    :func:`~moefuse.train.config.default_attention` for this run and family) and refuse models moefuse train
    cannot fine-tune."""
    name = args.model_name_or_path
    if name.startswith(CONFIG_PREFIX):
        config, description = _builtin_config(name[len(CONFIG_PREFIX) :])
        source = ModelSource(config, None, f"random weights from {description}")
    else:
        path = Path(name).expanduser()
        if not path.exists() and name.startswith((".", "/", "~")):
            raise TrainConfigError(f"model_name_or_path: {name}: no such folder")
        try:
            config = AutoConfig.from_pretrained(str(path) if path.exists() else name)
        except (OSError, ValueError) as e:
            raise TrainConfigError(f"model_name_or_path: could not read the config of '{name}': {e}") from e
        source = ModelSource(config, str(path) if path.exists() else name, name)
    for key, value in (args.config_overrides or {}).items():
        if not hasattr(source.config, key):
            raise TrainConfigError(
                f"config_overrides: {source.config.model_type} configs have no field '{key}'"
            )
        setattr(source.config, key, value)
    check_model_config(source.config, args)
    if args.num_layers is not None:
        from ..bench.configs import with_layers

        if not 1 <= args.num_layers <= source.config.num_hidden_layers:
            raise TrainConfigError(
                f"num_layers: {args.num_layers} must be between 1 and the model's "
                f"{source.config.num_hidden_layers} layers"
            )
        source.config = with_layers(source.config, args.num_layers)
    source.config._experts_implementation = args.experts_implementation
    if args.attn_implementation is None:
        args.attn_implementation = default_attention(sft_config, source.config.model_type)
    source.config._attn_implementation = args.attn_implementation
    check_experts_structure(source.config, args)
    return source


def check_model_config(config: PretrainedConfig, args: MoefuseTrainArguments) -> None:
    model_type = getattr(config, "model_type", "unknown")
    if not experts_per_token(config):
        raise TrainConfigError(
            f"model_name_or_path: {args.model_name_or_path} (model type '{model_type}') is not a "
            "Mixture-of-Experts model; moefuse train fine-tunes MoE models"
        )
    if args.fused_rope and model_type not in ROPE_MODEL_TYPES:
        raise TrainConfigError(
            f"fused_rope: moefuse's rotary embeddings stand in for the modeling code of "
            f"{', '.join(sorted(ROPE_MODEL_TYPES))} only, not model type '{model_type}'; set fused_rope: false"
        )


def check_trainable(experts: nn.Module, args: MoefuseTrainArguments) -> None:
    """Raise :class:`UnsupportedExpertsError` where moefuse cannot train these experts as ``args`` ask: LoRA, on
    dense or 4-bit (QLoRA) stacks, reaches any gating, biases and norms through gate_up_proj and down_proj
    (gate_proj/up_proj apart need plain gating); full fine-tuning takes what moefuse computes."""
    if (
        args.adapter_format is not None
        and resolve(args.adapter_format) != PEFT_LAYOUT
        and not gate_and_up_apart(experts)
    ):
        raise UnsupportedExpertsError(
            f"adapter_format: {args.adapter_format} splits gate_up_proj's LoRA into gate and up halves, but "
            f"{type(experts).__name__} computes its own gate from the gate/up rows, in an order of its own "
            "(GPT-OSS interleaves them); write peft_target_parameters (vllm_3d)"
        )
    if args.finetuning_type in ("lora", "qlora") and args.adapter_name_or_path is None:
        check_lora_supported(experts, [p for t in lora_targets(args) if (p := expert_projection(t))])
    else:  # an adapter's own targets are checked when PEFT injects it
        experts_structure(experts)


def gate_up_rows_apart(model: nn.Module) -> bool:
    """Whether every moefuse experts module of ``model`` holds gate rows then up rows
    (:func:`~moefuse.experts.gate_and_up_apart`), so that LoRA on its gate_up_proj splits into gate_proj and
    up_proj adapters (per-expert copies)."""
    return all(gate_and_up_apart(experts) for _, experts in moefuse_experts(model))


def check_experts_structure(config: PretrainedConfig, args: MoefuseTrainArguments) -> None:
    """Refuse, before any weight is loaded, experts that moefuse cannot train as ``args`` ask (the structure
    decides, not the model type): the model is built on the meta device and each experts module checked."""
    if args.experts_implementation != EXPERTS_IMPLEMENTATION:
        return
    from ..bench.shapes import meta_moe_blocks

    try:
        for block in meta_moe_blocks(config):
            check_trainable(block.experts, args)
    except UnsupportedExpertsError as error:
        raise TrainConfigError(f"model_name_or_path: {error}") from None
    except ValueError as error:  # Transformers refusing the config, e.g. an attention it does not have
        raise TrainConfigError(f"model_name_or_path: Transformers cannot build this model: {error}") from None


def resolve_dtype(args: MoefuseTrainArguments, bf16: bool, fp16: bool) -> torch.dtype:
    if args.dtype != "auto":
        return _DTYPES[args.dtype]
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def load_tokenizer(args: MoefuseTrainArguments, source: ModelSource) -> Tokenizer:
    name = args.tokenizer_name_or_path or (str(TOKENIZER_DIR) if source.random_init else source.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise TrainConfigError(
            f"tokenizer_name_or_path: could not load a tokenizer from '{name}': {e}"
        ) from e
    if len(tokenizer) > source.config.vocab_size:
        raise TrainConfigError(
            f"tokenizer_name_or_path: {name} has {len(tokenizer)} tokens, more than the model's vocabulary "
            f"({source.config.vocab_size}); give the model's own tokenizer"
        )
    return tokenizer


def qlora_quantization(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit settings (NF4, nested statistics), computing in ``dtype``: bitsandbytes applies them to the
    linear layers, :mod:`moefuse.quant` to the experts."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    quantization: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """The model with its experts on ``config._experts_implementation``; random weights are made on ``device``
    (building a large model on the CPU first would cost minutes). With ``quantization`` (QLoRA) the experts are
    4-bit (:mod:`moefuse.quant`) and the linear layers bitsandbytes', the bf16 expert stacks never all on the
    device: random weights are made one stack at a time, checkpoints load on the CPU first."""
    on_moefuse = source.config._experts_implementation == EXPERTS_IMPLEMENTATION
    # Qwen3MoeFusedForCausalLM also reads the fused checkpoint layouts; Transformers' own class is the
    # baseline for its experts implementations.
    cls = (
        Qwen3MoeFusedForCausalLM
        if source.config.model_type == "qwen3_moe" and on_moefuse
        else AutoModelForCausalLM
    )
    if quantization is not None:
        from ..quant import from_pretrained as load_4bit
        from ..quant.model import from_config as random_4bit

        if source.random_init:
            model = random_4bit(source.config, quantization, device=device, dtype=dtype, model_class=cls)
        else:
            model = load_4bit(
                source.path,
                quantization,
                device=device,
                model_class=cls,
                config=source.config,
                dtype=dtype,
                attn_implementation=source.config._attn_implementation,
            )
    elif source.random_init:
        with torch.device(device):
            if cls is AutoModelForCausalLM:
                model = cls.from_config(source.config, dtype=dtype)
            else:
                model = cls._from_config(source.config, dtype=dtype)
    else:
        model = cls.from_pretrained(
            source.path,
            config=source.config,
            dtype=dtype,
            experts_implementation=source.config._experts_implementation,
            attn_implementation=source.config._attn_implementation,
        )
    return model


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


# "all": attention, and the routed experts' gate and up together (one A, as PEFT's target_parameters on
# Transformers' experts) and down: the same adapter, parameter for parameter, on moefuse's experts and on
# Transformers' own ("experts." leaves shared experts and dense MLPs out, as target_parameters does).
ALL_TARGETS = (*ATTENTION_PROJECTIONS, "experts.gate_up_proj", "experts.down_proj")


def expert_projection(target: str) -> str | None:
    """The experts' projection a ``lora_target`` name reaches (``gate_proj``, ``experts.gate_up_proj``, ...), or
    None for other modules."""
    head, _, name = target.rpartition(".")
    return name if name in PROJECTIONS and head in ("", "experts") else None


def lora_targets(args: MoefuseTrainArguments) -> list[str]:
    """``lora_target`` as module names (see :data:`ALL_TARGETS` for "all")."""
    if args.lora_target.strip() == "all":
        return list(ALL_TARGETS)
    return _names(args.lora_target)


def lora_config(args: MoefuseTrainArguments) -> LoraConfig:
    """PEFT LoRA on ``lora_target``; the experts' projections at ``expert_lora_rank`` through ``rank_pattern``
    (moefuse experts), or PEFT's ``target_parameters`` on the stacked weights for Transformers' experts."""
    targets = lora_targets(args)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank
    expert_rank = args.expert_lora_rank or args.lora_rank
    expert_alpha = (
        args.expert_lora_alpha if args.expert_lora_alpha is not None else alpha * expert_rank / args.lora_rank
    )
    expert_targets = sorted({p for t in targets if (p := expert_projection(t)) is not None})
    common = dict(
        r=args.lora_rank,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
        modules_to_save=_names(args.additional_target) or None,
    )
    if args.experts_implementation == EXPERTS_IMPLEMENTATION:
        # "experts.gate_proj" matches <...>.mlp.experts.gate_proj only, not a shared expert's gate_proj.
        return LoraConfig(
            target_modules=targets,
            rank_pattern={
                f"experts.{p}": expert_rank for p in expert_targets if expert_rank != args.lora_rank
            },
            alpha_pattern={f"experts.{p}": expert_alpha for p in expert_targets if expert_alpha != alpha},
            task_type="CAUSAL_LM",
            **common,
        )
    if (expert_rank, expert_alpha) != (args.lora_rank, alpha) and expert_targets:
        raise TrainConfigError(
            f"expert_lora_rank/expert_lora_alpha need experts_implementation: {EXPERTS_IMPLEMENTATION}; "
            f"on '{args.experts_implementation}' experts PEFT's target_parameters LoRA uses lora_rank"
        )
    # Transformers' experts hold gate and up as one parameter: gate_proj or up_proj adapts it whole.
    stacked = sorted(
        {"experts.down_proj" if p == "down_proj" else "experts.gate_up_proj" for p in expert_targets}
    )
    return LoraConfig(
        target_modules=[t for t in targets if expert_projection(t) is None],
        target_parameters=stacked or None,
        task_type="CAUSAL_LM",
        **common,
    )


def trained_lora_layout(args: MoefuseTrainArguments) -> str:
    """The layout of the expert LoRA this run trains: moefuse's fused factors on moefuse's experts, PEFT's
    ``target_parameters`` on Transformers' own."""
    return "fused" if args.experts_implementation == EXPERTS_IMPLEMENTATION else "peft_target_parameters"


def _place(name: str) -> str:
    """A LoRA factor's place in the model, without the ``base_layer`` links PEFT adds where it nests wrappers."""
    return re.sub(r"(\.base_layer)+", "", name)


def draw_lora_a(model: nn.Module, seed: int) -> int:
    """Draw every LoRA A factor of ``model`` again, from PEFT's default distribution (each expert's as
    ``nn.Linear(in, r)``'s kaiming-uniform: U(±1/√in)), each factor from its own generator seeded by ``seed`` and
    its place in the model (``model.layers.3.mlp.experts.gate_up_proj``, ``...self_attn.q_proj``). PEFT draws
    them from the global stream in the order it builds them, and consumes it differently for its
    ``target_parameters`` wrappers of Transformers' experts than moefuse's experts LoRA does; drawn by place,
    one seed gives moefuse's experts and Transformers' the same starting adapter. B factors stay zero. Returns
    how many factors were drawn."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    drawn = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ParamWrapper):  # lora_A [E*r, in], expert-major
                place, experts = f"{_place(name)}.{module.parameter_name}", module.num_experts
            elif isinstance(module, ExpertsProjectionLora):  # lora_A [E, r, in]
                place, experts = _place(name), None
            elif isinstance(module, LoraLayer):  # linear layers, bitsandbytes' too: lora_A [r, in]
                place, experts = _place(name), 1
            else:
                continue
            for adapter, factor in module.lora_A.items():
                if not isinstance(factor, (nn.Linear, ExpertsLoraFactor)):
                    continue  # another kind of factor (a convolution's): PEFT's own draw stands
                weight = factor.weight
                shape = (
                    weight.shape
                    if experts is None
                    else (experts, weight.shape[0] // experts, weight.shape[1])
                )
                # 32 bits: the CPU generator's Mersenne Twister keeps no more of a seed.
                key = zlib.crc32(f"{seed}/{place}/{adapter}".encode())
                generator = torch.Generator(weight.device).manual_seed(key)
                bound = 1 / math.sqrt(shape[-1])
                values = torch.empty(shape, device=weight.device).uniform_(-bound, bound, generator=generator)
                weight.copy_(values.reshape(weight.shape))
                drawn += 1
    return drawn


def apply_lora(
    model: PreTrainedModel, args: MoefuseTrainArguments, work_dir: Path, seed: int = 0
) -> PeftModel:
    """A new LoRA adapter from the ``lora_*`` keys (its A factors drawn from ``seed`` by :func:`draw_lora_a`), or
    the one at ``adapter_name_or_path`` to go on training (converted first, into ``work_dir/adapter-start``,
    where its expert LoRA is in another layout)."""
    # PEFT keeps adapters in float32 over half-precision weights unless told not to.
    autocast = args.lora_dtype == "float32"

    def fused_linear(config: LoraConfig) -> LoraConfig:
        return use_fused_lora_linear(config) if args.fused_lora_linear else config

    if args.adapter_name_or_path is None:
        try:
            peft_model = get_peft_model(
                model, fused_linear(lora_config(args)), autocast_adapter_dtype=autocast
            )
        except (ValueError, UnsupportedExpertsError) as e:  # PEFT: no target found; what the experts refuse
            raise TrainConfigError(f"lora_target: {args.lora_target}: {e}") from e
        draw_lora_a(peft_model, seed)
        return peft_model
    source = Path(args.adapter_name_or_path)
    try:
        layout, wanted = adapter_layout(source), trained_lora_layout(args)
        if layout is not None and layout != wanted:
            source = convert_lora(
                source, work_dir / START_ADAPTER_DIR, wanted, overwrite=True, progress=False
            )
        return PeftModel.from_pretrained(
            model,
            str(source),
            is_trainable=True,
            config=fused_linear(LoraConfig.from_pretrained(str(source))),
            autocast_adapter_dtype=autocast,
        )
    # PEFT: ValueError/KeyError where the adapter's targets are not in this model, RuntimeError where its factors'
    # shapes do not fit it.
    except (CheckpointError, ValueError, KeyError, RuntimeError, UnsupportedExpertsError) as e:
        reason = " ".join(str(e).split())  # PEFT's load errors run over several lines
        raise TrainConfigError(f"adapter_name_or_path: {args.adapter_name_or_path}: {reason}") from e
