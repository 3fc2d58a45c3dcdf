"""Optimizer state conversion: AdamW and bitsandbytes 8-bit states follow the experts between layouts, exactly.

The check is behavioural: after conversion, one more optimizer step on the per-expert parameters (same
gradients) gives bit for bit what the step on the fused parameters gives.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moefuse.convert import CheckpointError, convert_optimizer_state, optimizer_param_names
from test_convert_lora import IDS, PerExpertExperts, _base

_PER_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _fused_part(fused: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The slice of a Transformers-layout tensor (``experts.gate_up_proj`` / ``down_proj``) that per-expert
    tensor ``name`` is."""
    m = _PER_EXPERT.match(name)
    if m is None:
        return fused[name]
    prefix, e, proj = m[1], int(m[2]), m[3]
    if proj == "down":
        return fused[f"{prefix}.experts.down_proj"][e]
    gate_up = fused[f"{prefix}.experts.gate_up_proj"][e]
    return gate_up.chunk(2)[0 if proj == "gate" else 1]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_adamw_state_moves_with_the_experts_and_steps_the_same(tmp_path):
    model = _base("grouped_mm").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    _train(model, optimizer)
    state = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name

    converted = convert_optimizer_state(state, "per_expert")
    reference = _base("eager")
    reference.load_state_dict(model.state_dict())
    for layer in reference.model.layers:
        layer.mlp.experts = PerExpertExperts(layer.mlp.experts)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    set_optimizer_state_dict(reference, reference_optimizer, converted)
    name = "model.layers.1.mlp.experts.6.up_proj.weight"
    exp_avg = state["state"]["model.layers.1.mlp.experts.gate_up_proj"]["exp_avg"]
    assert torch.equal(converted["state"][name]["exp_avg"], exp_avg[6, 16:])

    # One more step with the same gradients: bit-identical parameters.
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in reference.named_parameters():
        p.grad = _fused_part(grads, n).clone()
    optimizer.step()
    reference_optimizer.step()
    fused = dict(model.named_parameters())
    for n, p in reference.named_parameters():
        assert torch.equal(p, _fused_part(fused, n)), n

    assert _equal(convert_optimizer_state(converted, "transformers"), state)
    veomni = convert_optimizer_state(state, "veomni")
    assert _equal(convert_optimizer_state(veomni, "per_expert"), converted)


def _flat(state: dict) -> dict:
    """A bitsandbytes >= 0.50 state dict as older releases write it: the 8-bit state beside ``step``."""
    nested = "__bnb_optimizer_quant_state__"
    flat = {
        k: {**{kk: vv for kk, vv in v.items() if kk != nested}, **v[nested]}
        for k, v in state["state"].items()
    }
    return {**state, "state": flat}


@pytest.mark.parametrize("optimizer_class", ["AdamW", "AdamW8bit", "AdamW8bit-flat"])
def test_index_keyed_state_converts_for_any_parameter_order(optimizer_class):
    if optimizer_class.startswith("AdamW8bit"):
        bnb = pytest.importorskip("bitsandbytes")
        make = bnb.optim.AdamW8bit
    else:
        make = lambda params, lr: torch.optim.AdamW(params, lr=lr, foreach=False)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    experts, inter, hidden = 4, 32, 64  # 2048 values per expert matrix: whole blocks of 256
    fused = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(experts, 2 * inter, hidden, generator=g),
        "model.layers.0.mlp.experts.down_proj": torch.randn(experts, hidden, inter, generator=g),
        "model.norm.weight": torch.randn(hidden, generator=g),
    }
    params = {n: nn.Parameter(t) for n, t in fused.items()}
    optimizer = make(list(params.values()), lr=1e-2)
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    state = optimizer.state_dict()
    if optimizer_class.startswith("AdamW8bit"):  # bitsandbytes >= 0.50 nests its 8-bit state one level down
        state = _flat(state) if optimizer_class == "AdamW8bit-flat" else state
        quantized = state["state"][0].get("__bnb_optimizer_quant_state__", state["state"][0])
        assert quantized["state1"].dtype == torch.uint8
        assert quantized["absmax1"].shape == (
            experts * 2 * inter * hidden // 256,
        )  # one scale per 256 values

    names = list(params)
    target = [
        f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
        for e in range(experts)
        for p in ("gate", "up", "down")
    ]
    target.append("model.norm.weight")
    random.Random(0).shuffle(target)
    converted = convert_optimizer_state(state, "per_expert", param_names=names, target_param_names=target)
    back = convert_optimizer_state(converted, "transformers", param_names=target, target_param_names=names)
    assert _equal(back, state)
    per_expert = [nn.Parameter(_fused_part(params, n).detach().clone()) for n in target]
    per_expert_optimizer = make(per_expert, lr=1e-2)
    per_expert_optimizer.load_state_dict(converted)

    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    grads = {n: p.grad for n, p in params.items()}
    for n, p in zip(target, per_expert, strict=True):
        p.grad = _fused_part(grads, n).clone()
    optimizer.step()
    per_expert_optimizer.step()
    for n, p in zip(target, per_expert, strict=True):
        assert torch.equal(p, _fused_part(params, n)), n


