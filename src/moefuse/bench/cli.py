"""``moefuse bench``: moefuse side by side with Transformers' experts implementations; added by :func:`add_parsers`."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .implementations import DEFAULT_IMPLEMENTATIONS
from .measure import NOISE_FLOOR_MARGIN, TOLERANCES

LEVELS = ("op", "block", "model")
DEFAULT_TOKENS = {"op": "4096,16384", "block": "4096,16384", "model": "4096"}
TINY_TOKENS = {"op": "64,128", "block": "64,128", "model": "64"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(allowed)} (comma-separated), got {text!r}"
            )
        return values

    return parse


def _json_safe(value):
    """Non-finite floats as strings (JSON has no inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _device_slug(environment: dict) -> str:
    name = environment.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, every setting spelled out (defaults included)."""
    parts = ["moefuse", "bench", "--level", ",".join(args.level), "--config", args.config]
    if args.tokens:
        parts += ["--tokens", ",".join(map(str, args.tokens))]
    parts += ["--implementations", args.implementations]
    if args.modes:
        parts += ["--modes", ",".join(args.modes)]
    if "model" in args.level:
        parts += [
            "--layers",
            str(args.layers),
            "--seq-len",
            str(args.seq_len),
            "--setups",
            ",".join(args.setups),
        ]
        parts += ["--lora-rank", str(args.lora_rank)]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--tolerance", args.tolerance)):
        if value is not None:
            parts += [flag, str(value)]
    if args.tiny:
        parts.append("--tiny")
    parts += [
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--max-seconds",
        f"{args.max_seconds:g}",
    ]
    parts += ["--seed", str(args.seed)]
    if args.output:
        parts += ["--output", args.output]
    return shlex.join(parts)


def run_bench(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Run every level asked for; the JSON-ready result and the failures (empty when every check passed)."""
    import torch

    from . import block, model, op
    from .configs import load_config, tiny_config
    from .implementations import parse_implementations
    from .measure import DTYPES, default_device, dense_matmul_rate, environment, free_memory
    from .runner import BenchContext, add_ratios, failures, run_group
    from .shapes import moe_shape

    started = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    name, config = load_config(args.config)
    if args.tiny:
        config = tiny_config(config)
    shape = moe_shape(config)
    implementations = parse_implementations(args.implementations)
    modules = {"op": op, "block": block, "model": model}
    setups = [s for s in args.setups if model.unsupported_setup(s) is None]
    skipped = [
        {"level": "model", "what": s, "reason": model.unsupported_setup(s)}
        for s in args.setups
        if "model" in args.level and model.unsupported_setup(s)
    ]
    skipped += [
        {"level": level, "what": impl.name, "reason": modules[level].unsupported(impl)}
        for level in args.level
        for impl in implementations
        if modules[level].unsupported(impl)
    ]
    for entry in skipped:
        print(f"moefuse bench: {entry['level']} {entry['what']}: {entry['reason']}", file=sys.stderr)

    options = {"layers": args.layers, "seq_len": args.seq_len, "setups": setups, "lora_rank": args.lora_rank}
    timing = {"warmup": args.warmup, "iters": args.iters, "max_seconds": args.max_seconds}
    env = environment(device)
    dense = dense_matmul_rate(device, DTYPES[dtype_name], 8192 if device.type == "cuda" else 256)
    print(
        f"moefuse bench: {name}{' (tiny)' if args.tiny else ''} on {env.get('gpu') or 'cpu'}, {dtype_name}; "
        f"dense matmul {dense['tflops']:.3g} TFLOP/s",
        file=sys.stderr,
    )

    plan = []
    for level in args.level:
        tokens = args.tokens or _int_list((TINY_TOKENS if args.tiny else DEFAULT_TOKENS)[level])
        impls = [i for i in implementations if modules[level].unsupported(i) is None]
        groups = {"op": 2, "block": 1, "model": len(setups)}[level]
        level_modes = list(modules[level].MODES)  # the model level times whole steps, whatever --modes says
        modes = [m for m in args.modes or level_modes if m in level_modes] or level_modes
        plan.append((level, tokens, impls, modes, groups))

    from tqdm.auto import tqdm

    rows: list[dict] = []
    total = sum(len(tokens) * len(impls) * groups for _, tokens, impls, _, groups in plan)
    with tqdm(
        total=total, desc="moefuse bench", unit="case", file=sys.stderr, disable=args.quiet
    ) as progress:
        for level, tokens_list, impls, modes, _ in plan:
            if not impls or (level == "model" and not setups):
                continue
            tolerance = args.tolerance or TOLERANCES[dtype_name]
            ctx = BenchContext(config, shape, device, DTYPES[dtype_name], impls, args.seed, options)
            for tokens in tokens_list:
                cases = modules[level].cases(ctx, tokens)
                for group in dict.fromkeys(c.group for c in cases):
                    group_cases = [c for c in cases if c.group == group]
                    rows += run_group(level, group_cases, tokens, modes, ctx, tolerance, timing, progress)
                cases = group_cases = None  # the level's model, weights and inputs go before the next size
                free_memory(device)
    add_ratios(rows, dense["tflops"])
    problems = failures(rows)
    result = {
        "moefuse_bench": 1,
        "command": command_line(args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "levels": list(args.level),
        "config": {"name": name, "tiny": args.tiny, "model_type": config.model_type, **shape.as_dict()},
        "dtype": dtype_name,
        "implementations": [i.name for i in implementations],
        "options": {**options, "setups_asked": list(args.setups)},
        "timing": timing,
        "tolerance": args.tolerance or TOLERANCES[dtype_name],
        "descriptions": {level: modules[level].DESCRIPTION for level in args.level},
        "flops_formulas": {level: modules[level].FLOPS_FORMULA for level in args.level},
        "environment": env,
        "dense_matmul": dense,
        "skipped": skipped,
        "rows": rows,
        "ok": not problems,
        "failures": problems,
    }
    return result, problems


def _print_plots(result: dict, json_path: Path) -> None:
    from .plots import write_plots

    plots = write_plots(result, json_path)
    print(plots if isinstance(plots, str) else "wrote " + ", ".join(map(str, plots)))


def cmd_bench(args: argparse.Namespace) -> int:
    from .measure import kept_path, write_report
    from .report import load_results, markdown_tables, ordered_rows, terminal_table, update_readme

    if args.report:
        results = load_results(args.report)
        tables = markdown_tables(results)
        if args.readme:
            update_readme(Path(args.readme), tables)
            print(f"wrote the tables of {len(args.report)} runs into {args.readme}")
        else:
            print(tables, end="")
        if args.plots:  # e.g. for runs made on a machine without matplotlib
            for path, result in results:
                _print_plots(result, Path(path))
        return 0
    if args.readme:
        print("moefuse bench: --readme goes with --report FILE...", file=sys.stderr)
        return 2
    result, problems = run_bench(args)
    output = (
        Path(args.output)
        if args.output
        else kept_path(
            Path(f"moefuse_bench_{'_'.join(args.level)}_{_device_slug(result['environment'])}.json"),
            result["environment"],
        )
    )
    print(terminal_table(ordered_rows(result["rows"], result)))
    write_report(_json_safe(result), output)
    if args.plots:
        _print_plots(result, output)
    for line in problems:
        print(f"moefuse bench: FAILED: {line}", file=sys.stderr)
    return 1 if problems else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``moefuse`` command's subparsers."""
    from .configs import BUILTIN_CONFIGS, DEFAULT_CONFIG

    bench = sub.add_parser(
        "bench",
        help="benchmark moefuse against Transformers' eager and grouped_mm experts (table, JSON, plots)",
        description="Benchmark moefuse side by side with Transformers' experts implementations, in one process on "
        "the same inputs and weights. Every implementation's outputs and gradients are first checked against "
        "Transformers' eager (else grouped_mm); a disagreement beyond tolerance fails the run (exit 1). Times "
        "are medians of CUDA-event timed calls; TFLOP/s use each level's FLOP formula (written to the JSON) "
        "and are set against a dense matmul measured in the same run.",
    )
    what = bench.add_argument_group("what to run")
    what.add_argument(
        "--level",
        type=_choices(LEVELS),
        default=["block"],
        help="comma-separated levels: op (one grouped GEMM, fwd and bwd), block (router + experts), "
        "model (a causal LM with --layers layers, one AdamW step); default block",
    )
    what.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"model shapes: a built-in name ({', '.join(BUILTIN_CONFIGS)}), a config.json or a folder holding "
        f"one, or a Hugging Face Hub model id (only its config is downloaded); default {DEFAULT_CONFIG}",
    )
    what.add_argument(
        "--tokens",
        type=_int_list,
        help="comma-separated token counts per step, e.g. 4096,16384 "
        "(default: op/block 4096,16384, model 4096; with --tiny 64,128 and 64)",
    )
    what.add_argument(
        "--implementations",
        default=DEFAULT_IMPLEMENTATIONS,
        help="comma-separated: moefuse (its backend chosen automatically) or moefuse:BACKEND to force one "
        f"(torch, triton), and Transformers' experts implementations (eager, grouped_mm, batched_mm, ...); "
        "suffixes (model level): '+loss' computes the loss with moefuse's causal_lm_loss instead of "
        "Transformers', '+norm' runs the RMSNorm modules through moefuse's rms_norm, '+rope' the rotary "
        "embeddings through moefuse's kernel (e.g. moefuse+loss+norm+rope); "
        f"default {DEFAULT_IMPLEMENTATIONS}",
    )
    what.add_argument(
        "--modes",
        type=_choices(("fwd", "fwd+bwd")),
        help="op/block: fwd (forward with autograd recording, as in training) and/or fwd+bwd (default both); "
        "the model level always times a whole step",
    )
    what.add_argument("--layers", type=int, default=4, help="model level: decoder layers (default 4)")
    what.add_argument(
        "--seq-len", type=int, default=4096, help="model level: tokens per sequence (default 4096)"
    )
    what.add_argument(
        "--setups",
        type=_choices(("full", "lora", "qlora")),
        default=["full", "lora", "qlora"],
        help="model level: full fine-tune, LoRA on attention + experts (moefuse's PEFT LoRA vs PEFT "
        "target_parameters), QLoRA (skipped: benchmarks/qlora.py measures it); default full,lora,qlora",
    )
    what.add_argument(
        "--lora-rank", type=int, default=16, help="model level: LoRA rank, lora_alpha = 2 * rank (default 16)"
    )
    where = bench.add_argument_group("where and how")
    where.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    where.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="weights and activations (default: bf16 on cuda, fp32 on cpu)",
    )
    where.add_argument(
        "--tiny",
        action="store_true",
        help="the config's family at toy sizes (8 experts, top-2, hidden 64): for CPU runs and CI",
    )
    where.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per case before timing (default 3)"
    )
    where.add_argument(
        "--iters", type=int, default=15, help="timed calls per case, the median is reported (default 15)"
    )
    where.add_argument(
        "--max-seconds",
        type=float,
        default=10.0,
        help="time cap in seconds per case and mode, warm-up included; at least 1 warm-up and 3 timed calls run "
        "(default 10)",
    )
    where.add_argument(
        "--tolerance",
        type=float,
        help="largest relative error ||x - ref|| / ||ref|| accepted per output and gradient (default by dtype: "
        + ", ".join(f"{d} {t:g}" for d, t in TOLERANCES.items())
        + f"); the model level allows {NOISE_FLOOR_MARGIN:g}x a tensor's noise floor where that is larger: its "
        "distance from the reference when the reference's experts outputs are perturbed by one rounding unit "
        "(from layer 2 on, rounding flips near-tie routing decisions)",
    )
    where.add_argument(
        "--seed", type=int, default=0, help="seed of weights, inputs and LoRA factors (default 0)"
    )
    out = bench.add_argument_group("output")
    out.add_argument(
        "--output",
        help="JSON file for every figure, never overwritten (default: moefuse_bench_<levels>_<device>_<commit>_<UTC time>.json here)",
    )
    out.add_argument(
        "--plots",
        action="store_true",
        help="also write <output stem>_speedup.png and _memory.png (with --report: beside each JSON); needs "
        "matplotlib: pip install 'moefuse[bench]'",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="run nothing: print the markdown tables of saved runs (e.g. benchmarks/results/*.json)",
    )
    out.add_argument(
        "--readme", help="with --report: write the tables between the report markers of this file"
    )
    bench.set_defaults(func=cmd_bench)
