"""4-bit experts' grouped GEMMs (dequantise-then-GEMM) against the same GEMMs on bf16 weights: what 4-bit costs.

    python benchmarks/quant_gemm.py                                 # Qwen3-30B-A3B experts, 1k-16k tokens
    python benchmarks/quant_gemm.py --tokens 4096 --quant-type fp4 --no-double-quant
    python benchmarks/quant_gemm.py --device cpu --tiny             # toy sizes in Triton's interpreter (CI)

For each token count: random top-k routing over the experts, NF4 (nested absmax) expert stacks quantized as
bitsandbytes would, and the kernels of one experts forward+backward with frozen weights, timed one by one:

- ``gate_up``: gate/up projection with SwiGLU (gathered rows);
- ``down``: down projection, routing-weight scale and combine into the tokens;
- ``down_dx``: the down projection's input gradient with SwiGLU's backward;
- ``gate_up_dx``: the gate/up projection's input gradient, combined into the tokens;
- ``block``: the whole ``fused_experts`` forward+backward (input and routing-weight gradients).

each as ``4bit`` (the stack dequantised into a transient bf16 copy, then the dense kernel: what moefuse runs)
and ``bf16`` (the dense kernel on bf16 weights: the floor). Before timing, the 4-bit outputs are checked against
the dense kernel on the dequantised weights (a run that disagrees exits 1).
The JSON (``--out``, default ``benchmarks/results/quant_gemm_<gpu>.json``) keeps every figure and the versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU: before moefuse defines them

import moefuse  # noqa: E402
from moefuse.bench.measure import (  # noqa: E402
    environment,
    kept_path,
    relative_error,
    script_command,
    time_call,
    write_report,
)
from moefuse.ops import route  # noqa: E402
from moefuse.ops import triton_gemm as dense  # noqa: E402
from moefuse.ops.backend import use_backend  # noqa: E402
from moefuse.ops.dequantize_4bit import dense as dense_copy  # noqa: E402
from moefuse.ops.dequantize_4bit import dequantize  # noqa: E402
from moefuse.ops.moe_triton import combine  # noqa: E402
from moefuse.quant import ExpertWeights4bit  # noqa: E402
from moefuse.settings import settings  # noqa: E402

MODES = ("4bit", "bf16")
KERNELS = ("gate_up", "down", "down_dx", "gate_up_dx", "block")
TOLERANCE = 2e-2  # relative error of a 4-bit path against the dense kernel on the same (dequantised) weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384", help="comma-separated token counts")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--no-double-quant", action="store_true", help="plain fp32 absmax (no nested statistics)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    p.add_argument(
        "--tiny", action="store_true", help="toy sizes (hidden 64, 8 experts, top-2, 16-64 tokens)"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=10.0, help="per case, once 3 calls are timed")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.intermediate, args.experts, args.top_k = 64, 32, 8, 2
        if args.tokens == p.get_default("tokens"):
            args.tokens = "16,64"
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    args.kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(args.kernels) - set(KERNELS)
    if unknown:
        p.error(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    return args


class Problem:
    """The experts' operands at one token count: 4-bit and bf16 weights, routing, and the tensors each kernel
    reads (made once, so only the kernels are timed)."""

    def __init__(self, args: argparse.Namespace, tokens: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator(device=device).manual_seed(tokens)
        hidden, inter, experts = args.hidden, args.intermediate, args.experts

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

        nested = not args.no_double_quant
        self.gate_up_4bit = ExpertWeights4bit.quantize(
            randn(experts, 2 * inter, hidden, scale=hidden**-0.5), args.quant_type, 64, nested
        )
        self.down_4bit = ExpertWeights4bit.quantize(
            randn(experts, hidden, inter, scale=inter**-0.5), args.quant_type, 64, nested
        )
        self.gate_up = dequantize(self.gate_up_4bit)  # the same values in bf16: the dense kernels' weights
        self.down = dequantize(self.down_4bit)
        self.x = randn(tokens, hidden)
        logits = torch.randn(tokens, experts, device=device, generator=g)
        weights, self.index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
        self.weights = weights.to(dtype)
        self.routing = route(self.index, experts)
        self.scale = self.weights.reshape(-1)[self.routing.sorted_slots]
        rows = self.routing.token_index.numel()
        self.h = randn(rows, inter)
        self.gate_up_rows = randn(rows, 2 * inter)
        self.d_gate_up = randn(rows, 2 * inter)
        self.grad = randn(tokens, hidden)

    def weights_for(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate_up, self.down) if mode == "bf16" else (self.gate_up_4bit, self.down_4bit)

    def kernel(self, name: str, mode: str):
        """A closure running kernel ``name`` in ``mode``, returning its output."""
        gate_up, down = self.weights_for(mode)
        m_sizes, token_index = self.routing.m_sizes, self.routing.token_index

        def combined(a, weight, **kwargs):  # as the experts combine their rows (moefuse.ops.moe_triton)
            return combine(a, weight, self.routing, **kwargs)

        if name == "gate_up":
            return lambda: dense.gate_up_glu(
                self.x, dense_copy(gate_up), m_sizes, token_index, store_gate_up=True
            )[1]
        if name == "down":
            return lambda: combined(self.h, down, row_scale=self.scale)
        if name == "down_dx":
            return lambda: dense.glu_backward(
                self.grad, dense_copy(down), self.gate_up_rows, self.scale, m_sizes, token_index
            )[0]
        if name == "gate_up_dx":
            return lambda: combined(self.d_gate_up, gate_up.transpose(1, 2))
        if name == "block":
            x = self.x.detach().requires_grad_()

            def block():
                x.grad = None
                out = moefuse.fused_experts(
                    x, gate_up, down, self.index, self.weights, check_index_range=False
                )
                out.backward(self.grad)
                return x.grad

            return block
        raise ValueError(name)


def _on_triton(fn):
    def run():
        with use_backend("triton"):
            return fn()

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # the interpreter's bf16 loads are wrong
    results, failures = [], []
    for tokens in args.tokens:
        problem = Problem(args, tokens, device, dtype)
        rows = problem.routing.token_index.numel()
        for name in args.kernels:
            calls = {mode: _on_triton(problem.kernel(name, mode)) for mode in MODES}
            reference = calls["bf16"]()
            error = relative_error(calls["4bit"](), reference)
            if not error <= TOLERANCE:
                failures.append(f"{name} at {tokens} tokens: relative error {error} > {TOLERANCE}")
            ms = {}
            for mode in MODES:
                timing = time_call(
                    calls[mode], device, warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds
                )
                ms[mode] = timing.median_ms
            results.append(
                {
                    "tokens": tokens,
                    "rows_per_expert": rows / args.experts,
                    "kernel": name,
                    "median_ms": ms,
                    "4bit_vs_bf16": ms["bf16"] / ms["4bit"],
                    "relative_error": error,
                }
            )
            print(
                f"{tokens:>6} tokens  {name:<10}  4bit {ms['4bit']:8.3f} ms  bf16 {ms['bf16']:8.3f} ms"
                f"  4-bit speed vs bf16 {ms['bf16'] / ms['4bit']:5.2f}x",
                flush=True,
            )
        del problem
    report = {
        "benchmark": "4-bit experts grouped GEMMs: dequantise-then-GEMM vs bf16 weights",
        "shape": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "experts": args.experts,
            "top_k": args.top_k,
            "quant_type": args.quant_type,
            "double_quant": not args.no_double_quant,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "autotune": settings().autotune,
        "results": results,
        "failures": failures,
        "env": environment(device),
        "command": script_command(argv),
    }
    out = args.out
    if out is None:
        label = report["env"].get("gpu", "cpu")
        label = "".join(c if c.isalnum() else "_" for c in label).strip("_")
        out = kept_path(
            Path(__file__).resolve().parent / "results" / f"quant_gemm_{label}.json", report["env"]
        )
    write_report(report, out)
    if failures:
        print("\n".join(["4-bit outputs disagree with the dense reference:", *failures]), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
