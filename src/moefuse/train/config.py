"""``moefuse train`` configuration: a YAML file and ``--key value`` overrides, read into moefuse's own keys
(:class:`MoefuseTrainArguments`, LLaMA-Factory's names where it has one) and TRL's ``SFTConfig`` (every
Transformers ``TrainingArguments`` field: ``learning_rate``, ``max_steps``, ``output_dir``, ``report_to``, ...).

As with TRL's own command line, the YAML gives the defaults and the command line overrides them; values pass
through ``HfArgumentParser``, so ``1e-4`` is a float whether it comes from YAML or the command line. Without a
YAML file the built-in default (:data:`moefuse.train.builtin.DEFAULT_CONFIG`) is used.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from packaging.version import Version
from transformers import HfArgumentParser
from trl import SFTConfig

from ..attention import ATTN_IMPLEMENTATION, VARLEN_MODEL_TYPES
from .builtin import DEFAULT_CONFIG

FINETUNING_TYPES = ("lora", "full", "qlora")
LORA_DTYPES = ("float32", "model")
LORA_TYPES = ("lora", "qlora")  # the types that train a LoRA adapter (qlora: on 4-bit base weights)


class TrainConfigError(ValueError):
    """A configuration ``moefuse train`` refuses before loading anything heavy."""


@dataclass
class MoefuseTrainArguments:
    """Keys of ``moefuse train`` beyond TRL's ``SFTConfig``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "checkpoint folder or Hub id; or config:NAME for random weights from a built-in config "
            "(tiny, qwen3-30b-a3b, ...) or config:PATH to a config.json"
        },
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "keep only the first N decoder layers (e.g. a short run at full width)"},
    )
    config_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "model config fields to change before the model is built or loaded, as a mapping "
            "(YAML) or JSON (command line), e.g. {initializer_range: 0.1}"
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "default: the model's tokenizer; the built-in one for config: models"},
    )
    experts_implementation: str = field(
        default="moefuse",
        metadata={"help": "moefuse, or a Transformers one (grouped_mm, eager) to compare against"},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "sdpa, eager, flash_attention_2, ..., or moefuse_varlen: attention within each sequence of "
            "packed rows only (PyTorch's FlashAttention varlen kernel on CUDA; moefuse.attention). Default: "
            "moefuse_varlen where TRL's collator makes the batch padding-free (packing: true) on a CUDA device "
            "in bf16/fp16 with PyTorch's varlen kernel, for the families it is tested on (Qwen3-MoE, Qwen2-MoE, "
            "Mixtral, OLMoE), else sdpa"
        },
    )
    chunked_loss: bool | None = field(
        default=None,
        metadata={
            "help": "causal-LM loss a chunk of tokens at a time, without fp32 copies of the logits "
            "(moefuse.ops.cross_entropy; same values as Transformers' loss); false: Transformers' own. Default: on "
            "where TRL computes the loss through the model (TRL < 1.0). TRL >= 1.0's SFTTrainer computes it with "
            "its own fused LM head (log-probabilities in tiles, no full logits), which the model's loss never "
            "reaches: true is refused there"
        },
    )
    fused_norm: bool = field(
        default=True,
        metadata={
            "help": "RMSNorm in one kernel each way (moefuse.ops.rms_norm; same values as Transformers' norms); "
            "false: the norm modules' own forward"
        },
    )
    fused_rope: bool = field(
        default=False,
        metadata={
            "help": "rotary embeddings of queries and keys in one kernel each way (moefuse.ops.rope; Transformers' "
            "formula, rounded once) for Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE (other families are refused). "
            "Off by default until its GPU tests have run"
        },
    )
    fused_lora_linear: bool = field(
        default=True,
        metadata={
            "help": "LoRA on linear layers (attention) as one autograd function: the adapter's product accumulated "
            "onto the base product, the input never cast to the adapter's dtype (moefuse.lora.linear; PEFT's "
            "layer, adapter and saved format, PEFT's forward wherever dropout trains or a variant is on); false: "
            "PEFT's forward"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights' dtype: float32, bfloat16, float16, or auto (bfloat16 when training in bf16, "
            "else float32); bfloat16 with full fine-tuning is LLaMA-Factory's pure_bf16"
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "a .json/.jsonl/.parquet/.csv file, a folder of them, or a Hub dataset name; rows in "
            "messages, ShareGPT (conversations), Alpaca (instruction/input/output), prompt/completion or text form"
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "use the first N rows only"})
    val_size: float = field(
        default=0.0,
        metadata={"help": "fraction (< 1) or number of rows held out for evaluation (set eval_strategy too)"},
    )
    finetuning_type: str = field(
        default="lora",
        metadata={
            "help": "lora, full, or qlora (LoRA on NF4 weights: bitsandbytes for the linear layers, moefuse's "
            "4-bit experts)"
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank of attention (and experts by default)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "default: 2 * lora_rank"})
    lora_dropout: float = field(default=0.0)
    lora_target: str = field(
        default="all",
        metadata={
            "help": "comma-separated module names, or all: q_proj,k_proj,v_proj,o_proj + the routed experts' "
            "experts.gate_up_proj (gate and up together, one A: PEFT target_parameters' LoRA) and "
            "experts.down_proj; gate_proj,up_proj adapt gate and up apart (moefuse experts)"
        },
    )
    expert_lora_rank: int | None = field(
        default=None, metadata={"help": "LoRA rank of the experts' projections (default: lora_rank)"}
    )
    expert_lora_alpha: float | None = field(
        default=None,
        metadata={"help": "default: the attention's alpha/rank ratio times expert_lora_rank"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA scaling alpha/sqrt(r)"})
    lora_dtype: str = field(
        default="float32",
        metadata={
            "help": "the adapter's parameters: float32 (PEFT's default over bf16/fp16 weights) or model (the "
            "weights' dtype: half the adapter's and its gradients' memory, and no cast in each GEMM; updates "
            "smaller than a bf16 step of a factor are lost)"
        },
    )
    additional_target: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated modules trained in full beside LoRA and saved with the adapter (e.g. norm)"
        },
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter folder to go on training, in any layout moefuse convert reads (PEFT "
            "target_parameters, per-expert, fused, vLLM's and SGLang's); its rank, alpha and targets replace the "
            "lora_* keys"
        },
    )
    adapter_format: str | None = field(
        default=None,
        metadata={
            "help": "also save the trained adapter in this layout or engine format, in output_dir/adapter-FORMAT: "
            "per_expert, fused, qwen3_moe_fused, peft_target_parameters, vllm_per_expert, vllm_3d, "
            "sglang_per_expert, sglang_fused"
        },
    )
    ep_size: int = field(default=1, metadata={"help": "expert parallelism: only 1 in moefuse train for now"})
    save_base_model: bool | None = field(
        default=None,
        metadata={
            "help": "save the random initial weights of a config: model beside the adapter, so it can be "
            "loaded again (default: true for config: models)"
        },
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch threads when training on the CPU (default: torch's choice, one per core)"},
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "per-device peak for the MFU figure (default: the GPU's bf16 datasheet value)"},
    )
    throughput_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "steps the after-warm-up tokens/s and MFU leave out: they count from the first log at or "
            "after this step (default: from the first log)"
        },
    )
    gpu_busy_steps: int | None = field(
        default=None,
        metadata={
            "help": "steps profiled with torch.profiler right after the warm-up for the GPU-busy fraction (kernel "
            "time over wall time; left out of the after-warm-up tokens/s); 0 turns it off. Default: 3 on a CUDA "
            "GPU; refused on the CPU (no GPU kernels)"
        },
    )
    host_profile_steps: int = field(
        default=0,
        metadata={
            "help": "steps profiled with cProfile after the warm-up and the GPU-busy steps: the Python functions "
            "by their own time go to the summary's host_profile (where a host-bound step's time goes; left out "
            "of the after-warm-up tokens/s, as cProfile slows the host); 0 (default) turns it off"
        },
    )
    step_in_backward: bool = field(
        default=False,
        metadata={
            "help": "one optimizer per trainable tensor, stepped by a hook as soon as backward has its gradient "
            "(Transformers' layer-wise optimizer), so the gradients are never all held at once; no gradient "
            "clipping (max_grad_norm 0), no gradient accumulation"
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "tensors saved for the backward (with gradient_checkpointing: each layer's input) wait in "
            "pinned CPU memory, copied without waiting for the GPU; parameters stay in place"
        },
    )
    memory_cap_gib: float | None = field(
        default=None,
        metadata={
            "help": "cap this process's GPU memory at this many GiB (torch.cuda.set_per_process_memory_fraction): "
            "PyTorch's allocator raises out-of-memory above it"
        },
    )


