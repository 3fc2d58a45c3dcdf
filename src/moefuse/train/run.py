"""``moefuse train``: check the configuration, build the model on moefuse experts, train with TRL's
``SFTTrainer``, save and convert the result, and say where everything went."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from ..bench.configs import experts_per_token, num_experts
from ..bench.measure import environment
from ..convert import convert_lora, convert_lora_to_unfused
from ..convert.lora import adapter_layout
from ..experts import EXPERTS_IMPLEMENTATION
from ..ops.cross_entropy import causal_lm_loss, use_chunked_loss
from ..ops.rms_norm import use_fused_rms_norm
from ..ops.rope import fused_rope
from .callbacks import GIB, ThroughputCallback, add_throughput_callback
from .config import (
    LORA_TYPES,
    MoefuseTrainArguments,
    TrainConfigError,
    compile_below_checkpoints,
    parse_train_args,
    trl_fused_lm_head,
)
from .data import is_conversational, load_train_dataset
from .model import (
    ModelSource,
    apply_lora,
    gate_up_rows_apart,
    load_model,
    load_tokenizer,
    qlora_quantization,
    resolve_dtype,
    resolve_model,
)
from .trainer import MoefuseSFTTrainer

BASE_MODEL_DIR = "base-model"  # the random initial weights of a config: model
ADAPTER_DIR = "adapter"  # LoRA adapter as moefuse trains it (fused expert factors)
PER_EXPERT_ADAPTER_DIR = "adapter-per-expert"  # the same adapter in PEFT's per-expert layout
MODEL_DIR = "model"  # full fine-tuning: the model in the per-expert Hub layout
SUMMARY_FILE = "moefuse_train_summary.json"
RANDOM_BASE_NOT_SAVED = "(random weights, not saved)"


@dataclass
class TrainResult:
    """What a run wrote and measured."""

    output_dir: Path
    final_dir: Path  # the adapter (LoRA) or the model (full)
    base_model: str  # what the adapter applies to: a checkpoint, a Hub id, or the saved random weights
    per_expert_adapter: Path | None
    global_step: int
    losses: list[float] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)
    model: PreTrainedModel | None = field(default=None, repr=False)  # the trained model, still in memory
    adapter_in_format: Path | None = None  # the adapter in adapter_format, when asked
    packed_sequences: dict[str, float] | None = None  # see packed_sequence_lengths
    compiled: str | None = None  # what torch_compile compiled: see _compiled


def _resume_checkpoint(sft_config: SFTConfig) -> str | None:
    """``resume_from_checkpoint``: a checkpoint folder, or true for the last one in ``output_dir``."""
    value = sft_config.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("true", "yes", "last"):
        last = get_last_checkpoint(sft_config.output_dir) if Path(sft_config.output_dir).is_dir() else None
        if last is None:
            raise TrainConfigError(
                f"resume_from_checkpoint: true, but {sft_config.output_dir} holds no checkpoint-N folder"
            )
        return last
    if not (Path(value) / "trainer_state.json").is_file():
        raise TrainConfigError(
            f"resume_from_checkpoint: {value} is not a Trainer checkpoint (no trainer_state.json); give a "
            "checkpoint-N folder, or true for the last one in output_dir"
        )
    return str(value)


def _base_model_dir(source: ModelSource, sft_config: SFTConfig, resume: str | None) -> Path:
    # A resumed run continues on the weights its adapter was trained on: those saved by the first run.
    output_dir = Path(resume).parent if resume else Path(sft_config.output_dir)
    return output_dir / BASE_MODEL_DIR


def _trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _describe(
    model: PreTrainedModel, args: MoefuseTrainArguments, source: ModelSource, rows: int, sft
) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = _trainable_parameters(model)
    config = source.config
    experts = num_experts(config)
    return (
        f"moefuse train: {source.description}\n"
        f"  model      {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{experts} experts top-{experts_per_token(config)}; experts on '{args.experts_implementation}', "
        f"weights {next(model.parameters()).dtype}, device {sft.device}\n"
        f"  training   {args.finetuning_type}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters; "
        f"{rows} rows of {args.dataset}; batch {sft.per_device_train_batch_size} x "
        f"{sft.gradient_accumulation_steps} accumulation; "
        f"{f'{sft.max_steps} steps' if sft.max_steps > 0 else f'{sft.num_train_epochs} epochs'}, "
        f"lr {sft.learning_rate}, bf16 {sft.bf16}; loss {_loss_path(model)}\n"
        f"  optimizer  {_optimizer(args, sft)}\n"
        f"  memory     {_memory_savers(args, sft)}\n"
        f"  output     {sft.output_dir}"
    )


def _optimizer(args: MoefuseTrainArguments, sft) -> str:
    name = sft.optim.value if hasattr(sft.optim, "value") else str(sft.optim)
    what = {
        "adamw_torch_fused": "PyTorch's fused AdamW (the default)",
        "adamw_torch": "PyTorch's AdamW",
        "paged_adamw_8bit": "bitsandbytes' paged 8-bit AdamW",
        "adamw_8bit": "bitsandbytes' 8-bit AdamW",
        "adamw_torch_8bit": "torchao's 8-bit AdamW",
        "adamw_torch_4bit": "torchao's 4-bit AdamW",
    }.get(name, "set by optim")
    clip = f"gradients clipped at norm {sft.max_grad_norm}" if sft.max_grad_norm else "no gradient clipping"
    where = "; stepped in the backward, one tensor at a time" if args.step_in_backward else ""
    return f"{name}: {what}{where}; {clip}"


def _memory_savers(args: MoefuseTrainArguments, sft) -> str:
    savers = [
        "gradient checkpointing" if sft.gradient_checkpointing else "",
        "optimizer step in backward" if args.step_in_backward else "",
        "activations offloaded to CPU" if args.offload_activations or sft.activation_offloading else "",
        f"capped at {args.memory_cap_gib:g} GiB" if args.memory_cap_gib else "",
    ]
    return ", ".join(s for s in savers if s) or "no savers"


def _loss_path(model: PreTrainedModel) -> str:
    """What computes the training loss, for the run's description."""
    if trl_fused_lm_head():
        return "by TRL's fused LM head"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "moefuse's chunked" if base.loss_function is causal_lm_loss else "Transformers'"


