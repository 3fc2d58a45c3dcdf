"""benchmarks/host_cost.py: the experts' host work timed with the kernels bound but not run (routing's run once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "host_cost.py"


def test_only_routing_runs_once_and_a_time_per_call_is_given():
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--calls", "3", "--rounds", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The warm-up and timed calls reuse one shape: each routing kernel ran once, no GEMM ran at all.
    assert result["kernels_run"] == {"routing_count_kernel": 1, "routing_scatter_kernel": 1}
    assert 0 < result["min_us"] <= result["median_us"] <= result["max_us"]