# Where moefuse train's defaults differ from TRL's: the same behaviour with TRL 0.24 and 1.x, bf16 only where
# the hardware has it (TRL 1.x turns bf16 on everywhere, which TrainingArguments refuses on a CPU), and use_cpu
# on machines without an accelerator (without it, torchrun on CPUs shards the data but leaves out DDP).
def _moefuse_defaults() -> dict[str, Any]:
    return {
        "gradient_checkpointing": False,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "use_cpu": not torch.accelerator.is_available(),
        "report_to": "none",
        # A fused AdamW: one kernel for all the adapter tensors, its step counts on the device (no host sync).
        "optim": "adamw_torch_fused",
        # The Trainer's check reads the loss on the host after every micro-batch; a NaN loss is logged as it is.
        "logging_nan_inf_filter": False,
        # Batches reach the GPU from pinned memory without the host waiting for the copy.
        **({"accelerator_config": {"non_blocking": True}} if torch.cuda.is_available() else {}),
    }


def _parser() -> HfArgumentParser:
    return HfArgumentParser((MoefuseTrainArguments, SFTConfig))


def known_keys() -> dict[str, str]:
    """Every accepted key, mapped to where it comes from (``moefuse`` or ``SFTConfig``)."""
    keys = {f.name: "SFTConfig" for f in dataclasses.fields(SFTConfig) if f.init}
    keys.update({f.name: "moefuse" for f in dataclasses.fields(MoefuseTrainArguments)})
    return keys


