"""PEFT ``target_parameters`` adapters (Transformers 5's fused experts) <-> moefuse's and per-expert adapters:
lossless, and loaded by PEFT itself and by moefuse with the logits of the adapter they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import CURRENT_PEFT, current_orientation, randomize_, tiny_config
from moefuse.cli import main
from moefuse.convert import CheckpointError, convert_lora
from moefuse.convert.inspect import describe, tensor_hashes

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
EXPERTS = "base_model.model.model.layers.{}.mlp.experts"
E, R = 8, 4


def _base(experts_implementation: str):
    config = tiny_config("qwen3_moe", num_experts=E)
    config._experts_implementation = experts_implementation
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


def _randomize_lora_(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _same_tensors(a: Path, b: Path) -> bool:
    return _same_tensors_dict(load_file(a / WEIGHTS), load_file(b / WEIGHTS))


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """An adapter saved by PEFT with target_parameters on Transformers' grouped_mm experts, and its logits."""
    config = LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
    )
    model = get_peft_model(_base("grouped_mm"), config)
    _randomize_lora_(model)
    path = tmp_path_factory.mktemp("peft") / "target_parameters"
    model.save_pretrained(path)
    return path, _logits(model)


@pytest.fixture(scope="module")
def moefuse_adapter(tmp_path_factory):
    """An adapter of moefuse's own LoRA on fused experts (gate and up with different A factors), its logits."""
    config = LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
    )
    model = get_peft_model(_base("moefuse"), config)
    _randomize_lora_(model, seed=2)
    path = tmp_path_factory.mktemp("moefuse") / "fused"
    model.save_pretrained(path)
    return path, _logits(model)


@current_orientation
def test_peft_saves_what_the_layout_expects(peft_adapter):
    path, _ = peft_adapter
    tensors = load_file(path / WEIGHTS)
    experts = EXPERTS.format(0)
    assert tensors[f"{experts}.base_layer.lora_A.weight"].shape == (E * R, 32)  # gate_up_proj: [E*r, H]
    assert tensors[f"{experts}.base_layer.lora_B.weight"].shape == (32, E * R)  # [2I, E*r]
    assert tensors[f"{experts}.lora_A.weight"].shape == (E * R, 16)  # down_proj: [E*r, I]
    assert tensors[f"{EXPERTS.format(1)}.lora_B.weight"].shape == (32, E * 2)  # [H, E*r], rank_pattern's r=2
    assert describe(path)["layout"] == "peft_target_parameters"


@current_orientation
def test_peft_adapter_to_per_expert_and_fused_loads_in_moefuse_with_equal_logits(peft_adapter, tmp_path):
    path, logits = peft_adapter
    per_expert = convert_lora(path, tmp_path / "per_expert", "per_expert", progress=False)
    fused = convert_lora(per_expert, tmp_path / "fused", "fused", progress=False)
    tensors = load_file(per_expert / WEIGHTS)
    peft = load_file(path / WEIGHTS)
    # Expert e's A is rows e*r:(e+1)*r of PEFT's A; its B is columns e, e+E, ...: gate B the first I rows.
    a, b = (
        peft[f"{EXPERTS.format(0)}.base_layer.lora_A.weight"],
        peft[f"{EXPERTS.format(0)}.base_layer.lora_B.weight"],
    )
    for proj, rows in (("gate_proj", slice(0, 16)), ("up_proj", slice(16, 32))):
        assert torch.equal(tensors[f"{EXPERTS.format(0)}.3.{proj}.lora_A.weight"], a[3 * R : 4 * R])
        assert torch.equal(tensors[f"{EXPERTS.format(0)}.3.{proj}.lora_B.weight"], b[rows, 3::E])
    config = json.loads((fused / CONFIG).read_text())
    # gate and up share PEFT's one A: the fused adapter keeps them together, as LoRA on gate_up_proj
    assert config["target_parameters"] is None and {"gate_up_proj", "down_proj"} <= set(
        config["target_modules"]
    )
    assert f"{EXPERTS.format(0)}.gate_up_proj.lora_B.weight" in load_file(fused / WEIGHTS)
    assert config["rank_pattern"] == {"layers.1.mlp.experts.down_proj": 2}  # still names down_proj here
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(_base("moefuse"), fused)), logits, rtol=1e-5, atol=1e-5
    )
    assert tensor_hashes(path) == tensor_hashes(per_expert) == tensor_hashes(fused)


@current_orientation
def test_peft_adapter_round_trips_bit_for_bit(peft_adapter, tmp_path):
    path, _ = peft_adapter
    for layout in ("per_expert", "fused", "qwen3_moe_fused", "peft_target_parameters"):
        there = convert_lora(path, tmp_path / layout, layout, progress=False)
        back = convert_lora(there, tmp_path / f"{layout}-back", "peft_target_parameters", progress=False)
        assert _same_tensors(path, back), layout
        original, config = (json.loads((p / CONFIG).read_text()) for p in (path, back))
        for key in (
            "target_parameters",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "r",
            "lora_alpha",
        ):
            assert (
                sorted(config[key] or []) == sorted(original[key] or [])
                if key.startswith("target")
                else (config[key] == original[key])
            ), (layout, key)


