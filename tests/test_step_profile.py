"""benchmarks/step_profile.py runs on the CPU at toy sizes: host/wall per step and the host and op reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_profile.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("setup", ["lora", "full"])
def test_step_profile_on_cpu(capsys, setup):
    args = f"--device cpu --tiny --layers 1 --tokens 16 --steps 1 --rows 5 --setup {setup} --report host,syncs,gpu"
    result = _load().main(args.split())
    assert result["host_ms"] > 0 and result["wall_ms"] >= result["host_ms"]
    out = capsys.readouterr().out
    assert "Ordered by: internal time" in out  # the cProfile table
    assert "syncs: needs a CUDA device" in out
    assert "Self CPU" in out  # the torch.profiler table


def test_step_profile_refuses_unknown_reports():
    with pytest.raises(SystemExit):
        _load().parse_args(["--report", "host,memory"])
