"""Where one training step of a causal MoE LM spends its time: host (Python) cost, host syncs, GPU kernels.

    python benchmarks/step_profile.py                          # 4 layers at Qwen3-30B-A3B dims, 2048 tokens, LoRA r16
    python benchmarks/step_profile.py --tokens 4096 --report gpu --implementation grouped_mm
    python benchmarks/step_profile.py --report syncs           # every op that synchronises the host, with its stack
    python benchmarks/step_profile.py --device cpu --tiny --report host   # toy sizes on the CPU (CI)

The model is the config's causal LM with random weights and LoRA (``--setup lora``: attention + the experts,
moefuse's per-expert adapters or PEFT's ``target_parameters`` as ``moefuse bench`` sets them) or full fine-tuning,
one AdamW step per call. After warm-up steps it prints host and wall time per step (host close to wall: the step is
bound by the CPU, not the GPU), then the chosen reports:

- ``host``: cProfile of the steps, functions by own time (Triton launches show as ``autotuner.py`` / ``jit.py``);
- ``syncs``: ``torch.cuda.set_sync_debug_mode("warn")`` over one step, each synchronising call site once, with a count;
- ``gpu``: ``torch.profiler`` kernels by CUDA time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import Counter

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import moefuse  # noqa: F401  (registers the "moefuse" experts implementation)
from moefuse.bench.configs import DEFAULT_CONFIG, load_config, tiny_config, with_layers
from moefuse.bench.implementations import parse_implementations
from moefuse.bench.measure import format_sync_site, recorded_syncs
from moefuse.bench.model import lora_config_for, set_model_kernels

REPORTS = ("host", "syncs", "gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help="built-in name, config.json, or Hub id (config only)"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048, help="one sequence of this many tokens per step")
    p.add_argument("--setup", choices=("lora", "full"), default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--implementation",
        default="moefuse",
        help="moefuse or a Transformers experts implementation; suffixes '+loss' and '+norm' (moefuse+loss+norm) "
        "take moefuse's causal-LM loss and RMSNorm instead of Transformers' (as moefuse bench names them)",
    )
    p.add_argument("--report", default="host,syncs", help=f"comma-separated, of {', '.join(REPORTS)}")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=40, help="lines per table")
    p.add_argument("--tiny", action="store_true", help="the config's family at toy sizes")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = p.parse_args(argv)
    unknown = set(args.report.split(",")) - set(REPORTS)
    if unknown:
        p.error(f"unknown report(s) {', '.join(sorted(unknown))}: choose among {', '.join(REPORTS)}")
    return args


def build_step(args: argparse.Namespace):
    """The model (random weights, on the device) and a function that runs one training step."""
    _, config = load_config(args.config)
    if args.tiny:
        config = tiny_config(config)
    config = with_layers(config, args.layers)
    config.use_cache = False
    (implementation,) = parse_implementations(args.implementation)
    config._experts_implementation = implementation.experts
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        # Transformers picks the attention: SDPA where the family takes it, eager elsewhere (GPT-OSS's sinks)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    if args.setup == "lora":
        model = get_peft_model(model, lora_config_for(args.rank, implementation.is_moefuse))
    set_model_kernels(model, implementation)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda" or None)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=args.device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_and_wall(step, steps: int, device: str) -> tuple[float, float]:
    """Seconds per step spent issuing the work (host) and until the device finished it (wall)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - start
    _sync(device)
    return host / steps, (time.perf_counter() - start) / steps


def host_report(step, steps: int, device: str, rows: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    _sync(device)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def sync_report(step) -> Counter:
    """Each synchronising call site of one step (its stack), with how often it ran."""
    with recorded_syncs(depth=14) as sites:
        step()
    return Counter({format_sync_site(stack): count for stack, count in sites.items()})


def gpu_report(step, steps: int, device: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    reports = args.report.split(",")
    step = build_step(args)
    for _ in range(3):  # kernels compile and tune here
        step()
    host, wall = host_and_wall(step, args.steps, args.device)
    print(
        f"{args.implementation} {args.setup}, {args.layers} layers, {args.tokens} tokens: "
        f"host {host * 1e3:.1f} ms/step, wall {wall * 1e3:.1f} ms/step"
    )
    result: dict = {"host_ms": host * 1e3, "wall_ms": wall * 1e3}
    if "host" in reports:
        host_report(step, args.steps, args.device, args.rows)
    if "syncs" in reports:
        if args.device != "cuda":
            print("syncs: needs a CUDA device (skipped)")
        else:
            sites = sync_report(step)
            print(f"syncs: {len(sites)} synchronising call sites in one step")
            for site, count in sites.most_common():
                print(f"--- x{count}: {site}")
            result["sync_sites"] = len(sites)
    if "gpu" in reports:
        gpu_report(step, args.steps, args.device, args.rows)
    return result


if __name__ == "__main__":
    main()