def test_lora_state_moves_with_the_factors():
    model = get_peft_model(
        _base(), LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model.train(), optimizer, steps=1)
    names = optimizer_param_names(model, optimizer)
    assert "base_model.model.model.layers.0.mlp.experts.gate_proj.lora_A.default.weight" in names
    state = optimizer.state_dict()

    # With no target order given, each block's per-expert factors take the place of its fused ones, expert by
    # expert (as PEFT orders a Transformers 4 model's): gate A, gate B, up A, up B, down A, down B.
    per_expert_names = _per_expert_lora_names(names)
    converted = convert_optimizer_state(state, "per_expert", param_names=names)
    assert [len(group["params"]) for group in converted["param_groups"]] == [len(per_expert_names)]
    fused = "base_model.model.model.layers.1.mlp.experts.down_proj.lora_B.default.weight"
    index = per_expert_names.index(
        "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.default.weight"
    )
    assert torch.equal(converted["state"][index]["exp_avg"], state["state"][names.index(fused)]["exp_avg"][3])
    back = convert_optimizer_state(converted, "fused", param_names=per_expert_names)
    assert _equal(back, state)


def _per_expert_lora_names(fused_names: list[str]) -> list[str]:
    out = []
    for name in fused_names:
        m = re.match(r"^(.+\.experts)\.(gate_proj\.lora_A)\..+$", name)
        if m:  # the first factor of a block: all its per-expert factors, expert by expert
            out += [
                f"{m[1]}.{e}.{proj}.{factor}.default.weight"
                for e in range(8)
                for proj in ("gate_proj", "up_proj", "down_proj")
                for factor in ("lora_A", "lora_B")
            ]
        elif ".mlp.experts." not in name:
            out.append(name)
    return out


def test_refusals_say_why():
    model = _base("grouped_mm").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=1)
    with pytest.raises(ValueError, match="needs param_names"):
        convert_optimizer_state(optimizer.state_dict(), "per_expert")
    state = convert_optimizer_state(get_optimizer_state_dict(model, optimizer), "per_expert")

    lagging = {**state, "state": dict(state["state"])}
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    lagging["state"][name] = {**state["state"][name], "step": torch.tensor(0.0)}
    with pytest.raises(
        CheckpointError, match=rf"step is 1\.0 for .*experts\.0\.gate_proj\.weight but 0\.0 for {name}"
    ):
        convert_optimizer_state(lagging, "transformers")
    del lagging["state"][name]
    with pytest.raises(CheckpointError, match=rf"{name} has no state \(the optimizer never updated it"):
        convert_optimizer_state(lagging, "transformers")


def test_8bit_blocks_straddling_experts_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    stack = nn.Parameter(torch.randn(64, 10, 10))  # gate and up of 50 values: blocks of 256 straddle experts
    down = nn.Parameter(torch.randn(64, 10, 5))
    optimizer = bnb.optim.AdamW8bit([stack, down], lr=1e-2)
    for p in (stack, down):
        p.grad = torch.randn_like(p)
    optimizer.step()
    names = ["layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"]
    with pytest.raises(CheckpointError, match="bitsandbytes blocks of 256 values straddle experts"):
        convert_optimizer_state(optimizer.state_dict(), "per_expert", param_names=[f"m.{n}" for n in names])
