"""QLoRA of a whole MoE model at real dimensions: peak GPU memory and tokens/s of training steps.

    python benchmarks/qlora.py                  # Qwen3-30B-A3B, all 48 layers, random weights, QLoRA r16
    python benchmarks/qlora.py --mode lora      # the same LoRA on bf16 weights (about 70 GB: an 80 GB GPU)
    python benchmarks/qlora.py --mode lora --experts-implementation grouped_mm   # Transformers' experts + PEFT
    python benchmarks/qlora.py --expert-rank 4  # rank 16 on attention, 4 on the experts
    python benchmarks/qlora.py --device cpu --tiny --steps 2      # toy sizes on the CPU (CI)

``qlora``: experts in 4-bit (:mod:`moefuse.quant`, NF4 with nested absmax), the other linear layers in
bitsandbytes NF4 (``Linear4bit``, bf16 compute), embeddings and norms in bf16; ``lora``: everything in bf16.
Both: LoRA (PEFT through moefuse) of rank ``--rank`` on the attention projections and every expert's gate, up and
down projections (``--expert-rank`` on the experts where given), adapters in ``--adapter-dtype``, the loss
without fp32 copies of the logits (``--loss``), gradient checkpointing, one random sequence of ``--seq``
tokens per step (batch ``--batch``), bitsandbytes' paged 8-bit AdamW. The model is built on the GPU one expert
stack at a time (:func:`moefuse.quant.model.from_config`), never in bf16 whole.

Reported (and written to ``--out``, default ``benchmarks/results/qlora_<config>_<mode>_<gpu>.json``): GPU memory
held by the weights, by the adapters, ``torch.cuda.max_memory_allocated`` over the timed steps (what the
target of at most 20 GB for Qwen3-30B-A3B is about; bitsandbytes' paged optimizer states live in CUDA managed
memory, outside PyTorch's allocator, and are reported apart as the device's used memory), step times, tokens/s
and the losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.autograd.graph import save_on_cpu
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import moefuse  # noqa: F401  (registers the "moefuse" experts implementation)
from moefuse.bench.configs import DEFAULT_CONFIG, load_config, tiny_config, with_layers
from moefuse.bench.measure import environment, kept_path, script_command, write_report
from moefuse.bench.model import lora_config_for
from moefuse.lora import lora_config
from moefuse.lora.targets import PROJECTIONS
from moefuse.ops.cross_entropy import use_chunked_loss
from moefuse.ops.rms_norm import use_fused_rms_norm
from moefuse.quant import ExpertWeights4bit
from moefuse.quant.model import from_config

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help="built-in name, config.json, or Hub id (config only)"
    )
    p.add_argument("--layers", type=int, default=None, help="first N decoder layers (default: all)")
    p.add_argument("--mode", choices=("qlora", "lora"), default="qlora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--expert-rank", type=int, default=None, help="rank of the experts' adapters (default --rank)"
    )
    p.add_argument(
        "--experts-implementation",
        default="moefuse",
        help="lora mode: a Transformers experts implementation (e.g. grouped_mm) runs the baseline, PEFT's "
        "target_parameters LoRA on the stacked expert weights",
    )
    p.add_argument("--adapter-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (Triton tuning happens here)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--optim",
        choices=("paged_adamw_8bit", "adamw_8bit", "adamw"),
        default=None,
        help="default: paged_adamw_8bit on a GPU, adamw on the CPU",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="tensors saved in the forward (with checkpointing: each layer's input) wait in pinned CPU memory "
        "for the backward (torch.autograd.graph.save_on_cpu)",
    )
    p.add_argument(
        "--step-in-backward",
        action="store_true",
        help="one optimizer per adapter tensor, stepped as soon as its gradient is complete (a hook), so the "
        "adapters' gradients are never all held at once",
    )
    p.add_argument(
        "--loss",
        choices=("trl-fused", "chunked", "transformers"),
        default=None,
        help="trl-fused: TRL's fused LM head (what moefuse train gets from SFTTrainer: the logits are never "
        "built whole); chunked: moefuse.ops.cross_entropy (the whole logits, no fp32 copies); transformers: its "
        "ForCausalLMLoss. Default: trl-fused where TRL has it, else chunked",
    )
    p.add_argument(
        "--norm",
        choices=("transformers", "moefuse"),
        default="transformers",
        help="RMSNorm modules: their own forward, or moefuse.ops.rms_norm (one kernel each way; moefuse train's "
        "default)",
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction): a memory claim holds "
        "only if the run completes under it",
    )
    p.add_argument("--tiny", action="store_true", help="the config's family at toy sizes")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.experts_implementation != "moefuse" and (args.mode == "qlora" or args.expert_rank is not None):
        p.error("--experts-implementation other than moefuse runs --mode lora at one --rank only")
    if args.loss is None:
        args.loss = "trl-fused" if _trl_fused_lm_head() is not None else "chunked"
    elif args.loss == "trl-fused" and _trl_fused_lm_head() is None:
        p.error(
            "--loss trl-fused needs TRL >= 1.0 (trl.trainer.utils.add_fused_lm_head): pip install 'trl>=1.0'"
        )
    if args.optim is None:
        args.optim = "paged_adamw_8bit" if args.device == "cuda" else "adamw"
    return args


def _trl_fused_lm_head():
    """TRL's ``add_fused_lm_head`` (TRL >= 1.0), or ``None``."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        return None
    return add_fused_lm_head