@contextmanager
def _cpu_threads(args: MoefuseTrainArguments, sft_config: SFTConfig) -> Iterator[None]:
    """``cpu_threads`` for the run, the process's own setting again afterwards."""
    before = torch.get_num_threads()
    if args.cpu_threads and sft_config.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _memory_cap(args: MoefuseTrainArguments, sft_config: SFTConfig) -> Iterator[None]:
    """``memory_cap_gib``: PyTorch's allocator on this process's GPU refuses to hold more, for the run."""
    if args.memory_cap_gib is None:
        yield
        return
    device = sft_config.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def run_train(config_file: str | Path | None = None, overrides: list[str] | None = None) -> TrainResult:
    """Run ``moefuse train [config_file] [overrides...]`` (see :mod:`moefuse.train.config`)."""
    args, sft_config = parse_train_args(config_file, overrides)
    with _cpu_threads(args, sft_config), _memory_cap(args, sft_config):
        return train(args, sft_config)


def train(args: MoefuseTrainArguments, sft_config: SFTConfig) -> TrainResult:
    """Fine-tune as ``args`` and ``sft_config`` say (from :func:`~moefuse.train.config.parse_train_args`)."""
    source = resolve_model(args, sft_config)
    tokenizer = load_tokenizer(args, source)
    train_dataset, eval_dataset = load_train_dataset(args, sft_config.dataset_text_field, sft_config.seed)
    if (
        is_conversational(train_dataset)
        and tokenizer.chat_template is None
        and not sft_config.chat_template_path
    ):
        raise TrainConfigError(
            f"dataset: {args.dataset} holds conversations but the tokenizer has no chat template; set "
            "chat_template_path (a .jinja file or a tokenizer that has one)"
        )
    resume = _resume_checkpoint(sft_config)
    output_dir = Path(sft_config.output_dir)
    is_main = sft_config.process_index == 0

    set_seed(sft_config.seed)
    base_dir = _base_model_dir(source, sft_config, resume)
    if source.random_init and resume and base_dir.is_dir():
        source.path = str(base_dir)
    dtype = resolve_dtype(args, sft_config.bf16, sft_config.fp16)
    quantization = qlora_quantization(dtype) if args.finetuning_type == "qlora" else None
    model = load_model(source, dtype, sft_config.device, quantization)
    if not trl_fused_lm_head():  # else TRL's fused LM head computes the loss and the model's is never called
        use_chunked_loss(model, enable=args.chunked_loss is not False)
    use_fused_rms_norm(model, enable=args.fused_norm)
    save_base = args.save_base_model if args.save_base_model is not None else source.random_init
    if source.random_init and save_base and is_main:
        if quantization is not None:  # the 4-bit weights the adapter was trained on
            from ..quant import save_pretrained as save_4bit

            save_4bit(model, base_dir)
        else:
            model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    base_model = str(base_dir) if source.random_init else source.path
    model.config._name_or_path = base_model or ""  # recorded as the adapter's base_model_name_or_path
    model.name_or_path = model.config._name_or_path
    if args.finetuning_type in LORA_TYPES:
        model = apply_lora(model, args, output_dir, seed=sft_config.seed)

    layer_compile = compile_below_checkpoints(sft_config)
    trainer = MoefuseSFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        step_in_backward=args.step_in_backward,
        offload_activations=args.offload_activations,
        compile_below_checkpoints=layer_compile,
    )
    throughput = add_throughput_callback(
        trainer, args.peak_tflops, args.throughput_warmup_steps, args.gpu_busy_steps, args.host_profile_steps
    )
    if is_main:
        print(_describe(model, args, source, len(train_dataset), sft_config), flush=True)
    with fused_rope(model) if args.fused_rope else nullcontext():
        trainer.train(resume_from_checkpoint=resume)

    final_dir = output_dir / (ADAPTER_DIR if args.finetuning_type in LORA_TYPES else MODEL_DIR)
    trainer.save_model(str(final_dir))
    trainer.save_state()
    per_expert = in_format = None
    if args.finetuning_type in LORA_TYPES and trainer.is_world_process_zero():
        per_expert, in_format = _adapter_copies(
            final_dir, output_dir, args.adapter_format, gate_up_rows_apart(model)
        )
    result = TrainResult(
        output_dir=output_dir,
        final_dir=final_dir,
        base_model=base_model if save_base or not source.random_init else RANDOM_BASE_NOT_SAVED,
        per_expert_adapter=per_expert,
        adapter_in_format=in_format,
        global_step=trainer.state.global_step,
        losses=[log["loss"] for log in trainer.state.log_history if "loss" in log],
        throughput=throughput.totals,
        model=trainer.model,
        packed_sequences=packed_sequence_lengths(trainer.train_dataset),
        compiled=_compiled(trainer, sft_config),
    )
    if trainer.is_world_process_zero():
        (output_dir / SUMMARY_FILE).write_text(
            json.dumps(_summary_record(result, args, sft_config), indent=2) + "\n"
        )
        print(summary(result, args, source), flush=True)
    return result


