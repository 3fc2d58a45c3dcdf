"""benchmarks/sm90_codegen.py: the gate/up kernel compiled for Hopper on the CPU loads its tiles in vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sm90_codegen.py"


def test_gate_up_tiles_load_in_vectors_for_both_layouts(tmp_path):
    """Every tile config, Qwen3-MoE's stacked rows and GPT-OSS's interleaved rows stored transposed: Hopper MMAs,
    asynchronous copies, and at most one scalar 16-bit load (a bias element), where GPT-OSS's weight tile built
    from the two halves' woven offsets took 65. Run in its own process: the kernels compile (no interpreter)."""
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=env, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"qwen3_moe", "gpt_oss"}
    for family, rows in report["cases"].items():
        assert len(rows) > 1
        for row in rows:
            where = (family, row["config"])
            assert row["wgmma"] > 0 and row["cp_async"] > 0, where
            assert row["scalar_16bit_loads"] <= 1, where
    assert report["provenance"]["commit"]