def build_model(args: argparse.Namespace, config, device: torch.device) -> torch.nn.Module:
    config.use_cache = False
    if args.mode == "qlora":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return from_config(config, bnb, device=device, dtype=torch.bfloat16)
    config._experts_implementation = args.experts_implementation
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def adapter_config(args: argparse.Namespace) -> LoraConfig:
    """LoRA ``--rank`` on attention and the experts, the experts at ``--expert-rank`` (alpha 2 x rank each)."""
    if args.experts_implementation != "moefuse":
        return lora_config_for(args.rank, moefuse=False)
    expert_rank = args.expert_rank or args.rank
    experts = [f"experts.{p}" for p in PROJECTIONS]
    return lora_config(
        args.rank,
        rank_pattern={t: expert_rank for t in experts if expert_rank != args.rank},
        alpha_pattern={t: 2 * expert_rank for t in experts if expert_rank != args.rank},
    )


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    return (bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit)(params, lr=lr)


def step_in_backward(name: str, params: list[torch.Tensor], lr: float) -> list[torch.optim.Optimizer]:
    """An optimizer per tensor, stepped (and its gradient freed) by a hook when backward has accumulated it."""
    optimizers = {p: make_optimizer(name, [p], lr) for p in params}

    def step(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for p in params:
        p.register_post_accumulate_grad_hook(step)
    return list(optimizers.values())


def allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    label, config = load_config(args.config)
    if args.tiny:
        config = tiny_config(config)
    if args.layers is not None:
        config = with_layers(config, args.layers)
    memory: dict[str, float | None] = {}
    if args.memory_cap_gib is not None:
        if device.type != "cuda":
            raise SystemExit("qlora.py: --memory-cap-gib caps GPU memory; it needs --device cuda")
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total), index)

    start = time.perf_counter()
    model = build_model(args, config, device)
    build_s = time.perf_counter() - start
    memory["weights_gib"] = allocated(device)
    experts_4bit = sum(p.nbytes_4bit() for p in model.parameters() if isinstance(p, ExpertWeights4bit))
    if args.loss == "chunked":
        use_chunked_loss(model)
    elif args.loss == "trl-fused":
        _trl_fused_lm_head()(model)  # before PEFT wraps the model, as TRL asks
    if args.norm == "moefuse":
        use_fused_rms_norm(model)
    loss_kwargs = {"fused_lm_head": True} if args.loss == "trl-fused" else {}
    pin = device.type == "cuda"
    offload = (lambda: save_on_cpu(pin_memory=pin)) if args.offload_activations else nullcontext
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model, adapter_config(args), autocast_adapter_dtype=args.adapter_dtype == "fp32"
    ).train()
    params = [p for p in model.parameters() if p.requires_grad]
    memory["adapters_gib"] = (
        (allocated(device) or 0) - (memory["weights_gib"] or 0) if device.type == "cuda" else None
    )
    if args.step_in_backward:
        optimizers = step_in_backward(args.optim, params, args.lr)
    else:
        optimizers = [make_optimizer(args.optim, params, args.lr)]

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    losses, times = [], []
    out_of_memory = None
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup and device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with offload():
                loss = model(input_ids=input_ids, labels=input_ids, **loss_kwargs).loss
            loss.backward()
            if not args.step_in_backward:
                optimizers[0].step()
                optimizers[0].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            print(f"step {step}: loss {losses[-1]:.4f}, {time.perf_counter() - t0:.2f} s", flush=True)
    except torch.OutOfMemoryError as error:  # an answer too ("does it fit?"): reported, not raised
        out_of_memory = f"step {len(losses)}: {str(error).splitlines()[0]}"
        print(f"out of memory at {out_of_memory}", flush=True)
    if device.type == "cuda":
        memory["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        memory["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        free, total = torch.cuda.mem_get_info(device)
        memory["device_used_gib_after"] = (total - free) / GIB  # CUDA context, caches, paged optimizer pages
    step_s = statistics.median(times) if times else None
    tokens = args.batch * args.seq
    report = {
        "benchmark": "QLoRA/LoRA training steps of a whole model at the config's dims",
        "config": label if not args.tiny else f"{label} (tiny)",
        "layers": config.num_hidden_layers,
        "mode": args.mode,
        "rank": args.rank,
        "expert_rank": args.expert_rank or args.rank,
        "experts_implementation": args.experts_implementation,
        "adapter_dtype": args.adapter_dtype,
        "optimizer": args.optim,
        "gradient_checkpointing": not args.no_checkpointing,
        "step_in_backward": args.step_in_backward,
        "offload_activations": args.offload_activations,
        "loss": args.loss,
        "norm": args.norm,
        "seq": args.seq,
        "batch": args.batch,
        "trainable_params": sum(p.numel() for p in params),
        "experts_4bit_gib": experts_4bit / GIB,
        "memory": memory,
        "memory_cap_gib": args.memory_cap_gib,
        "build_s": build_s,
        "step_s": times,
        "median_step_s": step_s,
        "tokens_per_s": tokens / step_s if step_s else None,
        "out_of_memory": out_of_memory,
        "losses": losses,
        "env": environment(device),
        "command": script_command(argv),
    }
    print(json.dumps({k: report[k] for k in ("memory", "tokens_per_s", "median_step_s")}, indent=2))
    out = args.out
    if out is None:
        gpu = "".join(c if c.isalnum() else "_" for c in report["env"].get("gpu", "cpu")).strip("_")
        suffix = "" if args.experts_implementation == "moefuse" else f"_{args.experts_implementation}"
        suffix += f"_experts-r{args.expert_rank}" if args.expert_rank else ""
        suffix += "_step-in-backward" if args.step_in_backward else ""
        suffix += "_offload" if args.offload_activations else ""
        suffix += "_moefuse-norm" if args.norm == "moefuse" else ""
        suffix += f"_cap{args.memory_cap_gib:g}GiB" if args.memory_cap_gib is not None else ""
        out = kept_path(
            Path(__file__).resolve().parent / "results" / f"qlora_{label}_{args.mode}{suffix}_{gpu}.json",
            report["env"],
        )
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