def packed_sequence_lengths(dataset: object) -> dict[str, float] | None:
    """How many sequences TRL packed into the training rows and their tokens (mean, longest): attention that
    skips the blocks between sequences costs what these lengths cost. ``None`` when the rows are not packed."""
    if "seq_lengths" not in (getattr(dataset, "column_names", None) or ()):
        return None
    lengths = [n for row in dataset["seq_lengths"] for n in row]
    if not lengths:
        return None
    return {
        "sequences": len(lengths),
        "mean_tokens": round(statistics.fmean(lengths), 1),
        "max_tokens": max(lengths),
    }


def _adapter_copies(
    final_dir: Path, output_dir: Path, adapter_format: str | None, per_expert_copy: bool
) -> tuple[Path | None, Path | None]:
    """The trained adapter in PEFT's per-expert layout (written when its expert LoRA is moefuse's fused layout,
    which vLLM does not read, and ``per_expert_copy``) and in ``adapter_format`` (when asked). An adapter without
    expert LoRA reads as it is everywhere: no copies."""
    layout = adapter_layout(final_dir)
    if layout is None:
        return None, None
    per_expert = None
    if layout == "fused" and per_expert_copy:
        per_expert = convert_lora_to_unfused(
            final_dir, output_dir / PER_EXPERT_ADAPTER_DIR, overwrite=True, progress=False
        )
    in_format = None
    if adapter_format is not None:
        in_format = convert_lora(
            final_dir,
            output_dir / f"adapter-{adapter_format}",
            adapter_format,
            overwrite=True,
            progress=False,
        )
    return per_expert, in_format