@current_orientation
def test_moefuse_adapter_to_peft_loads_in_peft_with_equal_logits(moefuse_adapter, tmp_path):
    path, logits = moefuse_adapter
    peft = convert_lora(path, tmp_path / "peft", "peft_target_parameters", progress=False)
    tensors, config = load_file(peft / WEIGHTS), json.loads((peft / CONFIG).read_text())
    # gate and up have different A factors: gate_up_proj at rank 2r, alpha doubled, B block-diagonal.
    assert tensors[f"{EXPERTS.format(0)}.base_layer.lora_A.weight"].shape == (E * 2 * R, 32)
    assert config["rank_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == 2 * R
    assert config["alpha_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == 16
    assert config["target_modules"] == ["q_proj"]
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    loaded = PeftModel.from_pretrained(_base("grouped_mm"), peft)
    torch.testing.assert_close(_logits(loaded), logits, rtol=1e-5, atol=1e-5)
    per_expert = convert_lora(peft, tmp_path / "per_expert", "per_expert", progress=False)
    assert tensor_hashes(per_expert)[f"{EXPERTS.format(1)}.2.gate_proj.lora_A.weight"].startswith(
        "F32[8, 32]"
    )


@current_orientation
def test_shared_gate_up_a_gives_rank_r_and_round_trips(moefuse_adapter, tmp_path):
    path, logits = moefuse_adapter
    source = tmp_path / "shared"
    source.mkdir()
    tensors = load_file(path / WEIGHTS)
    for layer in (0, 1):
        experts = EXPERTS.format(layer)
        tensors[f"{experts}.up_proj.lora_A.weight"] = tensors[f"{experts}.gate_proj.lora_A.weight"].clone()
    save_file(tensors, source / WEIGHTS, metadata={"format": "pt"})
    (source / CONFIG).write_text((path / CONFIG).read_text())
    peft = convert_lora(source, tmp_path / "peft", "peft_target_parameters", progress=False)
    assert load_file(peft / WEIGHTS)[f"{EXPERTS.format(0)}.base_layer.lora_A.weight"].shape == (E * R, 32)
    assert "rank_pattern" not in json.loads((peft / CONFIG).read_text()) or not any(
        "gate_up" in k for k in json.loads((peft / CONFIG).read_text())["rank_pattern"]
    )
    back = convert_lora(peft, tmp_path / "back", "fused", progress=False)
    # gate and up still share one A: the fused copy holds it once, as LoRA on gate_up_proj
    assert f"{EXPERTS.format(0)}.gate_up_proj.lora_A.weight" in load_file(back / WEIGHTS)
    assert tensor_hashes(source) == tensor_hashes(peft) == tensor_hashes(back)
    expected = _logits(PeftModel.from_pretrained(_base("moefuse"), source))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(_base("grouped_mm"), peft)), expected)


@current_orientation
def test_gate_up_proj_adapter_converts_exactly_to_every_layout(tmp_path):
    """moefuse's LoRA on gate_up_proj (one A for gate and up) is read as gate and up apart with that A: its
    per-expert and fused copies load in moefuse, its PEFT target_parameters copy (rank r, as trained) in PEFT on
    Transformers' experts, all with its logits."""
    config = LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=["q_proj", "gate_up_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.experts.gate_up_proj": 3},
    )
    model = get_peft_model(_base("moefuse"), config)
    _randomize_lora_(model, seed=3)
    path = tmp_path / "gate_up"
    model.save_pretrained(path)
    logits = _logits(model)
    assert describe(path)["layout"] == "fused"
    per_expert = convert_lora(path, tmp_path / "per_expert", "per_expert", progress=False)
    tensors = load_file(per_expert / WEIGHTS)
    stacked = load_file(path / WEIGHTS)[f"{EXPERTS.format(1)}.gate_up_proj.lora_B.weight"]
    assert torch.equal(
        tensors[f"{EXPERTS.format(1)}.5.gate_proj.lora_A.weight"],
        tensors[f"{EXPERTS.format(1)}.5.up_proj.lora_A.weight"],
    )
    assert torch.equal(tensors[f"{EXPERTS.format(1)}.5.up_proj.lora_B.weight"], stacked[5, 16:])
    assert (
        json.loads((per_expert / CONFIG).read_text())["rank_pattern"]["layers.1.mlp.experts.7.up_proj"] == 3
    )
    # back in the fused layout, gate and up (one A) are together again: the adapter as it was saved
    fused = convert_lora(per_expert, tmp_path / "fused", "fused", progress=False)
    fused_config = json.loads((fused / CONFIG).read_text())
    assert fused_config["target_modules"] == ["down_proj", "gate_up_proj", "q_proj"]
    assert fused_config["rank_pattern"] == {"layers.1.mlp.experts.gate_up_proj": 3}
    assert _same_tensors(path, fused)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(_base("moefuse"), fused)), logits, rtol=1e-5, atol=1e-5
    )
    peft = convert_lora(path, tmp_path / "peft", "peft_target_parameters", progress=False)
    assert load_file(peft / WEIGHTS)[f"{EXPERTS.format(1)}.base_layer.lora_A.weight"].shape == (E * 3, 32)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(_base("grouped_mm"), peft)), logits, rtol=1e-5, atol=1e-5
    )
    assert tensor_hashes(path) == tensor_hashes(per_expert) == tensor_hashes(peft)