def _check_keys(keys: list[str], where: str) -> None:
    known = known_keys()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrainConfigError(
                f"{where}: unknown key '{key}'{hint}; `moefuse train --help` lists moefuse's keys, and every "
                "field of TRL's SFTConfig / Transformers' TrainingArguments is accepted"
            )


def _cli_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--"):
            keys.append(arg[2:].split("=", 1)[0].replace("-", "_"))
        elif arg.startswith("-"):
            raise TrainConfigError(f"command line: '{arg}' is not a --key; give options as --key value")
    return keys


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainConfigError(
            f"{path}: no such config file; give a YAML file, or no file for the built-in default"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(values, dict):
        raise TrainConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_train_args(
    config_file: str | Path | None, overrides: list[str] | None = None
) -> tuple[MoefuseTrainArguments, SFTConfig]:
    """Read ``config_file`` (the built-in default when ``None``) and the ``--key value`` ``overrides``."""
    overrides = list(overrides or [])
    path = Path(config_file) if config_file is not None else DEFAULT_CONFIG
    values = read_config_file(path)
    _check_keys(list(values), str(path))
    _check_keys(_cli_keys(overrides), "command line")
    parser = _parser()
    parser.set_defaults(**_moefuse_defaults())
    # YAML values become argparse defaults, so the command line overrides them and strings still convert.
    parser.set_defaults(**{k: v for k, v in values.items() if v is not None})
    try:
        moefuse_args, sft_config = parser.parse_args_into_dataclasses(args=overrides)
    except (ValueError, TypeError) as e:
        raise TrainConfigError(f"{path}: {e}") from e
    if moefuse_args.step_in_backward and "max_grad_norm" not in {*values, *_cli_keys(overrides)}:
        sft_config.max_grad_norm = 0.0  # the step runs before the whole gradient's norm is known
    check_train_args(moefuse_args, sft_config)
    return moefuse_args, sft_config


def default_attention(sft_config: SFTConfig, model_type: str) -> str:
    """``moefuse_varlen`` where it computes what SDPA would at a fraction of the cost: TRL's collator lays each
    batch's sequences end to end (padding-free: ``padding_free``, or packing with a best-fit strategy), the run
    is on CUDA in half precision with PyTorch's FlashAttention varlen kernel, and the family's attention is one
    it computes (``VARLEN_MODEL_TYPES``). SDPA then attends over the whole batch's square under a block-diagonal
    mask; the varlen kernel over each sequence's own. Else ``sdpa``."""
    from ..ops.attention import varlen_attn

    padding_free = sft_config.padding_free or (
        sft_config.packing and sft_config.packing_strategy in ("bfd", "bfd_split")
    )
    cuda = torch.cuda.is_available() and not sft_config.use_cpu
    half = sft_config.bf16 or sft_config.fp16
    varlen = padding_free and cuda and half and varlen_attn is not None and model_type in VARLEN_MODEL_TYPES
    return ATTN_IMPLEMENTATION if varlen else "sdpa"


def compile_below_checkpoints(sft_config: SFTConfig) -> dict[str, Any] | None:
    """Where ``torch_compile`` compiles: with gradient checkpointing, each decoder layer's forward below its
    checkpoint (the ``torch.compile`` options returned; the Trainer's own compile of the whole model is turned
    off in ``sft_config``), else the whole model as the Trainer does it (``None``). Dynamo traces a checkpoint
    as one operator that takes no graph break and no side effect inside it, and the attention's kernel-function
    wrapper (the ``kernels`` package) and Transformers' output-capturing hooks put both there: every checkpointed
    layer would run eagerly (docs/training.md)."""
    if not (sft_config.torch_compile and sft_config.gradient_checkpointing):
        return None
    options = {
        "backend": sft_config.torch_compile_backend or "inductor",
        "mode": sft_config.torch_compile_mode,
    }
    sft_config.torch_compile = False
    sft_config.torch_compile_backend = sft_config.torch_compile_mode = None
    return options


def trl_fused_lm_head() -> bool:
    """Whether this TRL's SFTTrainer computes the loss with its own fused LM head (TRL >= 1.0) instead of the
    model's loss function."""
    from trl.trainer import sft_trainer

    return hasattr(sft_trainer, "add_fused_lm_head")


def check_train_args(args: MoefuseTrainArguments, sft_config: SFTConfig) -> None:
    """Refuse what moefuse train cannot do, before anything is loaded."""
    if args.chunked_loss and trl_fused_lm_head():
        raise TrainConfigError(
            "chunked_loss: true: this TRL's SFTTrainer computes the loss with its own fused LM head (per-token "
            "log-probabilities in tiles, no full logits), so the model's loss function, moefuse's included, is "
            "never called; leave chunked_loss unset"
        )
    if args.finetuning_type == "qlora":
        if args.experts_implementation != "moefuse":
            raise TrainConfigError(
                f"finetuning_type: qlora needs experts_implementation: moefuse (4-bit experts run on moefuse's "
                f"kernels), not '{args.experts_implementation}'"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainConfigError(
                "finetuning_type: qlora needs bitsandbytes for the 4-bit linear layers: pip install 'moefuse[qlora]'"
            )
    if args.finetuning_type not in FINETUNING_TYPES:
        raise TrainConfigError(
            f"finetuning_type: '{args.finetuning_type}' is not one of {', '.join(FINETUNING_TYPES)}"
        )
    if args.ep_size != 1:
        raise TrainConfigError(
            f"ep_size: {args.ep_size}: expert parallelism is not wired into moefuse train (the Trainer would "
            "save only rank 0's experts and clip gradients per rank); run with ep_size: 1, or train with "
            "moefuse.parallel in your own loop (README, 'Expert parallelism')"
        )
    if args.model_name_or_path is None:
        raise TrainConfigError("model_name_or_path: missing; give a checkpoint, a Hub id or config:NAME")
    if args.dataset is None:
        raise TrainConfigError("dataset: missing; give a .json/.jsonl/.parquet file, a folder or a Hub name")
    if isinstance(args.config_overrides, str):
        try:
            args.config_overrides = yaml.safe_load(args.config_overrides)
        except yaml.YAMLError as e:
            raise TrainConfigError(f"config_overrides: not a mapping ({e})") from e
    if args.config_overrides is not None and not isinstance(args.config_overrides, dict):
        raise TrainConfigError(
            f"config_overrides: expected a mapping of config fields, got {args.config_overrides!r}"
        )
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise TrainConfigError(f"dtype: '{args.dtype}' is not one of auto, float32, bfloat16, float16")
    if not (0 <= args.val_size < 1 or float(args.val_size).is_integer() and args.val_size >= 1):
        raise TrainConfigError(
            f"val_size: {args.val_size} must be a fraction in [0, 1) or a whole number of rows"
        )
    if sft_config.eval_strategy != "no" and not args.val_size:
        raise TrainConfigError(
            f"eval_strategy: {sft_config.eval_strategy.value} needs an evaluation set; set val_size "
            "(e.g. 0.1) or eval_strategy: no"
        )
    check_adapter_args(args)
    if args.finetuning_type in LORA_TYPES and args.lora_rank < 1:
        raise TrainConfigError(f"lora_rank: {args.lora_rank} must be at least 1")
    if args.finetuning_type in LORA_TYPES and (conflict := peft_torchao_conflict()):
        raise TrainConfigError(conflict)
    check_memory_args(args, sft_config)


def peft_torchao_conflict() -> str | None:
    """Why PEFT cannot apply LoRA beside the installed torchao, or None: PEFT < 0.19 imports torchao's
    ``LinearActivationQuantizedTensor`` for every layer it adapts whenever torchao is installed, and torchao 0.18
    removed it."""
    try:
        torchao = Version(importlib.metadata.version("torchao"))
    except importlib.metadata.PackageNotFoundError:
        return None
    peft = Version(importlib.metadata.version("peft"))
    if peft < Version("0.19") and torchao >= Version("0.18"):
        return (
            f"PEFT {peft} cannot apply LoRA beside torchao {torchao}: it imports a class torchao 0.18 removed; "
            "upgrade PEFT (pip install 'peft>=0.19') or install torchao < 0.18"
        )
    return None


def check_adapter_args(args: MoefuseTrainArguments) -> None:
    """Refuse an adapter to go on from, or a format to save in, that this run cannot use."""
    from ..convert import LORA_LAYOUTS
    from ..convert.engines import ALIASES
    from ..convert.lora import is_adapter

    for key in ("adapter_name_or_path", "adapter_format"):
        if getattr(args, key) is not None and args.finetuning_type not in LORA_TYPES:
            raise TrainConfigError(
                f"{key}: needs finetuning_type lora or qlora, not '{args.finetuning_type}'"
            )
    if args.adapter_format is not None and args.adapter_format not in (*LORA_LAYOUTS, *ALIASES):
        raise TrainConfigError(
            f"adapter_format: '{args.adapter_format}' is not one of {', '.join((*LORA_LAYOUTS, *ALIASES))}"
        )
    if args.adapter_name_or_path is not None and not is_adapter(args.adapter_name_or_path):
        raise TrainConfigError(
            f"adapter_name_or_path: {args.adapter_name_or_path} is not a PEFT adapter folder (no "
            "adapter_config.json)"
        )


def check_memory_args(args: MoefuseTrainArguments, sft_config: SFTConfig) -> None:
    """Refuse the measurement and memory keys where they cannot work."""
    cuda = torch.cuda.is_available() and not sft_config.use_cpu
    if args.lora_dtype not in LORA_DTYPES:
        raise TrainConfigError(f"lora_dtype: {args.lora_dtype!r}; choose one of {', '.join(LORA_DTYPES)}")
    if args.host_profile_steps < 0:
        raise TrainConfigError(f"host_profile_steps: {args.host_profile_steps} must be 0 (off) or more")
    if args.gpu_busy_steps is not None and args.gpu_busy_steps < 0:
        raise TrainConfigError(f"gpu_busy_steps: {args.gpu_busy_steps} must be 0 (off) or more")
    if args.gpu_busy_steps and not cuda:
        raise TrainConfigError(
            f"gpu_busy_steps: {args.gpu_busy_steps}: the GPU-busy fraction profiles CUDA kernels, and this run "
            "is on the CPU; leave gpu_busy_steps unset (or 0)"
        )
    if args.memory_cap_gib is not None:
        if not cuda:
            raise TrainConfigError(
                f"memory_cap_gib: {args.memory_cap_gib}: the cap is on GPU memory "
                "(torch.cuda.set_per_process_memory_fraction), and this run is on the CPU; leave it unset"
            )
        if args.memory_cap_gib <= 0:
            raise TrainConfigError(f"memory_cap_gib: {args.memory_cap_gib} must be positive")
    if args.offload_activations and sft_config.activation_offloading:
        raise TrainConfigError(
            "offload_activations and activation_offloading both offload the saved activations; set one"
        )
    if args.step_in_backward:
        if sft_config.max_grad_norm and sft_config.max_grad_norm > 0:
            raise TrainConfigError(
                f"max_grad_norm: {sft_config.max_grad_norm} with step_in_backward: each tensor steps as soon as "
                "its gradient is ready, before the norm of the whole gradient is known; set max_grad_norm: 0"
            )
        if sft_config.gradient_accumulation_steps != 1:
            raise TrainConfigError(
                f"gradient_accumulation_steps: {sft_config.gradient_accumulation_steps} with step_in_backward: "
                "the step runs in every backward; use 1 (and a larger per_device_train_batch_size)"
            )
        if sft_config.resume_from_checkpoint not in (None, False, "", "false", "no"):
            raise TrainConfigError(
                "resume_from_checkpoint with step_in_backward: the per-tensor optimizers' states are not in the "
                "checkpoint; resume without step_in_backward"
            )
        if sft_config.world_size > 1:
            raise TrainConfigError(
                "step_in_backward on several processes: each tensor would step before its gradient is reduced "
                "across them; train on one process"
            )


def help_text() -> str:
    """``moefuse train --help``."""
    lines = [
        "usage: moefuse train [CONFIG.yaml] [--key value ...]",
        "",
        "Supervised fine-tuning of an MoE model with moefuse experts on TRL's SFTTrainer. Without CONFIG it runs",
        f"the built-in default ({DEFAULT_CONFIG.name}: a tiny Qwen3-MoE, a shipped dataset and tokenizer, LoRA).",
        "--key value pairs override the file's keys.",
        "",
        "moefuse keys:",
    ]
    for f in dataclasses.fields(MoefuseTrainArguments):
        text = f.metadata.get("help", "")
        if f.default is not None and "default:" not in text:
            text = f"{text} (default: {f.default})".strip()
        lines.append(f"  --{f.name:<24} {text}")
    lines += [
        "",
        "Every field of TRL's SFTConfig and Transformers' TrainingArguments is a key too, e.g. output_dir,",
        "max_steps, num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps, learning_rate,",
        "lr_scheduler_type, warmup_steps, max_length, packing, assistant_only_loss, gradient_checkpointing, bf16,",
        "optim, logging_steps, save_steps, eval_strategy, eval_steps, resume_from_checkpoint (a checkpoint",
        "folder, or true for the last one in output_dir), report_to, seed.",
        "moefuse train defaults gradient_checkpointing to false, bf16 to true only on GPUs that have it,",
        "report_to to none, optim to adamw_torch_fused (paged_adamw_8bit: bitsandbytes' paged 8-bit AdamW),",
        "logging_nan_inf_filter to false, and on CUDA accelerator_config to {non_blocking: true}.",
    ]
    return "\n".join(lines)