def _compiled(trainer: MoefuseSFTTrainer, sft_config: SFTConfig) -> str | None:
    """What ``torch_compile`` compiled: the whole model (the Trainer's way), the decoder layers below their
    checkpoints (with gradient checkpointing, ``compile_below_checkpoints``), or nothing."""
    if trainer.layer_compile is not None:
        return f"{trainer.layer_compile.layers} decoder layers, each below its checkpoint"
    return "the whole model" if sft_config.torch_compile else None


def _summary_record(result: TrainResult, args: MoefuseTrainArguments, sft_config: SFTConfig) -> dict:
    return {
        "finetuning_type": args.finetuning_type,
        "experts_implementation": args.experts_implementation,
        "optim": str(getattr(sft_config.optim, "value", sft_config.optim)),
        "memory_savers": _memory_savers(args, sft_config),
        # What a results file needs to be rerun and compared like for like: the model and the step's shape.
        "setup": {
            "model": args.model_name_or_path,
            "per_device_train_batch_size": sft_config.per_device_train_batch_size,
            "gradient_accumulation_steps": sft_config.gradient_accumulation_steps,
            "max_length": sft_config.max_length,
            "packing": sft_config.packing,
            "packed_sequences": result.packed_sequences,
            "torch_compile": result.compiled is not None,
            "compiled": result.compiled,
            "gradient_checkpointing": sft_config.gradient_checkpointing,
            # the attention the model ran with (Transformers' choice where none was given)
            "attn_implementation": getattr(
                getattr(result.model, "config", None), "_attn_implementation", None
            ),
            "fused_norm": args.fused_norm,
            "fused_rope": args.fused_rope,
            "fused_lora_linear": args.fused_lora_linear if args.finetuning_type in LORA_TYPES else None,
            "lora_rank": args.lora_rank if args.finetuning_type in LORA_TYPES else None,
            "lora_target": args.lora_target if args.finetuning_type in LORA_TYPES else None,
            # equal on both sides of a like-for-like comparison (the same adapter, parameter for parameter)
            "trainable_parameters": _trainable_parameters(result.model),
            "lora_dtype": args.lora_dtype if args.finetuning_type in LORA_TYPES else None,
            "max_grad_norm": sft_config.max_grad_norm,
            "seed": sft_config.seed,
        },
        "global_step": result.global_step,
        "losses": result.losses,
        "throughput": result.throughput,
        "final_dir": str(result.final_dir),
        "per_expert_adapter": str(result.per_expert_adapter) if result.per_expert_adapter else None,
        "adapter_in_format": str(result.adapter_in_format) if result.adapter_in_format else None,
        "base_model": result.base_model,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Where it ran: the device, the library versions, and the moefuse commit (``+dirty`` when the tree differed).
        "environment": environment(next(result.model.parameters()).device),
    }


