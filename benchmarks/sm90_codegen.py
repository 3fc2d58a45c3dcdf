"""What Triton makes of the gate/up kernel for Hopper (sm90), read on a machine without a GPU.

    python benchmarks/sm90_codegen.py [--out FILE]

For each case, the arguments ``moefuse.ops.triton_gemm.gate_up_glu`` gives ``gate_up_glu_kernel`` (captured from a
call on small CPU tensors laid out as the family's weights, integers specialised as Triton specialises them on a
GPU: 1 as a constant, multiples of 16 marked so), compiled for sm90 with each tile config of the autotuner, and
counted in the PTX and the cubin: Hopper MMAs (``wgmma``), asynchronous copies to shared memory (``cp.async``),
global loads by width, registers and spilled bytes. The cases:

- ``qwen3_moe``: gate rows then up rows, ``[E, 2I, H]`` (K contiguous), SwiGLU;
- ``gpt_oss``: gate/up rows interleaved, stored ``[E, H, 2I]`` (the rows contiguous), biases, the clamped SwiGLU.

Scalar 16-bit loads in the K loop mean the compiler could not prove a tile's addresses contiguous: the tile
then goes through registers an element at a time instead of in asynchronous vector copies. Sizes are small
multiples of 16, as every dimension of both families' real shapes is; only their divisibility reaches the code.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, before moefuse defines them

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import moefuse  # noqa: E402, F401
from moefuse.bench.measure import script_command, write_report  # noqa: E402
from moefuse.bench.provenance import source_provenance  # noqa: E402
from moefuse.kernels import grouped_gemm as kernels  # noqa: E402
from moefuse.ops import launch as launch_module  # noqa: E402
from moefuse.ops import triton_gemm  # noqa: E402
from moefuse.ops.gating import SWIGLU, Gating  # noqa: E402

GPT_OSS = Gating("silu", alpha=1.702, limit=7.0, up_shift=1.0, interleaved=True)
TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}
SM90 = GPUTarget("cuda", 90, 32)


class _Captured(Exception):
    def __init__(self, kernel, arguments: dict):
        super().__init__(kernel)
        self.kernel, self.arguments = kernel, arguments


def _record(kernel, grid, /, **arguments):
    raise _Captured(kernel, arguments)


def captured_arguments(family: str, experts: int = 4, hidden: int = 64, inter: int = 128, tokens: int = 32):
    """``gate_up_glu``'s kernel and arguments for ``family``'s layout (the call stops at the launch)."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    if family == "gpt_oss":  # stored [E, H, 2I]; the experts read it as [E, 2I, H]
        weight = torch.randn(experts, hidden, 2 * inter, dtype=torch.bfloat16).transpose(1, 2)
        gating, bias = GPT_OSS, torch.randn(experts, 2 * inter, dtype=torch.bfloat16)
    else:
        weight, gating, bias = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16), SWIGLU, None
    rows = tokens * 2
    m_sizes = torch.full((experts,), rows // experts, dtype=torch.int64)
    x_index = torch.arange(rows, dtype=torch.int64) % tokens
    original = triton_gemm.launch
    triton_gemm.launch = _record
    try:
        triton_gemm.gate_up_glu(
            x, weight, m_sizes, x_index, store_gate_up=True, gating=gating, bias=bias, row_scale=None
        )
    except _Captured as captured:
        return captured.kernel, captured.arguments
    finally:
        triton_gemm.launch = original
    raise RuntimeError("gate_up_glu returned without launching its kernel")


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


def codegen(family: str) -> list[dict]:
    kernel, arguments = captured_arguments(family)
    launcher = launch_module._Launcher(kernel)
    rows = []
    for config in kernel.configs:
        signature, constants, attributes = _specialised(launcher, arguments, config)
        source = triton.compiler.ASTSource(
            fn=launcher.jit, signature=signature, constexprs=constants, attrs=attributes
        )
        compiled = triton.compile(
            source, target=SM90, options={"num_warps": config.num_warps, "num_stages": config.num_stages}
        )
        ptx = compiled.asm["ptx"]
        loads: dict[str, int] = {}
        for width, kind in re.findall(r"ld\.global(?:\.[a-z_]+)*?(\.v\d)?\.([a-z]\d+)\b", ptx):
            key = f"{width.lstrip('.') or 'v1'}.{kind}"
            loads[key] = loads.get(key, 0) + 1
        rows.append(
            {
                "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
                "wgmma": ptx.count("wgmma.mma_async"),
                "cp_async": ptx.count("cp.async.ca") + ptx.count("cp.async.cg"),
                "global_loads": loads,
                "scalar_16bit_loads": loads.get("v1.b16", 0) + loads.get("v1.u16", 0),
                **_resources(compiled.asm["cubin"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    report = {
        "benchmark": "sm90_codegen",
        "kernel": kernels.gate_up_glu_kernel.fn.fn.__name__,
        "target": "cuda sm90",
        "triton": triton.__version__,
        "cases": {family: codegen(family) for family in ("qwen3_moe", "gpt_oss")},
        "provenance": source_provenance(),
        "command": script_command(argv),
    }
    for family, rows in report["cases"].items():
        for row in rows:
            c = row["config"]
            print(
                f"{family:10s} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}: "
                f"wgmma {row['wgmma']}, cp.async {row['cp_async']}, scalar 16-bit loads {row['scalar_16bit_loads']}, "
                f"registers {row['registers']}, spilled {row['stack_bytes']} B",
                flush=True,
            )
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
