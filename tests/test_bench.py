"""`moefuse bench` on the CPU at tiny shapes: the JSON it writes, the agreement check that fails a wrong
implementation, the LoRA factor mapping between moefuse and PEFT target_parameters, report and plots."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import moefuse
from moefuse.bench import lora_factors
from moefuse.bench.configs import (
    BUILTIN_CONFIGS,
    experts_per_token,
    load_config,
    num_experts,
    tiny_config,
    with_layers,
)
from moefuse.bench.implementations import parse_implementations
from moefuse.bench.measure import compare, time_call
from moefuse.bench.plots import write_plots
from moefuse.bench.report import README_END, README_START
from moefuse.bench.shapes import moe_shape
from moefuse.cli import main

# Few calls per case: the figures of a tiny CPU run only have to exist, the checks have to pass.
# Tiny runs on the CPU (what CI runs), on a machine with a GPU too.
FAST = ["--tiny", "--warmup", "1", "--iters", "3", "--quiet", "--device", "cpu"]


@pytest.fixture
def one_thread():
    """Tiny ops on a busy 2-core machine run far steadier on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run of every level (the CI bench), its exit code and JSON."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [
            "bench",
            *FAST,
            "--level",
            "op,block,model",
            "--tokens",
            "32",
            "--layers",
            "2",
            "--implementations",
            "moefuse,grouped_mm,eager,moefuse+loss+norm",
            "--output",
            str(out),
        ]
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, json.loads(out.read_text()), out


def test_tiny_cpu_bench_writes_every_figure(tiny_run):
    code, result, _ = tiny_run
    assert code == 0 and result["ok"] and result["failures"] == []
    assert result["levels"] == ["op", "block", "model"] and result["dtype"] == "fp32"
    assert result["config"]["name"] == "qwen3-30b-a3b" and result["config"]["tiny"]
    assert result["config"]["experts"] == 8 and result["config"]["top_k"] == 2
    env = result["environment"]
    assert (
        env["torch"] == importlib.metadata.version("torch")  # torch.__version__ may carry a local label
        and env["transformers"] != "not installed"
        and env["device"] == "cpu"
    )
    assert result["dense_matmul"]["tflops"] > 0
    assert result["command"].startswith(
        "moefuse bench --level op,block,model --config qwen3-30b-a3b --tokens 32"
    )
    assert [(s["level"], s["what"]) for s in result["skipped"]] == [
        ("model", "qlora"),
        ("op", "moefuse+loss+norm"),
        ("block", "moefuse+loss+norm"),
    ]
    assert "4-bit" in result["skipped"][0]["reason"]
    assert "runs no whole model ('+loss' and '+norm'" in result["skipped"][1]["reason"]

    rows = result["rows"]
    assert not [r for r in rows if "error" in r]
    cases = {(r["level"], r["group"], r["mode"], r["implementation"]) for r in rows}
    impls = ("eager", "grouped_mm", "moefuse")
    expected = {("op", g, m, i) for g in ("gate_up", "down") for m in ("fwd", "fwd+bwd") for i in impls}
    expected |= {("block", "", m, i) for m in ("fwd", "fwd+bwd") for i in impls}
    expected |= {("model", s, "step", i) for s in ("full", "lora") for i in (*impls, "moefuse+loss+norm")}
    assert cases == expected
    for row in rows:
        assert row["tokens"] == 32 and row["median_ms"] > 0 and len(row["times_ms"]) >= 3
        assert row["tokens_per_s"] == pytest.approx(32 / (row["median_ms"] * 1e-3))
        assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] * 1e-3) / 1e12)
        assert row["peak_gib"] is None  # no memory figure on the CPU
        check = row["check"]
        assert check["ok"]
        if row["implementation"] == "eager":
            assert check["is_reference"]
            assert row["speedup_vs_eager"] == pytest.approx(1.0)
        else:
            assert check["reference"] == "eager" and check["worst_error"] <= check["worst_allowed"]
            assert row["speedup_vs_grouped_mm"] > 0
    by_case = {(r["level"], r["group"], r["mode"], r["implementation"]): r for r in rows}
    # The model level measures how far one rounding unit in the experts moves each tensor; the others do not.
    floor = by_case[("model", "full", "step", "eager")]["check"]["noise_floor"]
    assert set(floor) == set(by_case[("model", "full", "step", "moefuse")]["check"]["errors"])
    assert 0 < max(floor.values()) < 1e-4  # fp32: one rounding unit moves little
    assert "noise_floor" not in by_case[("block", "", "fwd", "eager")]["check"]
    assert by_case[("model", "full", "step", "moefuse")]["backend"] == "torch"
    assert by_case[("block", "", "fwd", "grouped_mm")]["backend"] is None
    # Each level compares what it should: the block's every gradient, the model's loss and adapter gradients.
    block_check = by_case[("block", "", "fwd+bwd", "moefuse")]["check"]["errors"]
    assert {"output", "grad input", "grad gate.weight", "grad experts.gate_up_proj"} <= set(block_check)
    lora = by_case[("model", "lora", "step", "moefuse")]
    assert "loss" in lora["check"]["errors"]
    assert any(".gate_up_proj.lora_A" in name for name in lora["check"]["errors"])
    assert any("q_proj.lora_B" in name for name in lora["check"]["errors"])
    full = by_case[("model", "full", "step", "moefuse")]
    assert full["trainable_params"] > lora["trainable_params"] > 0
    # moefuse's loss and norms give the same loss and gradients (checked against eager like every row).
    with_loss = by_case[("model", "lora", "step", "moefuse+loss+norm")]["check"]
    assert with_loss["ok"] and set(with_loss["errors"]) == set(lora["check"]["errors"])
    # The same FLOPs for every implementation of a case: they compute the same thing.
    for key in (("model", "lora", "step"), ("op", "down", "fwd+bwd")):
        assert len({by_case[(*key, i)]["flops"] for i in impls}) == 1