def _refused(source: Path, target: Path, match: str, layout: str = "per_expert") -> None:
    before, siblings = load_file(source / WEIGHTS), set(target.parent.iterdir())
    with pytest.raises(CheckpointError, match=match) as info:
        convert_lora(source, target, layout, progress=False)
    assert "\n" not in str(info.value)
    assert (
        _same_tensors_dict(before, load_file(source / WEIGHTS)) and set(target.parent.iterdir()) == siblings
    )


def test_routed_experts_targets_are_named_per_expert_and_a_pattern_naming_gate_up_proj_is_refused(tmp_path):
    """moefuse train's targets name the routed experts (experts.gate_up_proj): a per-expert module is
    experts.<e>.gate_proj, so the per-expert copy names gate_proj and up_proj. A target_modules pattern (a string)
    that names gate_up_proj cannot be rewritten: refused in one line, nothing written."""
    config = LoraConfig(
        r=R, lora_alpha=8, target_modules=["q_proj", "experts.gate_up_proj", "experts.down_proj"]
    )
    model = get_peft_model(_base("moefuse"), config)
    _randomize_lora_(model, seed=4)
    path = tmp_path / "routed"
    model.save_pretrained(path)
    per_expert = convert_lora(path, tmp_path / "per_expert", "per_expert", progress=False)
    assert json.loads((per_expert / CONFIG).read_text())["target_modules"] == [
        "down_proj", "gate_proj", "q_proj", "up_proj",
    ]  # fmt: skip
    pattern = tmp_path / "pattern"
    pattern.mkdir()
    (pattern / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
    written = json.loads((path / CONFIG).read_text())
    (pattern / CONFIG).write_text(
        json.dumps({**written, "target_modules": r".*\.(q_proj|experts\.gate_up_proj)"})
    )
    _refused(pattern, tmp_path / "out", "target_modules is the pattern .* which names gate_up_proj")


def _same_tensors_dict(x: dict, y: dict) -> bool:
    """Same names (a block's tensors may come in another order), dtypes, shapes and bits."""
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


@current_orientation
def test_legacy_orientation_and_bad_shapes_are_refused(peft_adapter, tmp_path):
    path, _ = peft_adapter
    tensors = load_file(path / WEIGHTS)
    config = json.loads((path / CONFIG).read_text())
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for layer in (0, 1):  # PEFT < 0.19.1 on [E, out, in] experts: A [E*r, out], B [in, E*r]
        experts, r = EXPERTS.format(layer), (R, 2)[layer]
        tensors[f"{experts}.base_layer.lora_A.weight"] = torch.zeros(E * R, 32)
        tensors[f"{experts}.base_layer.lora_B.weight"] = torch.zeros(32, E * R)
        tensors[f"{experts}.lora_A.weight"] = torch.zeros(E * r, 32)
        tensors[f"{experts}.lora_B.weight"] = torch.zeros(16, E * r)
    save_file(tensors, legacy / WEIGHTS, metadata={"format": "pt"})
    (legacy / CONFIG).write_text(json.dumps({**config, "peft_version": "0.18.1"}))
    _refused(legacy, tmp_path / "out", r"orientation PEFT < 0\.19\.1 wrote .*peft_version 0\.18\.1")

    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(path / WEIGHTS)
    tensors[f"{EXPERTS.format(0)}.lora_A.weight"] = torch.zeros(E * R + 1, 16)
    save_file(tensors, bad / WEIGHTS, metadata={"format": "pt"})
    (bad / CONFIG).write_text(json.dumps(config))
    _refused(
        bad,
        tmp_path / "out",
        r"layers\.0\.mlp: down_proj's lora_A \[33, 16\] and lora_B \[32, 32\] are not \[E\*r, in\] and \[out, E\*r\] for the rank r=4",
    )


@current_orientation
def test_cli_converts_to_and_from_peft_target_parameters(moefuse_adapter, tmp_path, capsys):
    path, _ = moefuse_adapter
    assert main(["convert", "--to", "peft_target_parameters", str(path), str(tmp_path / "a"), "--quiet"]) == 0
    assert "(peft_target_parameters layout)" in capsys.readouterr().out
    assert main(["convert", "to-unfused", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "peft_target_parameters" in out and "lora_A [E*r, in], lora_B [out, E*r] (PEFT >= 0.19.1" in out


@pytest.mark.skipif(CURRENT_PEFT, reason="this PEFT saves the orientation moefuse reads")
def test_older_peft_orientation_is_refused(peft_adapter, tmp_path):
    with pytest.raises(CheckpointError, match=r"orientation PEFT < 0\.19\.1 wrote"):
        convert_lora(peft_adapter[0], tmp_path / "out", layout="per_expert")
    assert not (tmp_path / "out").exists()
