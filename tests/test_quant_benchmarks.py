"""benchmarks/quant_gemm.py and benchmarks/qlora.py run on the CPU at toy sizes and write their JSON."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_benchmark


@pytest.mark.interpreter  # the dequantisation and dense kernels, on CPU tensors
def test_quant_gemm_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "quant_gemm.json"
    args = "--device cpu --tiny --tokens 8 --kernels down --iters 1 --warmup 1 --max-seconds 0"
    load_benchmark("quant_gemm").main([*args.split(), "--out", str(out)])
    report = json.loads(out.read_text())
    assert not report["failures"]
    assert [(r["tokens"], r["kernel"]) for r in report["results"]] == [(8, "down")]
    for result in report["results"]:
        assert set(result["median_ms"]) == {"4bit", "bf16"}
        assert result["relative_error"] < 1e-4  # fp32 on the CPU


@pytest.mark.parametrize("mode", ["qlora", "lora"])
def test_qlora_benchmark_runs_on_cpu(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora.json"
    norm = "moefuse" if mode == "lora" else "transformers"  # each run takes one of the two norms
    args = f"--device cpu --tiny --layers 2 --mode {mode} --steps 2 --warmup 1 --seq 16 --norm {norm}"
    load_benchmark("qlora").main([*args.split(), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == mode and report["layers"] == 2 and report["gradient_checkpointing"]
    assert len(report["losses"]) == 3 and all(math.isfinite(loss) for loss in report["losses"])
    assert report["tokens_per_s"] > 0 and report["trainable_params"] > 0
    assert (report["experts_4bit_gib"] > 0) == (mode == "qlora") and report["norm"] == norm


def test_qlora_benchmark_refuses_bad_arguments_before_building(monkeypatch, capsys):
    qlora = load_benchmark("qlora")
    with pytest.raises(SystemExit):
        qlora.parse_args(["--mode", "qlora", "--experts-implementation", "grouped_mm"])
    assert "--experts-implementation other than moefuse" in capsys.readouterr().err
    monkeypatch.setattr(qlora, "_trl_fused_lm_head", lambda: None)  # a TRL without the fused LM head
    with pytest.raises(SystemExit):
        qlora.parse_args(["--loss", "trl-fused"])
    assert "needs TRL >= 1.0" in capsys.readouterr().err
    assert qlora.parse_args([]).loss == "chunked"  # the default falls back


def test_qlora_memory_cap_needs_a_gpu():
    with pytest.raises(SystemExit, match="--memory-cap-gib caps GPU memory; it needs --device cuda"):
        load_benchmark("qlora").main("--device cpu --tiny --layers 1 --memory-cap-gib 20".split())