def test_report_makes_markdown_tables_and_fills_readme(tiny_run, tmp_path, capsys):
    _, _, path = tiny_run
    assert main(["bench", "--report", str(path)]) == 0
    tables = capsys.readouterr().out
    assert (
        "**block**: the model's sparse MoE block (router + experts); `qwen3-30b-a3b` shapes, fp32" in tables
    )
    assert "**model**: 2 decoder layers at the config's dims, one AdamW training step;" in tables
    assert "Outputs and gradients checked against `eager`: largest relative error " in tables
    assert (
        "| tokens | group | mode | implementation | ms | tokens/s | TFLOP/s | peak GiB | like for like | vs grouped_mm "
        "| vs eager |" in tables
    )
    # moefuse+loss+norm has no like-for-like baseline in this run (no grouped_mm+loss+norm): no ratio is made up.
    (row,) = [
        line for line in tables.splitlines() if line.startswith("| 32 | lora | step | moefuse+loss+norm")
    ]
    assert row.split(" | ")[8] == "-"
    assert "| 32 | lora | step | moefuse [torch] |" in tables
    assert tables.count("\n| 32 |") == 12 + 6 + 8  # op, block, model (moefuse+loss+norm: model only)

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    assert main(["bench", "--report", str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{README_END}\n\nafter\n")
    assert text.split(README_START)[1].split(README_END)[0].strip() == tables.strip()

    failed = json.loads(path.read_text())
    failed.update(ok=False, failures=["block 32 tokens moefuse disagrees with eager"])
    bad = tmp_path / "failed.json"
    bad.write_text(json.dumps(failed))
    with pytest.raises(SystemExit, match="failed run"):
        main(["bench", "--report", str(bad)])


def test_plots_are_written_or_skipped_with_a_message(tiny_run, tmp_path, monkeypatch):
    _, result, _ = tiny_run
    if importlib.util.find_spec("matplotlib") is not None:
        written = write_plots(result, tmp_path / "run.json")
        assert written == [tmp_path / "run_speedup.png"]  # no memory figures on the CPU
        assert written[0].read_bytes().startswith(b"\x89PNG")
        # A GPU run has memory figures: they get their own plot.
        gpu = {**result, "rows": [{**r, "peak_gib": 1.0 + i} for i, r in enumerate(result["rows"])]}
        assert write_plots(gpu, tmp_path / "gpu.json") == [
            tmp_path / "gpu_speedup.png",
            tmp_path / "gpu_memory.png",
        ]
        assert (tmp_path / "gpu_memory.png").read_bytes().startswith(b"\x89PNG")
        # From a saved run too (runs made where matplotlib is missing).
        saved = tmp_path / "saved.json"
        saved.write_text(json.dumps(result))
        assert main(["bench", "--report", str(saved), "--plots"]) == 0
        assert (tmp_path / "saved_speedup.png").read_bytes().startswith(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "matplotlib is not installed" in write_plots(result, tmp_path / "run.json")


def _wrong_experts(self, hidden_states, top_k_index, top_k_weights):
    """Transformers' grouped_mm experts, 5% off: what a subtly broken kernel looks like."""
    return 1.05 * ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


def test_disagreement_fails_the_run(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "wrong_for_test", _wrong_experts)
    out = tmp_path / "wrong.json"
    argv = ["bench", *FAST, "--tokens", "16", "--implementations", "eager,wrong_for_test"]
    # The model level's noise floor does not hide it either.
    assert main([*argv, "--level", "model", "--layers", "2", "--setups", "full", "--output", str(out)]) == 1
    (failure,) = json.loads(out.read_text())["failures"]
    assert failure.startswith("model 16 tokens full/wrong_for_test disagrees with eager: ")
    # A second run does not overwrite the first's file.
    with pytest.raises(SystemExit, match="runs are kept, not overwritten"):
        main([*argv, "--level", "block", "--modes", "fwd", "--output", str(out)])
    out = tmp_path / "wrong-block.json"
    assert main([*argv, "--level", "block", "--modes", "fwd", "--output", str(out)]) == 1
    result = json.loads(out.read_text())
    assert not result["ok"]
    check = result["rows"][1]["check"]
    assert check["max_relative_error"] == pytest.approx(0.05, rel=1e-3)  # every output and gradient 5% off
    assert result["failures"] == [
        f"block 16 tokens wrong_for_test disagrees with eager: {check['worst_tensor']} relative error "
        f"{check['worst_error']:.3g} > allowed 0.0001"
    ]
    assert "FAILED: block 16 tokens wrong_for_test disagrees with eager" in capsys.readouterr().err
    # In bf16 the block level's noise floor is the reference's own rounding (the block again in fp32): it lets
    # a tensor summed over many rows differ by what rounding moves it, and still catches 5% everywhere.
    out = tmp_path / "wrong-block-bf16.json"
    bf16 = ["--level", "block", "--modes", "fwd+bwd", "--dtype", "bf16", "--output", str(out)]
    assert main([*argv, *bf16]) == 1
    result = json.loads(out.read_text())
    floor = result["rows"][0]["check"]["noise_floor"]
    assert {"output", "grad input"} <= set(floor) and 0 < max(floor.values()) < 0.05
    assert result["failures"][0].startswith("block 16 tokens wrong_for_test disagrees with eager: ")


def test_missing_gradient_counts_as_wrong():
    reference = {"output": torch.ones(3), "grad w": torch.ones(2)}
    check = compare({"output": torch.ones(3)}, reference, "eager", 1e-4)
    assert not check.ok and check.errors == {"output": 0.0, "grad w": float("inf")}
    check = compare(
        {"output": torch.ones(3), "grad w": torch.ones(2), "extra": torch.ones(1)}, reference, "eager", 1e-4
    )
    assert check.ok and check.not_compared == ["extra"]


def _tiny_model(seed: int = 0):
    _, config = load_config("tiny")
    config = with_layers(config, 2)
    config.use_cache = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_lora_factors_map_between_moefuse_and_peft_target_parameters(one_thread):
    """The same canonical adapter values give the same model through moefuse's PEFT LoRA and PEFT's own
    target_parameters LoRA: the loss and every canonical gradient agree in fp32, and the adapters matter."""
    model = _tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    base_loss = model(input_ids=ids, labels=ids).loss.item()
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    results = {}
    values = None
    for impl in ("grouped_mm", "moefuse"):
        model.set_experts_implementation(impl)
        if impl == "moefuse":
            config = moefuse.lora.lora_config(
                4, target_modules=attention + ["experts.gate_up_proj", "experts.down_proj"]
            )
        else:
            config = LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=attention,
                target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            )
        peft_model = get_peft_model(model, config)
        factors = lora_factors.canonical_factors(peft_model)
        if values is None:
            values = lora_factors.random_canonical_values(factors, seed=3, std=0.1)
        lora_factors.write_canonical(factors, values)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[impl] = (
            loss.item(),
            {k: v.clone() for k, v in lora_factors.canonical_grads(factors).items()},
        )
        for name, factor in factors.items():  # written values read back unchanged
            assert torch.equal(factor.read("data"), values[name]), name
        model = peft_model.unload()
    (loss_hf, grads_hf), (loss_mf, grads_mf) = results["grouped_mm"], results["moefuse"]
    assert abs(loss_hf - base_loss) > 1e-3  # the adapters change the model
    assert loss_mf == pytest.approx(loss_hf, rel=1e-5)
    assert set(grads_hf) == set(grads_mf) and len(grads_hf) == 2 * 2 * (4 + 2)  # factors x layers x targets
    for name, grad in grads_hf.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_mf[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_implementation_names():
    impls = parse_implementations("moefuse, grouped_mm,eager,batched_mm")
    assert [i.name for i in impls] == ["moefuse", "grouped_mm", "eager", "batched_mm"]
    assert (
        impls[0].is_moefuse
        and impls[0].backend is None
        and impls[0].backend_in_use(torch.device("cpu")) == "torch"
    )
    with pytest.raises(SystemExit, match="unknown implementation 'triton'"):
        parse_implementations("moefuse,triton")
    with pytest.raises(SystemExit, match="only moefuse takes a ':backend'"):
        parse_implementations("grouped_mm:torch")
    with pytest.raises(SystemExit, match="listed twice"):
        parse_implementations("eager,eager")
    with_loss, plain, both = parse_implementations("grouped_mm+loss,grouped_mm,moefuse+norm+loss")
    assert with_loss.moefuse_loss and with_loss.experts == "grouped_mm" and not plain.moefuse_loss
    assert both.moefuse_loss and both.moefuse_norm and both.model_level_only == "'+loss' and '+norm'"
    (rope,) = parse_implementations("moefuse+rope")
    assert rope.moefuse_rope and not rope.moefuse_norm and rope.model_level_only == "'+rope'"
    for bad in ("grouped_mm+fast", "moefuse+loss+loss"):
        with pytest.raises(
            SystemExit, match="suffixes are \\+loss, \\+norm, \\+rope, \\+compile, each at most once"
        ):
            parse_implementations(bad)
    if importlib.util.find_spec("moefuse.ops.backend") is None:
        with pytest.raises(SystemExit, match="cannot force a kernel backend"):
            parse_implementations("moefuse:torch")
    else:
        (forced,) = parse_implementations("moefuse:torch")
        assert forced.backend == "torch" and forced.backend_in_use(torch.device("cpu")) == "torch"
        with pytest.raises(SystemExit, match="unknown moefuse backend 'cuda'"):
            parse_implementations("moefuse:cuda")


def test_time_cap_bounds_slow_cases():
    calls = []

    def slow():
        calls.append(None)
        torch.mm(torch.ones(4, 4), torch.ones(4, 4))
        import time

        time.sleep(0.02)

    timing = time_call(slow, torch.device("cpu"), warmup=5, iters=50, max_seconds=0.05)
    assert len(timing.times_ms) == 3 and len(calls) <= 6  # warm-up stops at the cap, then the 3 timed calls
    assert min(timing.times_ms) >= 20


@pytest.mark.parametrize("name", [n for n in BUILTIN_CONFIGS if n != "tiny"])
def test_builtin_configs_shapes(name):
    _, config = load_config(name)
    shape = moe_shape(tiny_config(config))
    assert shape.num_experts <= 8 and shape.top_k <= 2 and shape.hidden == 64
    full = BUILTIN_CONFIGS[name]
    top_k = full.get("num_experts_per_tok", full.get("top_k_experts"))
    assert config.hidden_size == full["hidden_size"] and experts_per_token(config) == top_k
    assert num_experts(config) == next(
        full[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in full
    )


def test_config_from_a_folder_and_clear_errors(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BUILTIN_CONFIGS["tiny"], "num_experts": 4}))
    label, config = load_config(str(folder))
    assert label == str(folder / "config.json") and config.num_experts == 4
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64}))
    with pytest.raises(SystemExit, match="is not a Mixture-of-Experts config"):
        load_config(str(folder))
    with pytest.raises(SystemExit, match="neither a built-in name"):
        load_config(str(tmp_path / "missing" / "x"))


