"""Weak scaling of expert parallelism: the Qwen3-MoE block, forward+backward, EP=1 vs EP=N at a fixed per-GPU batch.

Launch one process per GPU (NCCL); NVLink multicast stays off (set below, before NCCL starts)::

    torchrun --nproc-per-node 2 benchmarks/ep_scaling.py            # Qwen3-30B-A3B block, 4096 tokens per GPU
    torchrun --nproc-per-node 2 benchmarks/ep_scaling.py --device cpu --hidden 32 --experts 8 \\
        --top-k 2 --intermediate 16 --tokens 64                       # tiny, on CPU with gloo

Every rank holds the same random block (router + experts, ``experts_implementation="moefuse"``) and its own
tokens. Measured, each as the slowest rank's mean over ``--iters`` iterations:

- ``ep1``: every rank computes its tokens with all experts (no communication): the 1-GPU figure.
- ``epN``: experts split over the N ranks, tokens exchanged with ``all_to_all_single``.
- ``split``: the EP=N step taken apart on the same routing: the all-to-all dispatch + combine alone (forward
  and backward), the local experts alone (forward and backward); ``other`` is the rest (router, routing,
  count exchange, combine weighting).
- ``check``: fp32, ``--check-tokens`` tokens per rank: EP=N output and gradients (tokens, router, experts)
  against every rank's tokens through the unsplit block on one GPU.

Weak-scaling efficiency = tokens/s per GPU at EP=N / tokens/s per GPU at EP=1. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# NVLink multicast (NVLS) must stay off on the shared GPU machines; NCCL and symmetric memory read these at init.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

import moefuse  # noqa: E402, F401  (registers the "moefuse" experts implementation)
from moefuse.bench.measure import environment, kept_path, write_report  # noqa: E402
from moefuse.ops import fused_experts, route  # noqa: E402
from moefuse.parallel import apply_expert_parallel, combine, dispatch, plan_dispatch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU (fixed: weak scaling)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=768, help="moe_intermediate_size")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--check-tokens", type=int, default=512, help="tokens per rank of the fp32 check")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    return p.parse_args(argv)


def make_block(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> Qwen3MoeSparseMoeBlock:
    config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.intermediate,
        norm_topk_prob=True,
    )
    config._experts_implementation = "moefuse"
    g = torch.Generator().manual_seed(0)  # the same block on every rank
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 / p.shape[-1]) ** 0.5)
    return block.to(device=device, dtype=dtype)


def tokens(args: argparse.Namespace, rank: int, count: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(1, count, args.hidden, generator=g)
    cotangent = torch.randn(1, count, args.hidden, generator=g)
    return x.to(device, dtype), cotangent.to(device, dtype)


def timed(fn: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Mean milliseconds per call of the slowest rank."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        fn()
    sync()
    dist.barrier()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    ms = torch.tensor([statistics.mean(times) * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def fwd_bwd(block: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        block.zero_grad(set_to_none=True)
        block(x).backward(cotangent)

    return step


def split_ep_step(ep_block, x: torch.Tensor, group) -> dict[str, float]:
    """Closures timing the EP step's all-to-all exchange alone and its local experts alone, same routing."""
    experts = ep_block.experts
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, _, top_k_index = ep_block.gate(flat)
        routing = route(top_k_index, experts.expert_parallel.num_experts)
        plan = plan_dispatch(routing.m_sizes, group)
        rows = flat[routing.token_index].contiguous()
        received = dispatch(rows, plan, group)
    rows.requires_grad_()
    received.requires_grad_()
    rows_cotangent, received_cotangent = torch.randn_like(rows), torch.randn_like(received)
    local_index = plan.local_expert_index.unsqueeze(1)
    ones = received.new_ones(received.shape[0], 1)

    def exchange() -> None:
        combine(dispatch(rows, plan, group), plan, group).backward(rows_cotangent)

    def local_experts() -> None:
        experts.zero_grad(set_to_none=True)
        out = fused_experts(received, experts.gate_up_proj, experts.down_proj, local_index, ones)
        out.backward(received_cotangent)

    return {"communication": exchange, "compute": local_experts}


