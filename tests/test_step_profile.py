"""benchmarks/step_profile.py runs on the CPU at toy sizes: host/wall per step and the host and op reports."""

from __future__ import annotations

import pytest

from conftest import load_benchmark


@pytest.mark.parametrize("setup,implementation", [("lora", "moefuse"), ("full", "moefuse+loss")])
def test_step_profile_on_cpu(capsys, setup, implementation):
    args = (
        f"--device cpu --tiny --layers 1 --tokens 16 --steps 1 --rows 5 --setup {setup} "
        f"--implementation {implementation} --report host,syncs,gpu"
    )
    result = load_benchmark("step_profile").main(args.split())
    assert result["host_ms"] > 0 and result["wall_ms"] >= result["host_ms"]
    out = capsys.readouterr().out
    assert "Ordered by: internal time" in out  # the cProfile table
    assert "syncs: needs a CUDA device" in out
    assert "Self CPU" in out  # the torch.profiler table


def test_step_profile_refuses_unknown_reports():
    with pytest.raises(SystemExit):
        load_benchmark("step_profile").parse_args(["--report", "host,memory"])