@pytest.mark.parametrize(
    "name,model_type",
    [
        ("mixtral-8x7b", "mixtral"),
        ("gpt-oss-20b", "gpt_oss"),
        ("deepseek-v3", "deepseek_v3"),
        ("qwen3.5-35b-a3b", "qwen3_5_moe_text"),
    ],
)
def test_tiny_block_of_another_family(tmp_path, one_thread, name, model_type):
    """Mixtral names its experts differently, GPT-OSS's have biases, interleaved rows and a clamped SwiGLU,
    DeepSeek-V3 routes by expert groups beside a shared expert, Qwen3.5-MoE gates its shared expert; the block
    level runs them all the same."""
    out = tmp_path / f"{name}.json"
    argv = [
        "bench",
        *FAST,
        "--config",
        name,
        "--tokens",
        "16",
        "--modes",
        "fwd+bwd",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"]["model_type"] == model_type and len(result["rows"]) == 3
    assert all(r["tflops"] > 0 and r["check"]["ok"] for r in result["rows"])


def test_random_weights_keep_norms_and_scales_at_one():
    """Gemma 4's router multiplies its input by ``scale`` and each expert's weight by ``per_expert_scale``: at 0 (a
    bias's value) no token would reach an expert."""
    from moefuse.bench.block import randomize_

    gemma4 = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config = gemma4.Gemma4TextConfig(num_experts=8, top_k_experts=2, hidden_size=64, enable_moe_block=True)
    router = gemma4.Gemma4TextRouter(config)
    torch.nn.init.zeros_(router.scale), torch.nn.init.zeros_(router.per_expert_scale)
    randomize_(router, seed=0, std=0.02)
    assert torch.equal(router.scale, torch.ones(64)) and torch.equal(router.per_expert_scale, torch.ones(8))
    assert 0.01 < router.proj.weight.std().item() < 0.03
    _, top_k_weights, _ = router(torch.randn(5, 64))
    torch.testing.assert_close(top_k_weights.sum(-1), torch.ones(5))


def test_block_level_refuses_a_decoder_layer_without_router_and_experts():
    from types import SimpleNamespace

    from transformers.modeling_layers import GradientCheckpointingLayer

    from moefuse.bench.block import random_block

    class DenseLayer(GradientCheckpointingLayer):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.mlp = torch.nn.Linear(4, 4)

    ctx = SimpleNamespace(
        shape=SimpleNamespace(block_class=DenseLayer),
        config=SimpleNamespace(model_type="toy"),
        device="cpu",
    )
    with pytest.raises(
        SystemExit, match=r"model type 'toy' keeps its experts on the decoder layer \(DenseLayer\)"
    ):
        random_block(ctx)


def test_gemma4_runs_at_every_level(tmp_path, one_thread):
    """Gemma 4 names its top-k ``top_k_experts``, keeps its router and experts on the decoder layer (the block
    level times the two together) and gives its full-attention layers a wider head (``per_layer_config``): the
    model level counts each layer's own width."""
    gemma4 = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    config = gemma4.Gemma4TextConfig(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, vocab_size=512,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    argv = ["bench", *FAST, "--config", str(tmp_path), "--tokens", "16", "--modes", "fwd+bwd"]
    for level, options in (("op", []), ("block", []), ("model", ["--layers", "2", "--setups", "lora"])):
        out = tmp_path / f"{level}.json"
        assert main([*argv, "--level", level, *options, "--output", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert rows and all(r["tflops"] > 0 and r["check"]["ok"] for r in rows), level


@pytest.mark.skipif(
    importlib.util.find_spec("moefuse.ops.backend") is None, reason="this moefuse has no backend selection"
)
@pytest.mark.interpreter
def test_forced_backends_side_by_side(tmp_path, one_thread):
    """moefuse:torch and moefuse:triton in one run (Triton's interpreter on the CPU, as the test suite sets it)."""
    out = tmp_path / "backends.json"
    argv = ["bench", *FAST, "--level", "op", "--tokens", "8", "--modes", "fwd", "--output", str(out)]
    assert main([*argv, "--implementations", "moefuse:torch,moefuse:triton"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["group"], r["implementation"], r["backend"]) for r in rows] == [
        (g, f"moefuse:{b}", b) for g in ("gate_up", "down") for b in ("torch", "triton")
    ]
    assert all(r["check"]["ok"] for r in rows) and rows[1]["check"]["reference"] == "moefuse:torch"


def test_suffixes_set_moefuse_loss_and_norms_undo_them_and_refuse_what_they_cannot_replace():
    from moefuse.bench.model import set_model_kernels
    from moefuse.ops.cross_entropy import causal_lm_loss

    _, config = load_config("qwen3-30b-a3b")
    model = AutoModelForCausalLM.from_config(tiny_config(config))
    transformers_loss = model.loss_function
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    (both,) = parse_implementations("grouped_mm+loss+norm")
    undo = set_model_kernels(model, both)
    assert model.loss_function is causal_lm_loss and all("forward" in vars(m) for m in norms)
    undo()
    assert model.loss_function is transformers_loss and not any("forward" in vars(m) for m in norms)
    (with_loss,) = parse_implementations("grouped_mm+loss")
    model.loss_function = lambda *args, **kwargs: None  # a loss moefuse's cannot stand in for
    with pytest.raises(SystemExit, match="not Transformers' ForCausalLMLoss.*drop '\\+loss'"):
        set_model_kernels(model, with_loss)
    (with_norm,) = parse_implementations("grouped_mm+norm")
    with pytest.raises(SystemExit, match="no RMSNorm module.*drop '\\+norm'"):
        set_model_kernels(torch.nn.Linear(2, 2), with_norm)


def test_rope_suffix_swaps_the_family_function_for_the_step_and_refuses_other_families():
    import sys

    from moefuse.bench.model import set_model_kernels
    from moefuse.ops.rope import apply_rotary_pos_emb

    _, config = load_config("qwen3-30b-a3b")
    model = AutoModelForCausalLM.from_config(tiny_config(config))
    module = sys.modules[type(model).__module__]
    own = module.apply_rotary_pos_emb
    (with_rope,) = parse_implementations("moefuse+rope")
    undo = set_model_kernels(model, with_rope)
    assert module.apply_rotary_pos_emb is apply_rotary_pos_emb
    undo()
    assert module.apply_rotary_pos_emb is own
    model.config.model_type = "some_family"
    with pytest.raises(SystemExit, match="rotary embeddings stand in for.*not some_family's; drop '\\+rope'"):
        set_model_kernels(model, with_rope)


def test_compiled_implementations_and_like_for_like_ratios(tmp_path, one_thread):
    """'+compile' runs the block and the model under torch.compile and agrees with the reference; each row's
    like-for-like ratio is taken against grouped_mm with the same suffixes, and against it compiled."""
    out = tmp_path / "compiled.json"
    implementations = "moefuse,grouped_mm,moefuse+compile,grouped_mm+compile"
    argv = ["bench", *FAST, "--level", "block", "--tokens", "16", "--modes", "fwd+bwd"]
    assert main([*argv, "--implementations", implementations, "--output", str(out)]) == 0
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["check"]["ok"] for r in rows.values())
    ms = {name: r["median_ms"] for name, r in rows.items()}
    moefuse_row, compiled_row = rows["moefuse"], rows["moefuse+compile"]
    assert moefuse_row["speedup_like_for_like"] == pytest.approx(ms["grouped_mm"] / ms["moefuse"])
    assert moefuse_row["speedup_vs_compiled_baseline"] == pytest.approx(
        ms["grouped_mm+compile"] / ms["moefuse"]
    )
    assert compiled_row["speedup_like_for_like"] == pytest.approx(
        ms["grouped_mm+compile"] / ms["moefuse+compile"]
    )
    report = main(["bench", "--report", str(out)])
    assert report == 0


def test_like_for_like_baseline_names():
    from moefuse.bench.implementations import baseline_name, canonical_name

    assert baseline_name("moefuse+norm+loss") == "grouped_mm+loss+norm"
    assert baseline_name("moefuse:triton+loss+norm", compiled=True) == "grouped_mm+loss+norm+compile"
    assert baseline_name("moefuse+compile", compiled=False) == "grouped_mm"
    assert canonical_name("grouped_mm+compile+loss") == "grouped_mm+loss+compile"


def test_a_sync_belongs_to_the_innermost_code_outside_torch_and_transformers():
    from moefuse.bench.measure import AUTOGRAD_ENGINE, Frame, sync_owner

    site = "/venv/lib/python3.12/site-packages"
    stack = (
        Frame(f"{site}/trl/trainer/utils.py", 1682, "_fused_forward", None),
        Frame(
            f"{site}/transformers/models/mixtral/modeling_mixtral.py", 534, "load_balancing_loss_func", None
        ),
    )
    assert sync_owner(stack) == f"{site}/trl/trainer/utils.py"
    backward = (
        Frame(f"{site}/accelerate/accelerator.py", 2861, "backward", None),
        Frame(f"{site}/torch/autograd/graph.py", 869, "_engine_run_backward", None),
        Frame("<autograd engine>", None, "IndexBackward0", None),
    )
    assert sync_owner(backward) == AUTOGRAD_ENGINE  # the backward's Python frames did not ask for it
    built_by_trl = (*backward, Frame(f"{site}/trl/trainer/utils.py", 1650, "_fused_forward", None))
    assert sync_owner(built_by_trl) == f"{site}/trl/trainer/utils.py"


def test_forward_frames_are_where_anomaly_mode_saw_the_node_built():
    from moefuse.bench.measure import _forward_frames

    x = torch.randn(5, requires_grad=True)
    seen = []
    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        picked = x[x > 0]  # built here: an IndexBackward0 node
    picked.register_hook(lambda grad: seen.append(_forward_frames(torch._C._current_autograd_node())))
    picked.sum().backward()
    (frames,) = seen
    assert frames[-1].filename == __file__
    assert frames[-1].name == "test_forward_frames_are_where_anomaly_mode_saw_the_node_built"
    assert frames[-1].line == "picked = x[x > 0]  # built here: an IndexBackward0 node"
