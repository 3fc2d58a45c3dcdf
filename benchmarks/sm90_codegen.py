"""What Triton makes of the experts' kernels for Hopper (sm90), read on a machine without a GPU.

    python benchmarks/sm90_codegen.py [--out FILE]

For each family, every kernel launch of the fused experts' forward and backward (a full fine-tune: every
gradient, the biases' included) is captured from a call on small CPU tensors laid out as the family's weights
(the launches are recorded, not run), with its integers specialised as Triton specialises them on a GPU (1 as a
constant, multiples of 16 marked so). Each distinct kernel (name and constants) is compiled for sm90 with every
tile config of its autotuner and counted in the PTX and the cubin: Hopper MMAs (``wgmma``), asynchronous copies
to shared memory (``cp.async``), global loads and stores by width, registers and spilled bytes. The families:

- ``qwen3_moe``: gate rows then up rows, ``[E, 2I, H]`` (K contiguous), SwiGLU;
- ``gpt_oss``: gate/up rows interleaved, stored ``[E, H, 2I]`` (the rows contiguous), biases, the clamped SwiGLU.

Scalar 16-bit loads in a GEMM's K loop mean the compiler could not prove a tile's addresses contiguous: the tile
then goes through registers an element at a time instead of in asynchronous vector copies. Scalar 16-bit stores
write a tile an element at a time. Sizes are small multiples of 16, as every dimension of both families' real
shapes is; only their divisibility reaches the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, before moefuse defines them

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import moefuse  # noqa: E402, F401
from moefuse.bench.measure import script_command, write_report  # noqa: E402
from moefuse.bench.provenance import source_provenance  # noqa: E402
from moefuse.ops import launch as launch_module  # noqa: E402
from moefuse.ops import moe_triton, triton_gemm  # noqa: E402
from moefuse.ops.gating import SWIGLU, Gating  # noqa: E402
from moefuse.ops.routing import route  # noqa: E402

FAMILIES = ("qwen3_moe", "gpt_oss")
GPT_OSS = Gating("silu", alpha=1.702, limit=7.0, up_shift=1.0, interleaved=True)
TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}
SM90 = GPUTarget("cuda", 90, 32)


def captured_launches(
    family: str, experts: int = 4, hidden: int = 64, inter: int = 128, tokens: int = 32, top_k: int = 2
) -> list[tuple[object, dict]]:
    """Every ``(kernel, arguments)`` the fused experts' forward and backward launch for ``family``'s layout."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    if (
        family == "gpt_oss"
    ):  # stored [E, H, 2I] and [E, I, H]; the experts read them as [E, 2I, H] and [E, H, I]
        gate_up = torch.randn(experts, hidden, 2 * inter, dtype=torch.bfloat16).transpose(1, 2)
        down = torch.randn(experts, inter, hidden, dtype=torch.bfloat16).transpose(1, 2)
        gating = GPT_OSS
        biases = (
            torch.randn(experts, 2 * inter, dtype=torch.bfloat16),
            torch.randn(experts, hidden, dtype=torch.bfloat16),
        )
    else:
        gate_up = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16)
        down = torch.randn(experts, hidden, inter, dtype=torch.bfloat16)
        gating, biases = SWIGLU, (None, None)
    top_k_index = (torch.arange(tokens)[:, None] + torch.arange(top_k)[None, :]) % experts
    routing = route(top_k_index, experts, on_triton=False)
    plan = moe_triton._fused_plan(dataclasses.astuple(gating), lora_dropout=0.0, prescaled_h=True)
    launches = []
    original = triton_gemm.launch
    triton_gemm.launch = lambda kernel, grid, /, **arguments: launches.append((kernel, arguments))
    try:
        _, saved = moe_triton.experts_forward(
            x, gate_up, down, torch.rand(tokens, top_k), routing, None, plan, True, *biases
        )
        needs = [True] * 4 + [False] * 6 + [biases[0] is not None] * 2  # x, weights, routing weights; biases
        moe_triton.experts_backward(
            torch.randn(tokens, hidden, dtype=torch.bfloat16),
            x,
            gate_up,
            down,
            routing,
            saved,
            moe_triton.FactorSpec.of(None, torch.bfloat16),
            torch.float32,
            needs,
            plan,
            biases[1],
        )
    finally:
        triton_gemm.launch = original
    return launches


