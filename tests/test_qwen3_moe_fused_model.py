"""Qwen3MoeFusedForCausalLM: moefuse experts by default, every known checkpoint layout loads, generate works."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeForCausalLM

from conftest import randomize_, tiny_config
from moefuse import Qwen3MoeFusedForCausalLM, Qwen3MoeFusedModel
from moefuse.convert.layouts import Checkpoint, CheckpointError, detect_layout


def _stack_experts(sd, num_experts, fmt):
    """Per-expert tensors → [E, ...] stacks named by ``fmt(prefix, proj)``."""
    out, stacks = {}, {}
    for key, t in sd.items():
        if ".mlp.experts." in key:
            prefix, rest = key.split(".experts.")
            e, proj, _ = rest.split(".")
            stacks.setdefault(fmt(prefix, proj), [None] * num_experts)[int(e)] = t
        else:
            out[key] = t
    out.update({k: torch.stack(v) for k, v in stacks.items()})
    return out


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE saved by Transformers (per-expert Hub layout), its input and reference logits."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hub")
    model = randomize_(Qwen3MoeForCausalLM(tiny_config("qwen3_moe", num_experts=8))).eval()
    model.save_pretrained(path)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    return path, ids, logits


def _write_layout(hub, dest, layout):
    dest.mkdir()
    shutil.copy(hub / "config.json", dest / "config.json")
    sd = load_file(hub / "model.safetensors")
    fmt = {
        "veomni": lambda p, proj: f"{p}.experts.{proj}",
        "qwen3_moe_fused": lambda p, proj: f"{p}.{proj}.weight",
        "transformers": lambda p, proj: f"{p}.experts.{proj}",
    }[layout]
    sd = _stack_experts(sd, 8, fmt)
    if layout == "transformers":
        for key in [k for k in sd if k.endswith("experts.gate_proj")]:
            prefix = key[: -len("gate_proj")]
            sd[prefix + "gate_up_proj"] = torch.cat([sd.pop(key), sd.pop(prefix + "up_proj")], dim=1)
    # split over two shards with an index, as large checkpoints are
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, dest / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("layout", ["per_expert", "transformers", "qwen3_moe_fused", "veomni"])
def test_loads_every_layout(hub_checkpoint, tmp_path, layout):
    hub, ids, ref = hub_checkpoint
    path = hub if layout == "per_expert" else _write_layout(hub, tmp_path / layout, layout)
    assert detect_layout(Checkpoint.open(path).shapes) == layout
    model, info = Qwen3MoeFusedForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config._experts_implementation == "moefuse"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_base_model_class(hub_checkpoint, tmp_path):
    hub, ids, _ = hub_checkpoint
    path = _write_layout(hub, tmp_path / "veomni", "veomni")
    model = Qwen3MoeFusedModel.from_pretrained(path)
    assert model.config._experts_implementation == "moefuse"
    assert model(ids).last_hidden_state.shape == (2, 7, 32)


def test_generate_and_save_round_trip(hub_checkpoint, tmp_path):
    hub, ids, _ = hub_checkpoint
    model = Qwen3MoeFusedForCausalLM.from_pretrained(_write_layout(hub, tmp_path / "seed", "qwen3_moe_fused"))
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    reference = Qwen3MoeForCausalLM.from_pretrained(hub, experts_implementation="eager")
    assert torch.equal(out, reference.generate(ids[:1], max_new_tokens=5, do_sample=False))
    model.save_pretrained(tmp_path / "saved")
    # a plain Qwen3-MoE checkpoint in the Hub layout: any engine can serve it
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert detect_layout(Checkpoint.open(tmp_path / "saved").shapes) == "per_expert"


def test_constructed_from_config_uses_moefuse():
    model = Qwen3MoeFusedForCausalLM(tiny_config("qwen3_moe"))
    assert model.config._experts_implementation == "moefuse"
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    assert len(norms) == 4 * model.config.num_hidden_layers + 1  # input, post-attention, q and k; final
    assert all("forward" in vars(m) for m in norms)  # moefuse's rms_norm


def test_unreadable_checkpoints_fail_clearly(hub_checkpoint, tmp_path):
    hub, _, _ = hub_checkpoint
    bad = _write_layout(hub, tmp_path / "bad", "veomni")
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing shard"):
        Qwen3MoeFusedForCausalLM.from_pretrained(bad)
    trunc = _write_layout(hub, tmp_path / "trunc", "veomni")
    shard = trunc / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: unreadable"):
        Qwen3MoeFusedForCausalLM.from_pretrained(trunc)


@pytest.mark.parametrize("cls", [Qwen3MoeFusedForCausalLM, Qwen3MoeFusedModel])
def test_switches_experts_implementation(cls):
    """Constructing with another implementation and switching back and forth both work and agree."""
    config = tiny_config("qwen3_moe", num_experts=8)
    config._experts_implementation = "grouped_mm"
    model = randomize_(cls(config)).eval()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        reference = model(input_ids=ids)[0]
        model.set_experts_implementation("moefuse")
        torch.testing.assert_close(model(input_ids=ids)[0], reference, rtol=1e-4, atol=1e-5)
        model.set_experts_implementation("grouped_mm")
        torch.testing.assert_close(model(input_ids=ids)[0], reference, rtol=1e-4, atol=1e-5)
