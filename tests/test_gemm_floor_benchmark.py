"""benchmarks/gemm_floor.py: the products are a MoE layer's GEMMs, the floors time what they say, margins add up."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def floor():
    return load_benchmark("gemm_floor")


# Three different widths, so a wrong transpose cannot pass (grouped_mm wants 16-byte strides: multiples of 4).
SHAPE = SimpleNamespace(num_experts=5, hidden=24, intermediate=8, gate_up_rows=16)
M_SIZES = [0, 1, 5, 2, 4]  # an expert without rows, one with one, counts above and below the mean (2)


def test_grouped_mm_calls_are_the_layer_products(floor):
    ops = floor.operands(sum(M_SIZES), SHAPE, "cpu", torch.float32, torch.Generator().manual_seed(0))
    calls = floor.grouped_mm_calls(ops, torch.tensor(M_SIZES))
    assert set(calls) == set(floor.ROW_PRODUCTS) | set(floor.WEIGHT_GRADS)
    starts = [0, *torch.tensor(M_SIZES).cumsum(0).tolist()]
    for name, (a, b) in ops.items():
        parts = [
            (a[s:e], b[i] if b.dim() == 3 else b[s:e])
            for i, (s, e) in enumerate(zip(starts[:-1], starts[1:], strict=True))
        ]
        if name in floor.WEIGHT_GRADS:
            ref = torch.stack([pa.t() @ pb for pa, pb in parts])
        else:
            ref = torch.cat([pa @ pb for pa, pb in parts])
        torch.testing.assert_close(calls[name](), ref, msg=name)


def test_batched_floors_have_the_layer_shapes(floor):
    rows, mean = sum(M_SIZES), 2
    ops = floor.operands(rows, SHAPE, "cpu", torch.float32, torch.Generator().manual_seed(0))
    batched = floor.bmm_calls(ops, SHAPE.num_experts, mean)
    bucketed = floor.bucketed_calls(ops, torch.tensor(M_SIZES), mean)
    overflow_rows = sum(max(m - mean, 0) for m in M_SIZES)
    for name, (a, b) in ops.items():
        if name in floor.WEIGHT_GRADS:
            assert batched[name]().shape == (SHAPE.num_experts, a.shape[1], b.shape[1]), name
            assert bucketed[name]().shape == (SHAPE.num_experts, a.shape[1], b.shape[1]), name
        else:
            assert batched[name]().shape == (SHAPE.num_experts, mean, b.shape[-1]), name
            padded, overflow = bucketed[name]()
            assert padded.shape == (SHAPE.num_experts, mean, b.shape[-1]), name
            assert overflow.shape == (overflow_rows, b.shape[-1]), name


def test_report_margins_are_target_minus_floor(floor, tmp_path, capsys):
    out = tmp_path / "floor.json"
    argv = ["--device", "cpu", "--tiny", "--tokens", "24", "--iters", "3", "--warmup", "1", "--out", str(out)]
    report = floor.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (result,) = report["results"]
    blocks = result["block_fwd_bwd_ms"]
    assert set(blocks) == {"grouped_mm", "moefuse"} and min(blocks.values()) > 0
    assert result["target_ms"] == pytest.approx(blocks["grouped_mm"] / 2.5)
    assert set(result["floors"]) == {"grouped_mm", "grouped_mm balanced", "bmm", "bmm+overflow"}
    for name, f in result["floors"].items():
        assert len(f["products_ms"]) == 6 and f["total_ms"] == pytest.approx(sum(f["products_ms"].values()))
        assert result["margin_ms"][name] == pytest.approx(result["target_ms"] - f["total_ms"])
    assert "2.5x means" in capsys.readouterr().out