def _specialised(launcher, arguments: dict, config: triton.Config):
    """Triton's signature, constants and attributes for this launch, as its binder would make them on a GPU."""
    meta = {**arguments, **config.kwargs}
    for name, heuristic in launcher.heuristics:
        meta[name] = heuristic(meta)
    signature, constants, attributes = {}, {}, {}
    unspecialised = {launcher.runtime_names[i] for i in launcher.unspecialized}
    for index, name in enumerate(launcher.arg_names):
        value = meta[name]
        if index >= launcher.runtime:
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in unspecialised:
            signature[name], constants[(index,)] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialised:
                attributes[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attributes


def _resources(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.backends.nvidia.compiler.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {
        "registers": int(usage["REG"]),
        "stack_bytes": int(usage["STACK"]),
        "local_bytes": int(usage["LOCAL"]),
    }


def _counted(pattern: str, ptx: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for width, kind in re.findall(pattern, ptx):
        key = f"{width.lstrip('.') or 'v1'}.{kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _scalar_16bit(counts: dict[str, int]) -> int:
    return counts.get("v1.b16", 0) + counts.get("v1.u16", 0)


def codegen(family: str) -> list[dict]:
    """One row per distinct kernel the family's experts launch: its name, constants and each tile config's counts."""
    kernels: dict[tuple, dict] = {}
    for kernel, arguments in captured_launches(family):
        launcher = launch_module._Launcher(kernel)
        constants = {n: arguments[n] for n in launcher.constexpr_names}
        # An operand broadcast along a dimension (a bias gradient's column of ones) is read element by element.
        zero_strides = sorted(n for n, v in arguments.items() if n.startswith("stride_") and v == 0)
        key = (launcher.name, tuple(constants.items()), tuple(zero_strides))
        if key in kernels:
            continue
        configs = getattr(kernel, "configs", None) or [
            triton.Config(
                {}, num_warps=arguments.get("num_warps", 4), num_stages=arguments.get("num_stages", 3)
            )
        ]
        rows = []
        for config in configs:
            signature, constexprs, attributes = _specialised(launcher, arguments, config)
            source = triton.compiler.ASTSource(
                fn=launcher.jit, signature=signature, constexprs=constexprs, attrs=attributes
            )
            compiled = triton.compile(
                source, target=SM90, options={"num_warps": config.num_warps, "num_stages": config.num_stages}
            )
            ptx = compiled.asm["ptx"]
            loads = _counted(r"ld\.global(?:\.[a-z_]+)*?(\.v\d)?\.([a-z]\d+)\b", ptx)
            stores = _counted(r"st\.global(?:\.[a-z_]+)*?(\.v\d)?\.([a-z]\d+)\b", ptx)
            rows.append(
                {
                    "config": {
                        **config.kwargs,
                        "num_warps": config.num_warps,
                        "num_stages": config.num_stages,
                    },
                    "wgmma": ptx.count("wgmma.mma_async"),
                    "cp_async": ptx.count("cp.async.ca") + ptx.count("cp.async.cg"),
                    "global_loads": loads,
                    "global_stores": stores,
                    "scalar_16bit_loads": _scalar_16bit(loads),
                    "scalar_16bit_stores": _scalar_16bit(stores),
                    **_resources(compiled.asm["cubin"]),
                }
            )
        kernels[key] = {
            "kernel": launcher.name,
            "constants": constants,
            "zero_strides": zero_strides,
            "configs": rows,
        }
    return list(kernels.values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    # One process per family: compiling is CPU-bound and holds the interpreter.
    with ProcessPoolExecutor(len(FAMILIES), mp_context=multiprocessing.get_context("spawn")) as pool:
        cases = dict(zip(FAMILIES, pool.map(codegen, FAMILIES), strict=True))
    report = {
        "benchmark": "sm90_codegen",
        "scope": "the fused experts' forward and backward, every gradient",
        "target": "cuda sm90",
        "triton": triton.__version__,
        "cases": cases,
        "provenance": source_provenance(),
        "command": script_command(argv),
    }
    for family, kernels in report["cases"].items():
        for entry in kernels:
            flags = ",".join(n for n, v in entry["constants"].items() if v is True)
            for row in entry["configs"]:
                c = row["config"]
                tile = "x".join(str(c[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in c)
                print(
                    f"{family:9s} {entry['kernel']:27s} {flags:38s} {tile:11s} w{c['num_warps']} s{c['num_stages']}: "
                    f"wgmma {row['wgmma']}, cp.async {row['cp_async']}, scalar 16-bit loads "
                    f"{row['scalar_16bit_loads']} stores {row['scalar_16bit_stores']}, registers {row['registers']}, "
                    f"spilled {row['stack_bytes']} B",
                    flush=True,
                )
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
