"""Host time of one eager forward+backward of moefuse's fused experts on the Triton path, measured on the CPU.

The GPU machines' host sets the pace of short steps, and that host time can be measured without a GPU: the
kernels run under Triton's interpreter once per shape (routing's outputs are kept and copied back into later
calls' outputs, so the code after them sees real routes), and from then on each launch only binds its arguments
(``moefuse.ops.launch``'s argument split). What is left is the Python and PyTorch work of one call: the plan,
the autograd function or operator dispatch, the launchers, the tensors allocated. Absolute figures depend on the
CPU; compare commits back to back on one machine:

    python benchmarks/host_cost.py                       # this checkout
    (cd OTHER_CHECKOUT && PYTHONPATH=src python /path/to/benchmarks/host_cost.py)

It prints the median over ``--rounds`` rounds of the microseconds per call, with the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
os.environ["MOEFUSE_BACKEND"] = "triton"

import torch  # noqa: E402

import moefuse  # noqa: E402
from moefuse.ops import launch as launch_module  # noqa: E402

# Kernels whose outputs the code after them reads as indices (routing): run once per shape, then replayed.
REPLAYED = ("routing",)


def stub_launches() -> Counter:
    """Make every launch bind its arguments only; routing kernels run for real the first time per shape. Returns
    the count of launches that ran, by kernel."""
    run = launch_module._Launcher.__call__
    replay: dict[tuple, dict[str, torch.Tensor]] = {}
    ran: Counter = Counter()

    def call(self, grid, arguments: dict) -> None:
        if not self.name.startswith(REPLAYED):
            self.split(arguments)
            return
        tensors = {k: a for k, a in arguments.items() if isinstance(a, torch.Tensor)}
        key = (self.name, *(tuple(t.shape) for t in tensors.values()))
        if key not in replay:
            run(self, grid, arguments)
            ran[self.name] += 1
            replay[key] = {k: t.clone() for k, t in tensors.items()}
            return
        self.split(arguments)
        for name, value in replay[key].items():
            tensors[name].copy_(value)

    launch_module._Launcher.__call__ = call
    return ran


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    ran = stub_launches()
    torch.manual_seed(0)
    hidden, inter = 64, 32  # small: the host's work does not depend on them
    x = torch.randn(args.tokens, hidden, requires_grad=True)
    gate_up = torch.randn(args.experts, 2 * inter, hidden, requires_grad=True)
    down = torch.randn(args.experts, hidden, inter, requires_grad=True)
    weights, index = torch.randn(args.tokens, args.experts).softmax(-1).topk(args.top_k, dim=-1)
    weights = weights.detach().requires_grad_()

    def call() -> None:
        moefuse.fused_experts(x, gate_up, down, index, weights).sum().backward()

    for _ in range(3):
        call()
    per_call = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        per_call.append((time.perf_counter() - start) / args.calls * 1e6)
    result = {
        "moefuse": moefuse.__file__,
        "median_us": statistics.median(per_call),
        "min_us": min(per_call),
        "max_us": max(per_call),
        "kernels_run": dict(ran),
    }
    print(
        json.dumps(result)
        if args.json
        else (
            f"{result['median_us']:.0f} us per fused experts forward+backward on the host "
            f"({result['min_us']:.0f}-{result['max_us']:.0f}, {args.rounds} rounds of {args.calls}; {result['moefuse']})"
        )
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
