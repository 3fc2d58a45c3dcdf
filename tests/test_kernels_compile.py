"""The gated-activation kernels (and the grouped GEMM with its epilogue's options) go through Triton's compiler front end (Python to TTIR for sm90) without a GPU.

The CPU tests run the kernels in Triton's interpreter, which executes them as Python: a construct the compiler
refuses (a constexpr string compared, a ternary, a helper's return) passes there. This compiles each kernel for
an sm90 target in a subprocess (the interpreter, chosen at import, is off there), up to TTIR, which needs no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE = textwrap.dedent(
    """
    import json
    import sys
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction
    import triton._C.libtriton as libtriton

    from moefuse.kernels import grouped_gemm as kernels

    def to_ttir(kernel, constexprs):
        while not isinstance(kernel, JITFunction):  # under the autotuner and heuristics
            kernel = kernel.fn
        names = kernel.arg_names
        def kind(name):
            if name in constexprs:
                return "constexpr"
            if name.endswith("_ptr"):  # indices and counts are int64 tensors, the rest fp32 here
                return "*i64" if "index" in name or "m_sizes" in name else "*fp32"
            return "i32"

        signature = {name: kind(name) for name in names}
        source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        options = backend.parse_options({})
        context = libtriton.ir.context()
        libtriton.ir.load_dialects(context)
        backend.load_dialects(context)
        codegen = backend.get_codegen_implementation(options)
        return str(source.make_ir(target, options, codegen, backend.get_module_map(), context))

    gating = json.loads(sys.argv[1])  # the gating's constants, and whether biases join
    biased = gating.pop("HAS_BIAS")
    forward = to_ttir(kernels.gate_up_glu_kernel, dict(
        **gating, INTERLEAVED=biased, STORE_GATE_UP=True, SCALE_H=True, HAS_BIAS=biased, HAS_LORA=True, LORA_MASK=True, LORA_R=16,
        PRECISION="ieee", E_POW2=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, EVEN_K=True,
    ))
    backward = to_ttir(kernels.glu_backward_rows_kernel, dict(
        **gating, INTERLEAVED=biased, SCATTER_D_SCALE=True, D_SCALE_PLUS=biased, BLOCK_R=8, BLOCK_C=256,
    ))
    down = to_ttir(kernels.grouped_gemm_kernel, dict(
        GATHER_A=False, SCATTER_C=True, SCALE_ROWS=True, HAS_BIAS=biased, HAS_LORA=True, LORA_MASK=False,
        LORA_R=16, PRECISION="ieee", E_POW2=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, EVEN_K=True,
    ))
    print(all("tt.func" in ir for ir in (forward, backward, down)))
    """
)
PLAIN = dict(ALPHA=1.0, CLAMP=False, LIMIT=0.0, UP_SHIFT=0.0, HAS_BIAS=False)


@pytest.mark.parametrize(
    "gating",
    [
        dict(PLAIN, ACTIVATION="silu"),
        dict(PLAIN, ACTIVATION="gelu_tanh"),
        dict(ACTIVATION="silu", ALPHA=1.702, CLAMP=True, LIMIT=7.0, UP_SHIFT=1.0, HAS_BIAS=True),  # GPT-OSS's
    ],
    ids=["silu", "gelu_tanh", "gpt_oss"],
)
def test_gated_kernels_compile_to_ttir_for_sm90(gating):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(gating)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True", done.stdout
