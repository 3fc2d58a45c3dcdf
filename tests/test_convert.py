"""Model checkpoint conversion between expert layouts: bit-exact round trips, loadable results, clear refusals."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeForCausalLM

import moefuse
from conftest import randomize_, tiny_config
from moefuse.cli import main
from moefuse.convert import Checkpoint, CheckpointError, TransformersLayoutView, convert_model, detect_layout
from moefuse.convert.inspect import compare, describe, tensor_hashes

FUSED = ("transformers", "qwen3_moe_fused", "veomni")
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
_HUB_EXPERT = re.compile(r"^(.+\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # stands in for tokenizer files
    (path / "chat_template.jinja").write_text("{{ messages }}\n")
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors alone."""
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _files_digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in path.rglob("*")}


def _reference_layout(hub: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The Hub state dict ``hub`` in a fused ``layout``, built with torch.stack / torch.cat."""
    out, stacks = {}, {}
    for key, tensor in hub.items():
        m = _HUB_EXPERT.match(key)
        if m is None:
            out[key] = tensor
        else:
            stacks.setdefault((m[1], m[3]), {})[int(m[2])] = tensor
    for (prefix, proj), by_expert in stacks.items():
        stack = torch.stack([by_expert[e] for e in range(len(by_expert))])
        out[
            f"{prefix}.{proj}_proj.weight" if layout == "qwen3_moe_fused" else f"{prefix}.experts.{proj}_proj"
        ] = stack
    if layout == "transformers":
        for prefix in {p for p, _ in stacks}:
            gate, up = out.pop(f"{prefix}.experts.gate_proj"), out.pop(f"{prefix}.experts.up_proj")
            out[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
    return out


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A tiny Qwen3-MoE in the per-expert Hub layout, sharded, and its logits on moefuse experts."""
    model = randomize_(Qwen3MoeForCausalLM(tiny_config("qwen3_moe", num_experts=8))).eval()
    path = _save(model, tmp_path_factory.mktemp("hub") / "model", max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    with torch.no_grad():
        logits = moefuse.Qwen3MoeFusedForCausalLM.from_pretrained(path).eval()(IDS).logits
    return path, logits


@pytest.mark.parametrize("layout", FUSED)
def test_round_trip_is_bit_exact_and_loads(hub, tmp_path, layout):
    path, logits = hub
    before = _files_digest(path)
    fused = moefuse.convert_model_to_fused(path, tmp_path / "fused", layout=layout, progress=False)
    back = moefuse.convert_model_to_unfused(fused, tmp_path / "back", progress=False)
    assert _files_digest(path) == before  # the input is never written to

    # Read back with safetensors alone: the fused tensors are the stacks, the round trip gives the input.
    _assert_same_tensors(_load(fused), _reference_layout(_load(path), layout))
    _assert_same_tensors(_load(back), _load(path))
    assert tensor_hashes(back) == tensor_hashes(path) == tensor_hashes(fused)
    assert describe(fused)["layout"] == layout and describe(back)["layout"] == "per_expert"

    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (fused / name).read_bytes() == (path / name).read_bytes()
    architectures = json.loads((fused / "config.json").read_text())["architectures"]
    assert architectures == [
        "Qwen3MoeForCausalLM" if layout == "transformers" else "Qwen3MoeFusedForCausalLM"
    ]
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]

    with torch.no_grad():
        models = [moefuse.Qwen3MoeFusedForCausalLM.from_pretrained(fused)]
        models.append(AutoModelForCausalLM.from_pretrained(back, experts_implementation="moefuse"))
        if layout == "transformers":  # Transformers reads its own fused layout as it is
            models.append(AutoModelForCausalLM.from_pretrained(fused, experts_implementation="moefuse"))
        for model in models:
            torch.testing.assert_close(model.eval()(IDS).logits, logits)


@pytest.mark.parametrize("layout", ("per_expert", *FUSED))
def test_transformers_view_reads_any_layout_and_expert_ranges(hub, tmp_path, layout):
    path = (
        hub[0] if layout == "per_expert" else convert_model(hub[0], tmp_path / layout, layout, progress=False)
    )
    ckpt = Checkpoint.open(path)
    view = TransformersLayoutView(ckpt, detect_layout(ckpt.shapes))
    want = _reference_layout(_load(hub[0]), "transformers")
    _assert_same_tensors(dict(view.items()), want)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert torch.equal(view.read(name, range(2, 5)), want[name][2:5])  # one rank's experts, read alone


def test_any_layout_to_any_layout(hub, tmp_path):
    path, _ = hub
    current = path
    for step, layout in enumerate(("veomni", "transformers", "qwen3_moe_fused", "veomni", "per_expert")):
        current = convert_model(
            current, tmp_path / f"{step}-{layout}", layout, progress=False, max_shard_size="50KB"
        )
        assert describe(current)["layout"] == layout
    assert compare(path, current) == []
    _assert_same_tensors(_load(current), _load(path))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_other_families_round_trip(tmp_path, family):
    model = randomize_(AutoModelForCausalLM.from_config(tiny_config(family, num_experts=4))).eval()
    path = _save(model, tmp_path / "in")
    fused = moefuse.convert_model_to_fused(path, tmp_path / "fused", progress=False)
    assert describe(fused)["layout"] == "transformers"
    _assert_same_tensors(_load(fused), _reference_layout(_load(path), "transformers"))
    back = moefuse.convert_model_to_unfused(fused, tmp_path / "back", progress=False)
    _assert_same_tensors(_load(back), _load(path))
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(fused).eval()
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_verify_sees_a_changed_tensor(hub, tmp_path):
    path, _ = hub
    fused = convert_model(path, tmp_path / "fused", "veomni", progress=False)
    tensors = _load(fused)
    name = next(k for k in tensors if k.endswith("layers.1.mlp.experts.up_proj"))
    tensors[name][3, 0, 0] += 1
    shard = fused / "model.safetensors"
    save_file(tensors, shard, metadata={"format": "pt"})
    assert [d.name for d in compare(path, fused)] == ["model.layers.1.mlp.experts.3.up_proj.weight"]


def test_optimizer_state_is_left_behind_with_a_warning(hub, tmp_path, caplog):
    path = Path(shutil.copytree(hub[0], tmp_path / "checkpoint-10"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"last_epoch": 10}, path / "scheduler.pt")
    with caplog.at_level(logging.WARNING, logger="moefuse.convert"):
        out = convert_model(path, tmp_path / "out", "transformers", progress=False)
    assert (out / "scheduler.pt").exists() and not (out / "optimizer.pt").exists()
    assert "not copied: optimizer.pt" in caplog.text and "convert_optimizer_state" in caplog.text


# --- refusals: one line naming the file and the fix, input untouched, nothing left behind -----------------


def _refused(source: Path, target: Path, match: str, layout: str = "transformers", **kwargs) -> None:
    before = _files_digest(source)
    siblings = set(target.parent.iterdir())
    with pytest.raises(CheckpointError, match=match) as info:
        convert_model(source, target, layout, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert _files_digest(source) == before
    assert set(target.parent.iterdir()) == siblings  # no staging folder left behind


@pytest.fixture
def hub_copy(hub, tmp_path):
    return Path(shutil.copytree(hub[0], tmp_path / "copy"))


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def test_index_naming_a_missing_shard(hub_copy, tmp_path):
    shard = _shards(hub_copy)[1]
    shard.unlink()
    _refused(
        hub_copy,
        tmp_path / "out",
        rf"{shard.name}: missing shard named by model\.safetensors\.index\.json; download",
    )


def test_truncated_shard(hub_copy, tmp_path):
    shard = _shards(hub_copy)[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    _refused(hub_copy, tmp_path / "out", rf"{shard.name}: unreadable safetensors file .*download it again")


def test_index_naming_a_tensor_no_shard_holds(hub_copy, tmp_path):
    index = json.loads((hub_copy / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.extra.weight"] = shard
    (hub_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(
        hub_copy,
        tmp_path / "out",
        rf"{shard}: has no model\.extra\.weight, which model\.safetensors\.index\.json names",
    )


def test_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    _refused(tmp_path / "empty", tmp_path / "out", r"empty: no \*\.safetensors files")


def test_missing_config(hub_copy, tmp_path):
    (hub_copy / "config.json").unlink()
    _refused(hub_copy, tmp_path / "out", r"copy/config\.json: missing")


def test_dense_model_is_refused(tmp_path):
    fields = Qwen3Config().to_dict()
    config = Qwen3Config(**{k: v for k, v in tiny_config("qwen3_moe").to_dict().items() if k in fields})
    path = _save(AutoModelForCausalLM.from_config(config), tmp_path / "dense")
    _refused(path, tmp_path / "out", r"dense: a qwen3 model has no experts; moefuse converts MoE checkpoints")


def test_experts_on_the_decoder_layer_are_read_and_families_loaded_stacked_stay_stacked(tmp_path, capsys):
    """Gemma 4 keeps its experts on the decoder layer (``model.layers.N.experts.gate_up_proj``): read as the
    transformers layout, converted to another fused layout and back bit for bit. Transformers loads Gemma 4's
    experts stacked only (no per-expert rule in its conversion mapping), so a per-expert copy is refused."""
    model = randomize_(AutoModelForCausalLM.from_config(tiny_config("gemma4_text", num_experts=4))).eval()
    path = _save(model, tmp_path / "in")
    assert describe(path)["layout"] == "transformers"
    veomni = convert_model(path, tmp_path / "veomni", "veomni", progress=False)
    assert any(k.endswith("layers.0.experts.gate_proj") for k in _load(veomni))
    back = moefuse.convert_model_to_fused(veomni, tmp_path / "back", progress=False)
    _assert_same_tensors(_load(back), _load(path))
    _refused(path, tmp_path / "out", r"loads gemma4_text's experts stacked only", layout="per_expert")
    _refused(path, tmp_path / "out", r"experts sit outside one; convert to", layout="qwen3_moe_fused")
    assert (
        main(["convert", "to-fused", str(path), str(tmp_path / "cli"), "--layout", "veomni", "--quiet"]) == 0
    )
    assert "read as is by" not in capsys.readouterr().out  # engines of adapter formats, not of models


@pytest.fixture(scope="module")
def mixtral_hub(tmp_path_factory):
    """A tiny Mixtral as Transformers 5 saves it: block_sparse_moe.experts.{e}.w1 / w3 / w2, the router beside."""
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_experts=4))
    randomize_(model)
    return _save(model, tmp_path_factory.mktemp("mixtral") / "hub"), model


def test_mixtral_checkpoints_convert_both_ways_bit_for_bit(mixtral_hub, tmp_path):
    hub, model = mixtral_hub
    original = _load(hub)
    assert detect_layout({k: tuple(v.shape) for k, v in original.items()}) == "mixtral"
    fused = convert_model(hub, tmp_path / "fused", "transformers", progress=False)
    tensors = _load(fused)
    # Transformers 5's in-memory names: the experts stacked under mlp.experts, the router moved to mlp.gate
    w1 = [original[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)]
    w3 = [original[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"] for e in range(4)]
    gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(w1, w3, strict=True)])
    assert torch.equal(tensors["model.layers.0.mlp.experts.gate_up_proj"], gate_up)
    assert torch.equal(
        tensors["model.layers.0.mlp.gate.weight"], original["model.layers.0.block_sparse_moe.gate.weight"]
    )
    assert not any("block_sparse_moe" in name for name in tensors)
    loaded = AutoModelForCausalLM.from_pretrained(fused)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)

    back = convert_model(fused, tmp_path / "back", "mixtral", progress=False)
    again = _load(back)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_an_incomplete_mixtral_checkpoint_names_the_missing_weight(tmp_path):
    path = tmp_path / "mixtral"
    path.mkdir()
    tiny_config("mixtral", num_experts=4).save_pretrained(path)
    tensors = {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(16, 32)
        for e in range(4)
        for w in ("w1", "w3")
    }
    save_file(tensors, path / "model.safetensors")
    _refused(path, tmp_path / "out", r"has no model\.layers\.0\.block_sparse_moe\.experts\.0\.w2\.weight")


def test_transposed_experts_are_refused(tmp_path):
    # GPT-OSS-like fused experts: gate_up_proj [E, H, 2I], down_proj [E, I, H].
    path = tmp_path / "transposed"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "num_local_experts": 4}))
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 32, 32),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(4, 16, 32),
        },
        path / "model.safetensors",
    )
    _refused(
        path,
        tmp_path / "out",
        r"not \[I, H\], \[I, H\], \[H, I\]; transposed or interleaved experts .* not supported",
    )


