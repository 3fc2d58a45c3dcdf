"""benchmarks/gemm_floor.py: the six expert products have the shapes of a MoE layer's GEMMs, the margins add up."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def floor():
    return load_benchmark("gemm_floor")


def test_products_have_the_layer_shapes(floor):
    # Three different widths, so a wrong transpose cannot pass (grouped_mm wants 16-byte strides: multiples of 4).
    shape = SimpleNamespace(num_experts=5, hidden=24, intermediate=8, gate_up_rows=16)
    generator = torch.Generator().manual_seed(0)
    m_sizes = torch.tensor([0, 1, 5] + [2] * (shape.num_experts - 3))
    rows = int(m_sizes.sum())
    dims = floor.products(rows, shape.hidden, shape.intermediate, shape.gate_up_rows)
    grouped = floor.grouped_mm_calls(m_sizes, shape, "cpu", torch.float32, generator)
    batched = floor.bmm_calls(3, shape, "cpu", torch.float32, generator)
    assert grouped.keys() == batched.keys() == dims.keys()
    for name, (m, n, _) in dims.items():
        if "weight grad" in name:
            assert grouped[name]().shape == (shape.num_experts, m, n), name
        else:
            assert grouped[name]().shape == (rows, n), name
    for name, (m, n, _) in floor.products(3, shape.hidden, shape.intermediate, shape.gate_up_rows).items():
        assert batched[name]().shape == (shape.num_experts, m, n), name


def test_report_margins_are_target_minus_floor(floor, tmp_path, capsys):
    out = tmp_path / "floor.json"
    argv = ["--device", "cpu", "--tiny", "--tokens", "24", "--iters", "3", "--warmup", "1", "--out", str(out)]
    report = floor.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (result,) = report["results"]
    blocks = result["block_fwd_bwd_ms"]
    assert set(blocks) == {"grouped_mm", "moefuse"} and min(blocks.values()) > 0
    assert result["target_ms"] == pytest.approx(blocks["grouped_mm"] / 2.5)
    for name, f in result["floors"].items():
        assert len(f["products_ms"]) == 6 and f["total_ms"] == pytest.approx(sum(f["products_ms"].values()))
        assert result["margin_ms"][name] == pytest.approx(result["target_ms"] - f["total_ms"])
    assert "2.5x means" in capsys.readouterr().out
