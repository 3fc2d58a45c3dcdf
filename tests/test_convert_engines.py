"""The adapters ``moefuse convert`` writes for vLLM and SGLang, checked against what their loaders expect (they
cannot run here: each check restates, in a few lines, what the cited source does with the file's tensors, and
compares the factors it gets with the per-expert ones), and a PEFT-merged model saved per expert by Transformers
reloaded with the adapter's logits."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import current_orientation, randomize_, tiny_config
from moefuse.cli import main
from moefuse.convert import LORA_LAYOUTS, convert_lora, detect_layout
from moefuse.convert.engines import ALIASES, FORMATS, resolve, single_scaling_warning
from moefuse.convert.inspect import describe, tensor_hashes

WEIGHTS = "adapter_model.safetensors"
E, R, H, INTER, LAYERS = 8, 4, 32, 16, 2
IN_OUT = {"gate_proj": (H, INTER), "up_proj": (H, INTER), "down_proj": (INTER, H)}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

# Every test here reads an adapter PEFT saved in the current orientation.
pytestmark = current_orientation


def _base():
    config = tiny_config("qwen3_moe", num_experts=E, intermediate=INTER)
    config._experts_implementation = "grouped_mm"
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


def _lora_model():
    config = LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(_base(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT target_parameters adapter and its per-expert conversion (the reference factors)."""
    root = tmp_path_factory.mktemp("engines")
    _lora_model().save_pretrained(root / "peft")
    per_expert = convert_lora(root / "peft", root / "per_expert", "per_expert", progress=False)
    return root, load_file(per_expert / WEIGHTS)


def _factor(reference: dict, layer: int, expert: int, proj: str, factor: str) -> torch.Tensor:
    return reference[
        f"base_model.model.model.layers.{layer}.mlp.experts.{expert}.{proj}.lora_{factor}.weight"
    ]


def _module(name: str) -> str:
    """vLLM's parse_fine_tuned_lora_name: the module a LoRA tensor belongs to, without base_model.model."""
    return name.removeprefix("base_model.model.").rsplit(".", 2)[0]


def test_engine_table_covers_every_layout_and_aliases_name_layouts():
    assert set(FORMATS) == set(LORA_LAYOUTS)
    assert all(resolve(alias) in LORA_LAYOUTS for alias in ALIASES)
    assert all(FORMATS[layout].readers for layout in LORA_LAYOUTS)


def test_vllm_per_expert_keys_and_shapes(adapter, tmp_path):
    # vllm-project/vllm vllm/lora/utils.py process_packed_modules_mapping: a model without is_3d_moe_weight
    # (vllm/model_executor/models/qwen3_moe.py@2e0831b0ab951c8896d4dd5d6cb9c3350a4574de) packs the experts
    # module from FusedMoE.make_expert_params_mapping's names "experts.{e}.{gate,down,up}_proj"; vllm/lora/
    # model_manager.py@01533aa8f9c07da9766323fbaf4c8b81bb2aa958 _create_merged_loras_inplace -> pack_moe
    # (vllm/lora/lora_weights.py) asserts every expert's three present; LoRALayerWeights: A [r, in], B [out, r].
    root, reference = adapter
    out = convert_lora(root / "peft", tmp_path / "vllm", "vllm_per_expert", progress=False)
    tensors = load_file(out / WEIGHTS)
    for layer in range(LAYERS):
        experts = f"model.layers.{layer}.mlp.experts"
        for e in range(E):
            for proj in ("gate_proj", "down_proj", "up_proj"):
                name = f"base_model.model.{experts}.{e}.{proj}"
                a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
                assert _module(f"{name}.lora_A.weight") == f"{experts}.{e}.{proj}"
                (n_in, n_out) = IN_OUT[proj]
                assert a.shape == (R, n_in) and b.shape == (n_out, R)
    assert tensor_hashes(out) == tensor_hashes(root / "per_expert")


