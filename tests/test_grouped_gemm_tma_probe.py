"""benchmarks/grouped_gemm_tma_probe.py: every probe kernel equals the per-expert reference (interpreter)."""

from __future__ import annotations

import re

import pytest

from conftest import load_benchmark


@pytest.mark.interpreter
def test_probe_kernels_match_the_reference(capsys):
    load_benchmark("grouped_gemm_tma_probe").main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 5 and not [line for line in lines if "FAIL" in line]
    errors = [float(m.group(1)) for line in lines if (m := re.search(r"err ([0-9.e+-]+)\)", line))]
    assert len(errors) == 5 and max(errors) < 1e-5
