"""The MoE block's GEMM floor: what its six expert products cost on the fastest library GEMMs, beside the block.

    python benchmarks/gemm_floor.py --tokens 4096,16384 --out gemm_floor.json    # on a GPU
    python benchmarks/gemm_floor.py --device cpu --tiny                          # toy sizes on the CPU (CI)

Training the experts takes six GEMMs per projection pair: gate/up and down, each forward, input gradient and weight
gradient (``3 * 2 * T·K * expert_params`` FLOPs). No experts implementation can run its forward+backward faster than
those GEMMs alone, whatever it fuses. This times them, in one process, on four floors:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` (CUTLASS on Hopper) on the rows per expert of a random top-k
  (what a MoE block meets: uneven counts, each expert's last row tile part empty);
- ``grouped_mm balanced``: the same with every expert given exactly ``T·K / E`` rows (its difference to the first
  is what uneven counts cost);
- ``bmm``: cuBLAS batched matmuls on those balanced rows (cuBLAS's own kernel choice per shape);
- ``bmm+overflow``: the random top-k's rows laid out as a sync-free kernel could take them: each expert's first
  ``T·K / E`` rows in one batched matmul, the rows past them in a ``grouped_mm``, the weight gradients on
  ``grouped_mm`` (the copies into that layout not counted);

and beside them the block itself, forward+backward, with Transformers' ``grouped_mm`` experts and with moefuse's
(``moefuse bench --level block``'s workload and timing). It prints the block's time at a target speed-up over
``grouped_mm`` (``--target``, 2.5 by default) and what that leaves, after each floor, for everything that is not
a GEMM (router, routing, SwiGLU, the sum over k, operand copies). A negative margin means the target asks for GEMMs
faster than that library's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU: before moefuse defines them

import torch.nn.functional as F  # noqa: E402

import moefuse  # noqa: E402, F401  (registers the "moefuse" experts implementation)
from moefuse.bench.block import cases  # noqa: E402
from moefuse.bench.configs import load_config, tiny_config  # noqa: E402
from moefuse.bench.implementations import parse_implementations  # noqa: E402
from moefuse.bench.measure import environment, script_command, time_call, write_report  # noqa: E402
from moefuse.bench.runner import BenchContext  # noqa: E402
from moefuse.bench.shapes import moe_shape  # noqa: E402

ROW_PRODUCTS = ("gate_up forward", "down forward", "down input grad", "gate_up input grad")
WEIGHT_GRADS = ("down weight grad", "gate_up weight grad")


def operands(rows: int, shape, device, dtype, generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each product's two operands as a MoE layer holds them: activations ``[rows, features]`` row-major, weights
    ``[E, out, in]`` (read transposed by the forward). Row products: ``a [rows, K] @ b[e] [K, N]``; weight
    gradients: ``a[rows of e]ᵀ @ b[rows of e]``."""
    experts, hidden, inter, gu = shape.num_experts, shape.hidden, shape.intermediate, shape.gate_up_rows

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=generator).to(dtype)

    x, h, d_pre, d_out = rand(rows, hidden), rand(rows, inter), rand(rows, gu), rand(rows, hidden)
    w_gate_up, w_down = rand(experts, gu, hidden), rand(experts, hidden, inter)
    return {
        "gate_up forward": (x, w_gate_up.transpose(1, 2)),
        "down forward": (h, w_down.transpose(1, 2)),
        "down input grad": (d_out, w_down),
        "gate_up input grad": (d_pre, w_gate_up),
        "down weight grad": (d_out, h),
        "gate_up weight grad": (d_pre, x),
    }


def grouped_mm_calls(ops: dict, m_sizes: torch.Tensor) -> dict[str, object]:
    """The six products on ``grouped_mm``, rows grouped by expert (``m_sizes``)."""
    offs = torch.cumsum(m_sizes, 0).to(torch.int32)
    calls = {}
    for name, (a, b) in ops.items():
        lhs = a.t() if name in WEIGHT_GRADS else a  # weight gradients reduce over each expert's rows
        calls[name] = lambda lhs=lhs, b=b: F.grouped_mm(lhs, b, offs=offs)
    return calls


def bmm_calls(ops: dict, experts: int, rows_per_expert: int) -> dict[str, object]:
    """The six products as cuBLAS batched matmuls, ``rows_per_expert`` rows for every expert."""
    used = experts * rows_per_expert
    calls = {}
    for name, (a, b) in ops.items():
        a3 = a[:used].view(experts, rows_per_expert, -1)
        if name in WEIGHT_GRADS:
            b3 = b[:used].view(experts, rows_per_expert, -1)
            calls[name] = lambda a3=a3, b3=b3: torch.bmm(a3.transpose(1, 2), b3)
        else:
            calls[name] = lambda a3=a3, b=b: torch.bmm(a3, b)
    return calls


