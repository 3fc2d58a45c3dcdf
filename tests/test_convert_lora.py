"""LoRA adapter conversion: moefuse's fused adapters <-> PEFT per-expert adapters, bit-exact, loadable by PEFT."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import moefuse
from conftest import randomize_, tiny_config
from moefuse.cli import main
from moefuse.convert import CheckpointError, convert_lora
from moefuse.convert.inspect import compare, describe, tensor_hashes

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
WEIGHTS = "adapter_model.safetensors"
# PEFT >= 0.21 loads per-expert (Transformers 4) adapters into Transformers 5's fused experts by itself.
PEFT_CONVERTS_PER_EXPERT = importlib.util.find_spec("peft.utils.transformers_weight_conversion") is not None
_FUSED_KEY = re.compile(r"^(.+)\.experts\.((gate|up|down)_proj\.lora_[AB])\.weight$")


def _base(experts_implementation: str = "moefuse"):
    config = tiny_config("qwen3_moe", num_experts=8)
    config._experts_implementation = experts_implementation
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


class PerExpertExperts(nn.ModuleList):
    """Experts as Transformers 4 had them: one module of nn.Linear per expert, named ``experts.{e}.gate_proj``."""

    def __init__(self, fused: nn.Module):
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        experts = []
        for e in range(num_experts):
            expert = nn.Module()
            expert.gate_proj = nn.Linear(hidden, inter, bias=False)
            expert.up_proj = nn.Linear(hidden, inter, bias=False)
            expert.down_proj = nn.Linear(inter, hidden, bias=False)
            with torch.no_grad():
                expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(fused.down_proj[e])
            experts.append(expert)
        super().__init__(experts)
        self.act_fn = fused.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, k = torch.where(top_k_index == e)
            if token.numel():
                x = hidden_states[token]
                y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
                out = out.index_add(0, token, y * top_k_weights[token, k, None])
        return out


def _per_expert_model():
    model = _base("eager")
    for layer in model.model.layers:
        layer.mlp.experts = PerExpertExperts(layer.mlp.experts)
    return model


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir()}


@pytest.fixture(scope="module")
def fused_adapter(tmp_path_factory):
    """An adapter saved by moefuse's PEFT integration (LoRA on attention and experts) and its logits."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
    )
    model = get_peft_model(_base(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("adapter") / "fused"
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits
    return path, logits


def test_per_expert_round_trip_is_bit_exact(fused_adapter, tmp_path):
    path, _ = fused_adapter
    before = _digests(path)
    per_expert = moefuse.convert_lora_to_unfused(path, tmp_path / "per_expert", progress=False)
    back = moefuse.convert_lora_to_fused(per_expert, tmp_path / "back", progress=False)
    assert _digests(path) == before

    fused, unfused = load_file(path / WEIGHTS), load_file(per_expert / WEIGHTS)
    expected = {}
    for key, tensor in fused.items():
        m = _FUSED_KEY.match(key)
        if m is None:
            expected[key] = tensor
        else:  # expert e's PEFT factors are [e] of the fused stack
            expected.update({f"{m[1]}.experts.{e}.{m[2]}.weight": tensor[e] for e in range(tensor.shape[0])})
    assert sorted(unfused) == sorted(expected) and all(
        torch.equal(unfused[k], v) for k, v in expected.items()
    )
    assert unfused["base_model.model.model.layers.1.mlp.experts.5.down_proj.lora_A.weight"].shape == (2, 16)
    round_trip = load_file(back / WEIGHTS)
    assert sorted(round_trip) == sorted(fused) and all(
        torch.equal(round_trip[k], v) for k, v in fused.items()
    )
    assert tensor_hashes(back) == tensor_hashes(path) == tensor_hashes(per_expert)
    assert describe(per_expert)["layout"] == "per_expert" and describe(back)["layout"] == "fused"
    assert (back / "README.md").read_text() == (path / "README.md").read_text()


def test_seed_fused_layout_round_trip(fused_adapter, tmp_path):
    path, _ = fused_adapter
    seed = convert_lora(path, tmp_path / "seed", "qwen3_moe_fused", progress=False)
    tensors = load_file(seed / WEIGHTS)
    assert tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"].shape == (8, 4, 32)
    assert describe(seed)["layout"] == "qwen3_moe_fused"
    back = convert_lora(seed, tmp_path / "back", "fused", progress=False)
    assert compare(path, seed) == [] and tensor_hashes(back) == tensor_hashes(path)
    assert load_file(back / WEIGHTS).keys() == load_file(path / WEIGHTS).keys()


def test_converted_adapters_load_with_the_same_logits(fused_adapter, tmp_path):
    path, logits = fused_adapter
    per_expert = moefuse.convert_lora_to_unfused(path, tmp_path / "per_expert", progress=False)
    back = moefuse.convert_lora_to_fused(per_expert, tmp_path / "back", progress=False)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(_base(), back).eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, logits, rtol=0, atol=0)
        if PEFT_CONVERTS_PER_EXPERT:  # PEFT puts the per-expert adapter on Transformers' own fused experts
            loaded = PeftModel.from_pretrained(_base("grouped_mm"), per_expert).eval()
        else:  # plain PEFT LoRA on one nn.Linear per expert, as in Transformers 4
            loaded = PeftModel.from_pretrained(_per_expert_model(), per_expert).eval()
            assert (
                sum(name.endswith("gate_proj.lora_A.default.weight") for name, _ in loaded.named_parameters())
                == 16
            )
        torch.testing.assert_close(loaded(input_ids=IDS).logits, logits)


def test_rank_and_alpha_patterns_are_renamed(fused_adapter, tmp_path):
    path, logits = fused_adapter
    source = tmp_path / "source"
    source.mkdir()
    (source / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
    config = json.loads((path / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"model.layers.0.mlp.experts.up_proj": 3, "q_proj": 5}
    (source / "adapter_config.json").write_text(json.dumps(config))

    per_expert = moefuse.convert_lora_to_unfused(source, tmp_path / "per_expert", progress=False)
    config = json.loads((per_expert / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {
        "q_proj": 5,
        **{f"model.layers.0.mlp.experts.{e}.up_proj": 3 for e in range(8)},
    }
    assert config["rank_pattern"] == {"down_proj": 2}
    seed = convert_lora(per_expert, tmp_path / "seed", "qwen3_moe_fused", progress=False)
    assert json.loads((seed / "adapter_config.json").read_text())["alpha_pattern"] == {
        "model.layers.0.mlp.up_proj": 3,
        "q_proj": 5,
    }
    back = moefuse.convert_lora_to_fused(seed, tmp_path / "back", progress=False)
    assert json.loads((back / "adapter_config.json").read_text())["alpha_pattern"] == {
        "model.layers.0.mlp.experts.up_proj": 3,
        "q_proj": 5,
    }
    loaded = PeftModel.from_pretrained(_base(), back)
    assert loaded.base_model.model.model.layers[0].mlp.experts.lora_alpha["default"]["up_proj"] == 3
    assert loaded.base_model.model.model.layers[1].mlp.experts.lora_alpha["default"]["up_proj"] == 8


# --- refusals -------------------------------------------------------------------------------------------


def _refused(source: Path, target: Path, match: str, layout: str = "fused") -> None:
    before, siblings = _digests(source), set(target.parent.iterdir())
    with pytest.raises(CheckpointError, match=match) as info:
        convert_lora(source, target, layout, progress=False)
    assert "\n" not in str(info.value)
    assert _digests(source) == before and set(target.parent.iterdir()) == siblings


def _per_expert_copy(fused_adapter, tmp_path: Path, edit) -> Path:
    per_expert = moefuse.convert_lora_to_unfused(fused_adapter[0], tmp_path / "per_expert", progress=False)
    tensors = load_file(per_expert / WEIGHTS)
    edit(tensors)
    save_file(tensors, per_expert / WEIGHTS, metadata={"format": "pt"})
    return per_expert


def test_experts_with_different_ranks_are_refused(fused_adapter, tmp_path):
    def rank_3_for_expert_2(tensors):
        prefix = "base_model.model.model.layers.0.mlp.experts.2.up_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(3, 32)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(16, 3)

    path = _per_expert_copy(fused_adapter, tmp_path, rank_3_for_expert_2)
    _refused(
        path,
        tmp_path / "out",
        r"per_expert: the experts of base_model\.model\.model\.layers\.0\.mlp have up_proj\.lora_A matrices of different shapes",
    )


def test_missing_factor_and_missing_expert_are_refused(fused_adapter, tmp_path):
    def drop(*names):
        return lambda tensors: [
            tensors.pop(f"base_model.model.model.layers.1.mlp.experts.{n}.weight") for n in names
        ]

    path = _per_expert_copy(fused_adapter, tmp_path / "a", drop(*(f"{e}.down_proj.lora_B" for e in range(8))))
    _refused(
        path,
        tmp_path / "a" / "out",
        r"layers\.1\.mlp has down_proj\.lora_A but no down_proj\.lora_B; the adapter is incomplete",
    )
    path = _per_expert_copy(fused_adapter, tmp_path / "b", drop("4.gate_proj.lora_A", "4.gate_proj.lora_B"))
    _refused(
        path,
        tmp_path / "b" / "out",
        r"mismatched expert counts in .*layers\.1\.mlp \(gate_proj\.lora_A: 7 experts \(missing \[4\]\)",
    )


def test_adapter_without_expert_lora_is_refused(tmp_path):
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "attention")
    _refused(
        tmp_path / "attention",
        tmp_path / "out",
        r"attention: an adapter without LoRA on experts .*nothing to convert",
    )


def test_cli_converts_and_inspects_adapters(fused_adapter, tmp_path, capsys):
    path, _ = fused_adapter
    assert main(["convert", "to-unfused", str(path), str(tmp_path / "a"), "--quiet"]) == 0
    assert "(per_expert layout)" in capsys.readouterr().out
    assert main(["convert", "--to", "veomni", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]) == 0
    assert "(fused layout)" in capsys.readouterr().out
    assert (
        main(["convert", "to-fused", str(tmp_path / "a"), str(tmp_path / "c"), "--layout", "qwen3_moe_fused"])
        == 0
    )
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"kind +LoRA adapter", out) and re.search(r"layout +per_expert", out)
    assert main(["inspect", "--verify", str(path), str(tmp_path / "c")]) == 0


def test_mixtral_adapters_convert_to_and_from_transformers_4_names(tmp_path):
    """moefuse's LoRA on a Mixtral (Transformers 5's fused experts) in Transformers 4's Mixtral names, where PEFT
    put it on per-expert w1 (gate), w3 (up) and w2 (down) under block_sparse_moe, and back, bit for bit: the
    round trip loads to the same outputs."""
    config = tiny_config("mixtral", num_experts=4)
    config._experts_implementation = "moefuse"
    base = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    model = moefuse.lora.get_peft_model(base, r=4).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "fused")
    fused = load_file(tmp_path / "fused" / WEIGHTS)

    out = convert_lora(tmp_path / "fused", tmp_path / "mixtral", "mixtral", progress=False)
    tensors = load_file(out / WEIGHTS)
    stem = "base_model.model.model.layers.0"
    for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        for factor in ("lora_A", "lora_B"):
            stack = fused[f"{stem}.mlp.experts.{proj}_proj.{factor}.weight"]
            for e in range(4):
                assert torch.equal(
                    tensors[f"{stem}.block_sparse_moe.experts.{e}.{w}.{factor}.weight"], stack[e]
                )
    assert not any(".mlp." in name for name in tensors)
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {"w1", "w2", "w3"} <= set(targets) and not {"gate_proj", "up_proj", "down_proj"} & set(targets)

    back = convert_lora(out, tmp_path / "back", "fused", progress=False)
    assert load_file(back / WEIGHTS).keys() == fused.keys()
    assert all(torch.equal(load_file(back / WEIGHTS)[k], fused[k]) for k in fused)
    config_in = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert set(json.loads((back / "adapter_config.json").read_text())["target_modules"]) == set(
        config_in["target_modules"]
    )
    reloaded = PeftModel.from_pretrained(randomize_(AutoModelForCausalLM.from_config(config)).eval(), back)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