def test_missing_expert_is_refused(hub_copy, tmp_path):
    missing = "model.layers.1.mlp.experts.5.up_proj.weight"
    index = json.loads((hub_copy / "model.safetensors.index.json").read_text())
    shard = hub_copy / index["weight_map"].pop(missing)
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    (hub_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(
        hub_copy,
        tmp_path / "out",
        r"copy: mismatched expert counts in model\.layers\.1\.mlp \(gate_proj: 8 experts, up_proj: 7 experts "
        r"\(missing \[5\]\), down_proj: 8 experts\); every projection needs experts 0\.\.7",
    )


def test_config_expert_count_mismatch(hub_copy, tmp_path):
    config = json.loads((hub_copy / "config.json").read_text())
    (hub_copy / "config.json").write_text(json.dumps({**config, "num_experts": 16}))
    _refused(
        hub_copy,
        tmp_path / "out",
        r"config\.json: mismatched expert counts: it says 16 experts, model\.layers\.0\.mlp holds 8",
    )


def test_mixed_layouts_are_refused(hub_copy, tmp_path):
    shard = _shards(hub_copy)[0]
    tensors = load_file(shard)
    tensors["model.layers.9.mlp.experts.gate_up_proj"] = torch.zeros(8, 32, 32)
    save_file(tensors, shard, metadata={"format": "pt"})
    (hub_copy / "model.safetensors.index.json").unlink()
    _refused(hub_copy, tmp_path / "out", r"copy: mixes expert layouts per_expert and transformers")


def test_existing_output_needs_overwrite(hub, tmp_path):
    path, _ = hub
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(path, out, r"out: exists and is not empty; choose another folder or pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    convert_model(path, out, "veomni", overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and describe(out)["layout"] == "veomni"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_output_overlapping_input_is_refused(hub_copy):
    _refused(hub_copy, hub_copy / "fused", r"overlaps the input", overwrite=True)
    _refused(hub_copy, hub_copy, r"overlaps the input", overwrite=True)
    _refused(hub_copy, hub_copy.parent, r"overlaps the input", overwrite=True)


# --- command line -------------------------------------------------------------------------------------


def test_cli_convert_inspect_verify(hub, tmp_path, capsys):
    path, _ = hub
    assert main(["convert", "to-fused", str(path), str(tmp_path / "a"), "--layout", "veomni", "--quiet"]) == 0
    assert (
        main(["convert", "--to", "qwen3_moe_fused", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]) == 0
    )
    assert main(["convert", "to-unfused", str(tmp_path / "b"), str(tmp_path / "c"), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", "to-fused", str(path), str(tmp_path / "c"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moefuse convert: ") and "pass --overwrite" in err and err.count("\n") == 1
    assert main(["convert", "to-fused", str(path), str(tmp_path / "c"), "--quiet", "--overwrite"]) == 0
    assert describe(tmp_path / "c")["layout"] == "transformers"
    assert main(["convert", str(path), str(tmp_path / "d")]) == 2  # no direction
    assert main(["convert", "to-unfused", str(path), str(tmp_path / "d"), "--layout", "veomni"]) == 2
    assert not (tmp_path / "d").exists()

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    for row in (
        r"layout +qwen3_moe_fused",
        r"model family +qwen3_moe",
        r"MoE blocks +2",
        r"experts per block +8",
    ):
        assert re.search(row, out), row
    assert main(["inspect", "--verify", str(path), str(tmp_path / "b")]) == 0
    assert "identical tensors up to layout" in capsys.readouterr().out
    other = _save(
        randomize_(Qwen3MoeForCausalLM(tiny_config("qwen3_moe", num_experts=8)), seed=1), tmp_path / "o"
    )
    assert main(["inspect", "--verify", str(path), str(other)]) == 1
    assert "tensors differ" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_quantized_experts_are_refused(hub_copy, tmp_path):
    # FP8 checkpoints (DeepSeek-V3 style) keep a scale beside each expert weight.
    shard = _shards(hub_copy)[0]
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("experts.0.gate_proj.weight"))
    tensors[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    (hub_copy / "model.safetensors.index.json").unlink()
    _refused(
        hub_copy,
        tmp_path / "out",
        r"experts\.0\.gate_proj\.weight_scale_inv belongs to the experts but is no gate/up/down weight",
    )