def test_vllm_3d_keys_shapes_and_factors(adapter, tmp_path):
    # vllm-project/vllm vllm/lora/lora_model.py@0306474e9d1f26d8717aad457b9511f0c9e57d60: "experts.base_layer is
    # the gate_up_proj and experts is the down_proj"; vllm/lora/model_manager.py@01533aa8 _stack_moe_lora_weights
    # (both required) and _convert_3d_to_2d_moe_lora: A.reshape(E, -1, in), B.reshape(out, -1, E).permute(2, 0, 1),
    # gate the first I rows of gate_up's B, up the rest (GPT-OSS interleaves: moefuse refuses GPT-OSS's experts).
    root, reference = adapter
    for source in ("per_expert", "peft"):  # from per-expert and as a copy of PEFT's own adapter
        out = convert_lora(root / source, tmp_path / f"vllm-{source}", "vllm_3d", progress=False)
        tensors = load_file(out / WEIGHTS)
        assert len(tensors) == 2 * LAYERS + 4 * LAYERS  # per layer: q_proj A, B; the experts' two A, B pairs
        for layer in range(LAYERS):
            module = f"base_model.model.model.layers.{layer}.mlp.experts"
            loaded = {}
            for param, prefix in (("gate_up", f"{module}.base_layer"), ("down", module)):
                a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
                assert _module(f"{prefix}.lora_A.weight").endswith(
                    "experts" + (".base_layer" if param == "gate_up" else "")
                )
                loaded[param] = a.reshape(E, -1, a.shape[-1]), b.reshape(b.shape[0], -1, E).permute(2, 0, 1)
            (gate_up_a, gate_up_b), (down_a, down_b) = loaded["gate_up"], loaded["down"]
            assert gate_up_a.shape == (E, R, H) and gate_up_b.shape == (E, 2 * INTER, R)
            for e in range(E):
                for proj, a, b in (
                    ("gate_proj", gate_up_a[e], gate_up_b[e, :INTER]),
                    ("up_proj", gate_up_a[e], gate_up_b[e, INTER:]),
                    ("down_proj", down_a[e], down_b[e]),
                ):
                    assert torch.equal(a, _factor(reference, layer, e, proj, "A"))
                    assert torch.equal(b, _factor(reference, layer, e, proj, "B"))


@pytest.mark.parametrize("alias", ["sglang_per_expert", "sglang_fused"])
def test_sglang_keys_shapes_and_factors(adapter, tmp_path, alias):
    # sgl-project/sglang python/sglang/srt/lora/mem_pool.py@00639c4d198ed9596d73d45ca54d2d39b98b0b3e
    # load_lora_weight_to_buffer: a name with "experts.(\d+)." is one expert's 2-D factor; a 3-D tensor named
    # "experts.<proj>" holds every expert on dim 0 ([E, r, in] / [E, out, r]). python/sglang/srt/lora/lora.py
    # LoRAAdapter.normalize_gate_up_proj stacks gate and up along dim ndim-2 (rank for A, rows for B).
    root, reference = adapter
    out = convert_lora(root / "peft", tmp_path / alias, alias, progress=False)
    tensors = load_file(out / WEIGHTS)
    per_expert = alias == "sglang_per_expert"
    for layer in range(LAYERS):
        experts = f"base_model.model.model.layers.{layer}.mlp.experts"
        for proj in IN_OUT:
            for factor in "AB":
                if per_expert:
                    stacked = torch.stack(
                        [tensors[f"{experts}.{e}.{proj}.lora_{factor}.weight"] for e in range(E)]
                    )
                    assert re.search(r"experts\.(\d+)\.", f"{experts}.0.{proj}")
                elif f"{experts}.gate_up_proj.lora_A.weight" in tensors and proj != "down_proj":
                    # gate and up share PEFT's one A: written together, experts.gate_up_proj's A [E, r, H] and
                    # B [E, 2I, r], the other 3-D form normalize_gate_up_proj takes as it is
                    stacked = tensors[f"{experts}.gate_up_proj.lora_{factor}.weight"]
                    if factor == "B":
                        half = stacked.shape[1] // 2
                        stacked = stacked[:, :half] if proj == "gate_proj" else stacked[:, half:]
                else:
                    stacked = tensors[f"{experts}.{proj}.lora_{factor}.weight"]
                    assert stacked.dim() == 3 and not re.search(r"experts\.(\d+)\.", f"{experts}.{proj}")
                n_in, n_out = IN_OUT[proj]
                assert stacked.shape == ((E, R, n_in) if factor == "A" else (E, n_out, R))
                for e in range(E):
                    assert torch.equal(stacked[e], _factor(reference, layer, e, proj, factor))
        if not per_expert and f"{experts}.gate_up_proj.lora_A.weight" in tensors:
            continue
        dim = 0 if per_expert else 1  # normalize_gate_up_proj's cat dimension for 2-D / 3-D factors
        gate_a = tensors[
            f"{experts}.0.gate_proj.lora_A.weight" if per_expert else f"{experts}.gate_proj.lora_A.weight"
        ]
        up_a = tensors[
            f"{experts}.0.up_proj.lora_A.weight" if per_expert else f"{experts}.up_proj.lora_A.weight"
        ]
        assert torch.cat((gate_a, up_a), dim).shape[dim] == 2 * R


