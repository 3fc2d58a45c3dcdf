"""benchmarks/sm90_codegen.py: the experts' kernels compiled for Hopper on the CPU move their tiles in vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sm90_codegen.py"
GEMMS = {"gate_up_glu_kernel", "grouped_gemm_kernel", "grouped_weight_grad_kernel"}


def test_experts_kernels_move_tiles_in_vectors_for_both_layouts(tmp_path):
    """Every kernel of the experts' forward and backward, every tile config, Qwen3-MoE's stacked rows and
    GPT-OSS's interleaved rows stored transposed: no 16-bit value stored alone (GPT-OSS's interleaved gradient
    rows were stored at a stride of two), and in the GEMMs asynchronous copies and at most one scalar 16-bit load
    (a bias element), where GPT-OSS's weight tile built from the two halves' woven offsets took 65; the one
    exception, an operand broadcast along a dimension (a bias gradient's column of ones), is read element by
    element. Run in its own process: the kernels compile (no interpreter)."""
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=env, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"qwen3_moe", "gpt_oss"}
    for family, kernels in report["cases"].items():
        assert {entry["kernel"] for entry in kernels} == GEMMS | {"glu_backward_rows_kernel"}, family
        for entry in kernels:
            for row in entry["configs"]:
                where = (family, entry["kernel"], entry["constants"], row["config"])
                assert row["scalar_16bit_stores"] == 0, where
                if entry["kernel"] in GEMMS:
                    assert row["cp_async"] > 0, where
                    if not entry["zero_strides"]:
                        assert row["scalar_16bit_loads"] <= 1, where
        gate_up = [
            row for entry in kernels if entry["kernel"] == "gate_up_glu_kernel" for row in entry["configs"]
        ]
        assert len(gate_up) > 1 and all(row["wgmma"] > 0 for row in gate_up), family
    assert report["provenance"]["commit"]
