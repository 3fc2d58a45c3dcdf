"""benchmarks/ab_block.py: variants alternate in one process, settings are restored, bad specs fail clearly."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark
from moefuse.ops import routing
from moefuse.settings import settings

TINY = ["--device", "cpu", "--tiny", "--tokens", "16", "--rounds", "2", "--iters", "2", "--warmup", "1"]


def test_variants_alternate_and_settings_are_restored(tmp_path):
    before = (routing.TOKEN_SUMS_COLUMNS, settings())
    out = tmp_path / "ab.json"
    setting = "b:moefuse.ops.routing.TOKEN_SUMS_COLUMNS=64,grouped_mm_weight_grad_rows=1"
    report = load_benchmark("ab_block").main(
        [*TINY, "--variant", "a:", "--variant", setting, "--out", str(out)]
    )
    assert (routing.TOKEN_SUMS_COLUMNS, settings()) == before
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["failures"] == [] and [row["variant"] for row in report["rows"]] == ["a", "b"]
    first, second = report["rows"]
    assert first["speedup_vs_first"] == 1.0 and len(first["rounds_ms"]) == 2 and second["median_ms"] > 0
    assert report["variants"][1]["settings"] == {
        "moefuse.ops.routing.TOKEN_SUMS_COLUMNS": 64,
        "grouped_mm_weight_grad_rows": 1,
    }


@pytest.mark.parametrize(
    "variant,message",
    [
        ("nocolon", "is not NAME:SETTINGS"),
        ("x:moefuse.ops.routing.NO_SUCH=1", "has no attribute 'NO_SUCH'"),
        ("x:moefuse.ops.routing.TOKEN_SUMS_COLUMNS=sixty", "is not a Python literal"),
        ("x:TOKEN_SUMS_COLUMNS=1", "neither a moefuse setting nor module.attribute=value"),
        ("x:autotune=maybe", "expected 1 or 0"),
    ],
)
def test_bad_variant_is_a_clear_error(variant, message):
    with pytest.raises(SystemExit, match=message):
        load_benchmark("ab_block").main([*TINY, "--variant", variant])


def test_a_variant_beyond_the_tolerance_fails_the_run(tmp_path, capsys):
    """Every variant is checked against the first before timing; one beyond --tolerance exits 1, naming it (a
    negative tolerance makes even an identical variant disagree)."""
    out = tmp_path / "ab.json"
    argv = [*TINY, "--variant", "a:", "--variant", "b:", "--tolerance", "-1", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("ab_block").main(argv)
    assert exit_info.value.code == 1
    assert "16 tokens: b " in capsys.readouterr().err
    assert json.loads(out.read_text())["failures"][0].startswith("16 tokens: b ")