def test_inspect_and_cli_name_engines(adapter, tmp_path, capsys):
    root, _ = adapter
    assert main(["convert", "--to", "vllm_3d", str(root / "per_expert"), str(tmp_path / "v"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(peft_target_parameters layout)" in out and "read as is by PEFT, vLLM" in out
    rows = describe(tmp_path / "v")
    assert rows["engine names"] == "vllm_3d"
    assert [line.split(":")[0] for line in rows["read as is by"]] == ["PEFT", "vLLM"]
    assert "GPT-OSS" in rows["read as is by"][1] and "scaling" not in rows
    rows = describe(root / "per_expert")
    assert rows["engine names"] == "vllm_per_expert, sglang_per_expert"
    assert [line.split(":")[0] for line in rows["read as is by"]] == ["PEFT", "vLLM", "SGLang"]
    assert main(["inspect", str(root / "per_expert")]) == 0
    assert "Qwen3-MoE" in capsys.readouterr().out


def test_single_scaling_warning_names_the_keys_vllm_and_sglang_read_wrong():
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"a": 2, "b": 8}, "alpha_pattern": {"b": 16}}
    assert single_scaling_warning(config).startswith("a scale by")  # 8/2 != 8/4; b: 16/8 == 8/4
    assert single_scaling_warning({"r": 4, "lora_alpha": 8}) is None
    rslora = {**config, "use_rslora": True, "rank_pattern": {"b": 16}, "alpha_pattern": {"b": 16}}
    assert single_scaling_warning(rslora) is None  # 16/sqrt(16) == 8/sqrt(4)


def test_merged_model_saved_per_expert_reloads_with_the_adapters_logits(adapter, tmp_path):
    """PEFT's merge_and_unload on Transformers' own model, saved by save_pretrained: per-expert tensors on disk,
    each expert's weight the base one plus scaling * B_e @ A_e of the per-expert adapter, and the reloaded model
    gives the unmerged adapter model's logits."""
    _, reference = adapter
    base = _base().state_dict()  # the same weights _lora_model starts from (randomize_ is seeded)
    model = _lora_model()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    assert detect_layout({name: tuple(t.shape) for name, t in saved.items()}) == "per_expert"
    scaling = 8 / R
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = base[f"{prefix}.gate_up_proj"]
        for e in range(E):
            for proj, base_weight in (("gate_proj", gate_up[e, :INTER]), ("up_proj", gate_up[e, INTER:])):
                delta = _factor(reference, layer, e, proj, "B") @ _factor(reference, layer, e, proj, "A")
                torch.testing.assert_close(
                    saved[f"{prefix}.{e}.{proj}.weight"], base_weight + scaling * delta
                )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", experts_implementation="grouped_mm")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
