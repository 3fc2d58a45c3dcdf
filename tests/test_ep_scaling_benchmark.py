"""benchmarks/ep_scaling.py runs on CPU with gloo at tiny dims (2 processes) and writes its JSON."""

from __future__ import annotations

import json

from conftest import load_benchmark
from test_expert_parallel import run_ranks


def _run(rank: int, world_size: int, out: str) -> None:
    tiny = "--device cpu --dtype fp32 --hidden 32 --experts 8 --top-k 2 --intermediate 16 --tokens 24"
    load_benchmark("ep_scaling").main(
        [*tiny.split(), "--check-tokens", "9", "--iters", "2", "--warmup", "1", "--out", out]
    )


def test_ep_scaling_runs_on_cpu(tmp_path):
    out = tmp_path / "ep_scaling.json"
    run_ranks(2, tmp_path, _run, str(out))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["check"]["passed"], result["check"]
    assert set(result["ep2"]["split_ms"]) == {"communication", "compute", "other"}
    assert result["ep1"]["tokens_per_s_per_gpu"] > 0 and result["weak_scaling_efficiency"] > 0
    assert result["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