def bucketed_calls(ops: dict, m_sizes: torch.Tensor, rows_per_expert: int) -> dict[str, object]:
    """A layout a grouped GEMM could take without host syncs: every expert's first ``rows_per_expert`` rows (the
    mean, known on the host) in one batched matmul (rows an expert lacks are padding), the rows past them in a
    ``grouped_mm``; the weight gradients stay on ``grouped_mm`` (summing two partial ``dW`` would cost a pass over
    the expert stacks)."""
    experts = m_sizes.numel()
    overflow = (m_sizes - rows_per_expert).clamp(min=0)
    overflow_rows = int(overflow.sum())
    overflow_offs = torch.cumsum(overflow, 0).to(torch.int32)
    batched = bmm_calls(ops, experts, rows_per_expert)
    calls = grouped_mm_calls(ops, m_sizes)
    for name in ROW_PRODUCTS:
        a, b = ops[name]
        calls[name] = lambda name=name, a=a, b=b: (
            batched[name](),
            F.grouped_mm(a[:overflow_rows], b, offs=overflow_offs),
        )
    return calls


def time_ms(fn, device: torch.device, args: argparse.Namespace) -> float:
    return time_call(fn, device, warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds).median_ms


def measure(args: argparse.Namespace, config, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    shape = moe_shape(config)
    generator = torch.Generator(device).manual_seed(args.seed + tokens)
    assignments = tokens * shape.top_k
    # A random router's top-k: the rows each expert gets (uneven, as a block's router gives them).
    scores = torch.rand(tokens, shape.num_experts, device=device, generator=generator)
    top_k_index = scores.topk(shape.top_k, dim=-1).indices
    m_sizes = torch.bincount(top_k_index.reshape(-1), minlength=shape.num_experts)
    rows_per_expert = max(1, assignments // shape.num_experts)
    flops = 3 * 2 * assignments * shape.expert_params
    result: dict = {"tokens": tokens, "rows": assignments, "flops": flops, "floors": {}}
    ops = operands(assignments, shape, device, dtype, generator)
    for floor, calls in (
        ("grouped_mm", grouped_mm_calls(ops, m_sizes)),
        ("grouped_mm balanced", grouped_mm_calls(ops, torch.full_like(m_sizes, rows_per_expert))),
        ("bmm", bmm_calls(ops, shape.num_experts, rows_per_expert)),
        ("bmm+overflow", bucketed_calls(ops, m_sizes, rows_per_expert)),
    ):
        times = {name: time_ms(fn, device, args) for name, fn in calls.items()}
        result["floors"][floor] = {"products_ms": times, "total_ms": sum(times.values())}
    del ops, calls
    ctx = BenchContext(
        config=config,
        shape=shape,
        device=device,
        dtype=dtype,
        implementations=parse_implementations("grouped_mm,moefuse"),
        seed=args.seed,
    )
    result["block_fwd_bwd_ms"] = {}
    for case in cases(ctx, tokens):
        workload = case.make()
        with case.implementation.active():
            result["block_fwd_bwd_ms"][case.label] = time_ms(
                lambda w=workload: w.run("fwd+bwd"), device, args
            )
        workload.close()
    target = result["block_fwd_bwd_ms"]["grouped_mm"] / args.target
    result["target_ms"] = target
    result["margin_ms"] = {floor: target - f["total_ms"] for floor, f in result["floors"].items()}
    return result


def report_lines(result: dict, target: float) -> list[str]:
    blocks = result["block_fwd_bwd_ms"]
    lines = [
        f"{result['tokens']} tokens ({result['rows']} rows): block fwd+bwd grouped_mm {blocks['grouped_mm']:.3f} ms, "
        f"moefuse {blocks['moefuse']:.3f} ms ({blocks['grouped_mm'] / blocks['moefuse']:.2f}x); "
        f"{target}x means {result['target_ms']:.3f} ms"
    ]
    for floor, f in result["floors"].items():
        rate = result["flops"] / (f["total_ms"] * 1e-3) / 1e12
        parts = ", ".join(f"{name} {ms:.3f}" for name, ms in f["products_ms"].items())
        lines.append(
            f"  {floor:>19}: GEMMs {f['total_ms']:.3f} ms ({rate:.3g} TFLOP/s), leaving "
            f"{result['margin_ms'][floor]:+.3f} ms for the rest  [{parts}]"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen3-30b-a3b", help="built-in name, config.json or Hub id")
    p.add_argument("--tiny", action="store_true", help="the config's family at toy sizes (CPU runs, CI)")
    p.add_argument("--tokens", default="4096,16384", help="comma-separated token counts")
    p.add_argument("--target", type=float, default=2.5, help="speed-up over grouped_mm to budget for")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=10.0, help="cap per timed callable")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, config = load_config(args.config)
    if args.tiny:
        config = tiny_config(config)
    results = []
    for tokens in args.tokens:
        result = measure(args, config, tokens, device, dtype)
        print("\n".join(report_lines(result, args.target)), flush=True)
        results.append(result)
    report = {
        "benchmark": "gemm_floor",
        "config": args.config + (" (tiny)" if args.tiny else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "target": args.target,
        "results": results,
        "env": environment(device),
        "command": script_command(argv),
    }
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
