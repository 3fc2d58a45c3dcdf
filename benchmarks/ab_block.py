"""A/B of moefuse settings on the MoE block: the variants alternate round by round in one process.

    python benchmarks/ab_block.py --tokens 4096,16384 \\
        --variant triton-dW:grouped_mm_weight_grad_rows=1000000000 --variant current:
    python benchmarks/ab_block.py --device cpu --tiny --variant a: --variant b:moefuse.ops.routing.TOKEN_SUMS_COLUMNS=64

Why: a GPU's times drift between processes and within minutes by more than the few percent a kernel change is
worth (on an H100 one process timed the same forward+backward at 8.31-8.92 ms per call, and two processes of the
same code 8.48 and 8.84 ms). Timing each variant once per round, round after round in one process, exposes all of
them to the same drift; their medians over rounds compare.

A variant is ``NAME:SETTINGS``, SETTINGS a comma-separated list of moefuse settings ``name=value``
(:mod:`moefuse.settings`) and module constants ``module.attribute=value`` (a Python literal); empty: as installed.
They are in force for the variant's turn only. Each turn times ``--iters``
forward+backward calls of the config's sparse MoE block on moefuse's experts, queued back to back as a training
loop runs them (gradients dropped between calls, as ``moefuse bench --level block`` does), after ``--warmup``
calls; round 0 warms every variant up and is not counted. Before timing, every variant's output and gradients are
compared with the first variant's (a disagreement beyond ``--tolerance`` exits 1). ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU: before moefuse defines them

import moefuse  # noqa: E402, F401  (registers the "moefuse" experts implementation)
from moefuse.bench.block import randomize_  # noqa: E402
from moefuse.bench.configs import load_config, tiny_config  # noqa: E402
from moefuse.bench.measure import (  # noqa: E402
    environment,
    relative_error,
    script_command,
    synchronize,
    write_report,
)
from moefuse.bench.shapes import moe_shape  # noqa: E402
from moefuse.settings import Settings, override_settings, parse_overrides  # noqa: E402


class Variant:
    """A name, the moefuse settings it overrides and the module attributes it sets: ``apply()`` puts them in force,
    ``restore()`` puts the old values back."""

    def __init__(self, spec: str):
        name, sep, settings = spec.partition(":")
        if not sep or not name:
            raise SystemExit(f"ab_block: --variant {spec!r} is not NAME:SETTINGS (SETTINGS may be empty)")
        self.name = name
        items = [item.strip() for item in settings.split(",") if item.strip()]
        setting_names = {f.name for f in dataclasses.fields(Settings)}
        overrides = [item for item in items if item.partition("=")[0].strip() in setting_names]
        try:
            self.overrides = parse_overrides(",".join(overrides))
        except ValueError as error:
            raise SystemExit(f"ab_block: {error}") from None
        self.attributes = [self._parse(item) for item in items if item not in overrides]
        self.saved: list = []
        self.stack = contextlib.ExitStack()

    @staticmethod
    def _parse(item: str) -> tuple[object, str, object]:
        target, sep, text = item.partition("=")
        module_name, _, attribute = target.strip().rpartition(".")
        if not sep or not module_name:
            raise SystemExit(
                f"ab_block: setting {item!r} is neither a moefuse setting nor module.attribute=value"
            )
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise SystemExit(f"ab_block: {module_name} has no attribute {attribute!r} (setting {item!r})")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"ab_block: the value in {item!r} is not a Python literal") from None
        return module, attribute, value

    def apply(self) -> None:
        self.stack.enter_context(override_settings(**self.overrides))
        self.saved = [
            (module, attribute, getattr(module, attribute)) for module, attribute, _ in self.attributes
        ]
        for module, attribute, value in self.attributes:
            setattr(module, attribute, value)

    def restore(self) -> None:
        for module, attribute, value in reversed(self.saved):
            setattr(module, attribute, value)
        self.saved = []
        self.stack.close()

    def describe(self) -> dict:
        attributes = {f"{m.__name__}.{a}": v for m, a, v in self.attributes}
        return {"name": self.name, "settings": {**self.overrides, **attributes}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen3-30b-a3b", help="built-in name, config.json or Hub id")
    p.add_argument("--tiny", action="store_true", help="the config's family at toy sizes (CPU runs, CI)")
    p.add_argument("--tokens", default="4096,16384", help="comma-separated token counts")
    p.add_argument(
        "--variant", action="append", required=True, help="NAME:SETTINGS (repeat; the first is the base)"
    )
    p.add_argument("--rounds", type=int, default=8, help="timed rounds after the warm-up round")
    p.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tolerance", type=float, default=1e-2, help="relative error allowed against the first variant"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.variants = [Variant(spec) for spec in args.variant]
    if len({v.name for v in args.variants}) != len(args.variants):
        raise SystemExit("ab_block: variant names must differ")
    return args


def block_and_inputs(args: argparse.Namespace, config, tokens: int, device: torch.device, dtype: torch.dtype):
    with torch.device(device):
        block = moe_shape(config).block_class(config)
    block.to(dtype)
    randomize_(block, args.seed, getattr(config, "initializer_range", 0.02))
    for module in block.modules():
        if hasattr(getattr(module, "config", None), "_experts_implementation"):
            module.config._experts_implementation = "moefuse"
    generator = torch.Generator(device).manual_seed(args.seed + tokens)
    x = torch.randn(1, tokens, config.hidden_size, device=device, generator=generator).to(dtype)
    grad_out = torch.randn(x.shape, device=device, generator=generator).to(dtype)
    return block, x.requires_grad_(), grad_out


def forward_backward(block: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x.grad = None
    block.zero_grad(set_to_none=True)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return out


def results_of(block: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    out = forward_backward(block, x, grad_out).detach()
    grads = {f"grad {name}": p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return {"output": out, "grad input": x.grad.clone(), **grads}


def timed_turn(block, x, grad_out, device: torch.device, warmup: int, iters: int) -> float:
    """ms per call of ``iters`` calls queued back to back (CUDA events around them; ``perf_counter`` on the CPU)."""
    for _ in range(warmup):
        forward_backward(block, x, grad_out)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            forward_backward(block, x, grad_out)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        forward_backward(block, x, grad_out)
    return (time.perf_counter() - begin) * 1e3 / iters


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # the interpreter's bf16 loads are wrong
    _, config = load_config(args.config)
    config = tiny_config(config) if args.tiny else config
    rows, failures = [], []
    for tokens in args.tokens:
        block, x, grad_out = block_and_inputs(args, config, tokens, device, dtype)
        reference = None
        for variant in args.variants:
            variant.apply()
            try:
                got = results_of(block, x, grad_out)
            finally:
                variant.restore()
            if reference is None:
                reference = got
                continue
            errors = {name: relative_error(got[name], reference[name]) for name in reference}
            worst = max(errors, key=errors.get)
            if not errors[worst] <= args.tolerance:
                failures.append(f"{tokens} tokens: {variant.name} {worst} relative error {errors[worst]:.1e}")
        times = {variant.name: [] for variant in args.variants}
        for round_index in range(args.rounds + 1):
            for variant in args.variants:
                variant.apply()
                try:
                    ms = timed_turn(block, x, grad_out, device, args.warmup, args.iters)
                finally:
                    variant.restore()
                if round_index:  # round 0 warms every variant up (autotuning, compilation)
                    times[variant.name].append(ms)
        base = statistics.median(times[args.variants[0].name])
        for variant in args.variants:
            median = statistics.median(times[variant.name])
            row = {
                "tokens": tokens,
                "variant": variant.name,
                "median_ms": median,
                "min_ms": min(times[variant.name]),
                "max_ms": max(times[variant.name]),
                "speedup_vs_first": base / median,
                "rounds_ms": times[variant.name],
            }
            rows.append(row)
            print(
                f"{tokens:>6} tokens  {variant.name:<24} median {median:8.3f} ms  "
                f"(min {row['min_ms']:.3f}, max {row['max_ms']:.3f})  {row['speedup_vs_first']:.3f}x the first",
                flush=True,
            )
        del block, x, grad_out, reference
    report = {
        "benchmark": "MoE block forward+backward on moefuse's experts, settings alternating round by round",
        "config": config.model_type + (" (tiny)" if args.tiny else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "variants": [variant.describe() for variant in args.variants],
        "rounds": args.rounds,
        "iters": args.iters,
        "rows": rows,
        "failures": failures,
        "env": environment(device),
        "command": script_command(argv),
    }
    if args.out is not None:
        write_report(report, args.out)
    if failures:
        print("\n".join(["variants disagree with the first:", *failures]), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
