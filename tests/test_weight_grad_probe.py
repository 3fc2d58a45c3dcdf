"""benchmarks/weight_grad_probe.py: every persistent variant equals the tuned weight-gradient kernel (interpreter)."""

from __future__ import annotations

import re

import pytest

from conftest import load_benchmark


@pytest.mark.interpreter
def test_persistent_variants_equal_the_tuned_kernel(capsys):
    load_benchmark("weight_grad_probe").main()
    lines = capsys.readouterr().out.splitlines()
    persistent = [line for line in lines if " persistent " in line]
    assert len(persistent) == 2 * 4  # gate/up and down, four variants each at the toy config
    assert not [line for line in lines if "FAIL" in line]
    errors = [float(m.group(1)) for line in persistent if (m := re.search(r"error ([0-9.e+-]+)\)", line))]
    assert len(errors) == len(persistent) and max(errors) < 1e-5