def check_against_single_gpu(args, rank: int, world: int, mesh, device: torch.device) -> dict:
    """fp32: EP=N output and gradients of this rank against the unsplit block on all ranks' tokens."""
    reference = make_block(args, torch.float32, device)
    ep_block = apply_expert_parallel(copy.deepcopy(reference), mesh, gradient_divide_factor=1)
    for r in range(world):  # the loss is the sum over ranks: gradients of the unsplit block accumulate
        x, cotangent = tokens(args, r, args.check_tokens, torch.float32, device)
        x.requires_grad_()
        out = reference(x)
        out.backward(cotangent)
        if r == rank:
            ref_out, ref_x_grad = out.detach(), x.grad
    x, cotangent = tokens(args, rank, args.check_tokens, torch.float32, device)
    x.requires_grad_()
    out = ep_block(x)
    out.backward(cotangent)
    local = slice(
        ep_block.experts.expert_parallel.expert_range.start,
        ep_block.experts.expert_parallel.expert_range.stop,
    )
    # EP's router gradient is of this rank's loss only (no DDP here): summed, it is the unsplit block's.
    router_grad = ep_block.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    pairs = {
        "output": (out, ref_out),
        "input_grad": (x.grad, ref_x_grad),
        "router_grad": (router_grad, reference.gate.weight.grad),
        "gate_up_proj_grad": (ep_block.experts.gate_up_proj.grad, reference.experts.gate_up_proj.grad[local]),
        "down_proj_grad": (ep_block.experts.down_proj.grad, reference.experts.down_proj.grad[local]),
    }
    errors = {}
    for name, (got, want) in pairs.items():
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).reshape(1).double()
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors[name] = err.item()
    return {
        "dtype": "fp32",
        "tokens_per_rank": args.check_tokens,
        "max_rel_error": errors,
        "passed": all(e < 1e-4 for e in errors.values()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares exact arithmetic
    else:
        device = torch.device("cpu")
    dtype = DTYPES[args.dtype]
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the {world} processes (EP={world})")

    block = make_block(args, dtype, device)
    x, cotangent = tokens(args, rank, args.tokens, dtype, device)
    ep1_ms = timed(fwd_bwd(block, x, cotangent), args, device)
    ep_block = apply_expert_parallel(block, mesh)  # in place: the full experts are dropped
    epn_ms = timed(fwd_bwd(ep_block, x, cotangent), args, device)
    split = {
        name: timed(fn, args, device) for name, fn in split_ep_step(ep_block, x, mesh.get_group()).items()
    }
    split["other"] = epn_ms - split["communication"] - split["compute"]
    del block, ep_block
    check = check_against_single_gpu(args, rank, world, mesh, device)

    def per_gpu(ms: float) -> float:
        return args.tokens / (ms / 1e3)

    result = {
        "benchmark": "ep_scaling",
        "what": "Qwen3-MoE block (router + experts) forward+backward, random weights, moefuse experts",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "backend": dist.get_backend(),
        "world_size": world,
        "torch": torch.__version__,
        "dims": {
            "hidden": args.hidden,
            "experts": args.experts,
            "top_k": args.top_k,
            "moe_intermediate": args.intermediate,
        },
        "dtype": args.dtype,
        "tokens_per_gpu": args.tokens,
        "iters": args.iters,
        "ep1": {"ms": ep1_ms, "tokens_per_s_per_gpu": per_gpu(ep1_ms)},
        f"ep{world}": {"ms": epn_ms, "tokens_per_s_per_gpu": per_gpu(epn_ms), "split_ms": split},
        "weak_scaling_efficiency": ep1_ms / epn_ms,
        "check": check,
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
    }
    if rank == 0:
        slug = result["device"].replace(" ", "_").replace("/", "_")
        result["environment"] = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        out = args.out or kept_path(
            Path(__file__).parent / "results" / f"ep_scaling_{world}x{slug}.json", result["environment"]
        )
        print(json.dumps(result, indent=2))
        write_report(result, out)
    if own_group:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