def _utilisation(figures: dict) -> str:
    if "mfu" not in figures:
        return ""
    return f", MFU {figures['mfu']:.1%} (with checkpointing's recompute {figures['hfu']:.1%})"


def _throughput_lines(t: dict) -> list[str]:
    """The closing summary's measurements (``ThroughputCallback.totals``)."""
    if "tokens" not in t:
        return []
    lines = [
        f"  throughput {t['tokens_per_second']:.0f} tokens/s on this device{_utilisation(t)} "
        f"({t['tokens']} tokens, whole run)"
    ]
    if "after_warmup" in t:
        steady = t["after_warmup"]
        lines.append(
            f"             {steady['tokens_per_second']:.0f} tokens/s after warm-up{_utilisation(steady)} (from "
            f"the log at step {steady['from_step']}, profiled steps left out: kernels compile and tune first)"
        )
        if steady.get("triton_compile_seconds"):
            lines.append(
                f"             of its {steady['seconds']:.1f} s, {steady['triton_compile_seconds']:.1f} s went to "
                "Triton compiles (a batch shape met for the first time)"
            )
    busy = t.get("gpu_busy", {})
    if "fraction" in busy:
        first, last = busy["steps"]
        lines.append(
            f"  GPU busy   {busy['fraction']:.1%} of the wall time (steps {first}-{last}, torch.profiler: kernel "
            "and copy time over wall time)"
        )
        for kernel in busy.get("kernels", [])[:5]:
            lines.append(f"             {kernel['share']:6.1%} {kernel['calls']:>6} x {kernel['name'][:70]}")
    elif busy:
        lines.append(f"  GPU busy   {busy['not_measured']}")
    host = t.get("host_profile", {})
    if "functions" in host:
        first, last = host["steps"]
        lines.append(
            f"  host       {host['wall_seconds']:.2f} s over steps {first}-{last} under cProfile; by own time:"
        )
        for function in host["functions"][:5]:
            lines.append(
                f"             {function['own_share']:6.1%} {function['calls']:>6} x {function['name'][-70:]}"
            )
    elif host:
        lines.append(f"  host       {host['not_measured']}")
    compiles = t.get("triton_compiles", {})
    if compiles.get("compiles"):
        steps = ", ".join(f"{entry['step']} ({entry['seconds']:.1f} s)" for entry in compiles["by_step"])
        lines.append(
            f"  compiles   {compiles['compiles']} Triton kernels, {compiles['seconds']:.1f} s, in steps {steps}"
        )
    memory = t.get("memory", {})
    if "peak_reserved_gib" in memory:
        lines.append(
            f"  memory     peak {memory['peak_allocated_gib']:.2f} GiB allocated, "
            f"{memory['peak_reserved_gib']:.2f} GiB reserved (PyTorch's allocator, during training)"
        )
        if memory.get("alloc_retries"):
            lines.append(
                f"             {memory['alloc_retries']} allocations retried after freeing the cache (near the cap)"
            )
        steady = memory.get("after_warmup", {})
        if steady.get("cuda_frees"):
            lines.append(
                f"             {steady['cuda_mallocs']} cudaMalloc and {steady['cuda_frees']} cudaFree calls after the "
                "warm-up (each cudaFree waits for the GPU: the cache gives memory back, near the cap)"
            )
    return lines


def summary(result: TrainResult, args: MoefuseTrainArguments, source: ModelSource) -> str:
    """The closing message: what was measured, where things are, how to load and serve them."""
    lines = ["", "moefuse train: done"]
    if result.losses:
        lines.append(
            f"  loss       {result.losses[0]:.4f} (first log) -> {result.losses[-1]:.4f} (last log), "
            f"{result.global_step} steps"
        )
    lines += _throughput_lines(result.throughput)
    if result.compiled is not None:
        lines.append(f"  compiled   {result.compiled} (torch_compile)")
    on_moefuse = args.experts_implementation == EXPERTS_IMPLEMENTATION
    if source.config.model_type == "qwen3_moe" and on_moefuse:
        imports, cls, load_kwargs = "import moefuse", "moefuse.Qwen3MoeFusedForCausalLM", ""
    else:
        imports = "import moefuse; from transformers import AutoModelForCausalLM"
        cls, load_kwargs = "AutoModelForCausalLM", f', experts_implementation="{args.experts_implementation}"'
    bf16_base = f'{cls}.from_pretrained("{result.base_model}"{load_kwargs})'
    base, base_imports = bf16_base, imports
    if args.finetuning_type == "qlora":
        # The same 4-bit weights again: a saved 4-bit base reloads as it is, a checkpoint is quantized alike.
        settings = (
            ""
            if source.random_init
            else ', BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)'
        )
        base = f'moefuse.quant.from_pretrained("{result.base_model}"{settings})'
        base_imports = "import moefuse.quant; from transformers import BitsAndBytesConfig"
    if args.finetuning_type in LORA_TYPES:
        lines.append(f"  adapter    {result.final_dir}  (PEFT LoRA)")
        if result.per_expert_adapter:
            lines.append(
                f"  per-expert {result.per_expert_adapter}  (the same adapter in PEFT's per-expert layout)"
            )
        if result.adapter_in_format:
            lines.append(f"  as asked  {result.adapter_in_format}  (adapter_format: {args.adapter_format})")
        lines.append(f"  base model {result.base_model}")
        if result.base_model == RANDOM_BASE_NOT_SAVED:
            lines.append("(save_base_model: false: the random base this adapter was trained on is gone)")
            return "\n".join(lines + _checkpoint_lines(result))
        lines += [
            "",
            "Load it:",
            f"  {base_imports}",
            "  from peft import PeftModel",
            f"  model = PeftModel.from_pretrained({base},",
            f'                                    "{result.final_dir}")',
        ]
        merged = result.output_dir / "merged"
        if args.finetuning_type == "lora":
            lines += [
                "Serve it with vLLM / SGLang: merge it into the base model, saved in the per-expert Hub layout:",
                f'  model.merge_and_unload().save_pretrained("{merged}")',
                f"  vllm serve {merged}",
            ]
        elif source.random_init:
            lines.append("(the base is 4-bit random weights: there is no bf16 model to merge into and serve)")
        else:
            lines += [
                "Serve it with vLLM / SGLang: merge it into the bf16 base model, saved in the per-expert Hub layout:",
                f"  {imports}",
                f'  model = PeftModel.from_pretrained({bf16_base}, "{result.final_dir}")',
                f'  model.merge_and_unload().save_pretrained("{merged}")',
                f"  vllm serve {merged}",
            ]
        if result.per_expert_adapter:
            lines.append(
                f"or give {result.per_expert_adapter} as a LoRA adapter to vLLM (MoE models without 3-D expert "
                "weights, e.g. Qwen3-MoE) or SGLang (docs/adapter-formats.md)."
            )
    else:
        lines += [
            f"  model      {result.final_dir}  (per-expert Hub layout, architectures as the original)",
            "",
            "Load it:",
            f'  {imports}; model = {cls}.from_pretrained("{result.final_dir}"{load_kwargs})',
            "Serve it as it is (no conversion needed):",
            f"  vllm serve {result.final_dir}",
        ]
    return "\n".join(lines + _checkpoint_lines(result))


def _checkpoint_lines(result: TrainResult) -> list[str]:
    if not any(result.output_dir.glob("checkpoint-*")):
        return []
    return [f"Checkpoints (resume with --resume_from_checkpoint true): {result.output_dir}/checkpoint-N"]


__all__ = ["TrainResult", "ThroughputCallback", "run_train", "summary", "train"]
