"""LoRA on moefuse experts through PEFT, against plain PEFT LoRA on a per-expert (nn.Linear) copy of the model."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import moefuse.lora
from conftest import randomize_, tiny_config
from moefuse.lora import ExpertsLoraLayer

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


class PerExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act_fn):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertExperts(nn.Module):
    """The unfused reference: one MLP of nn.Linear per expert, the layout plain PEFT LoRA targets."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        self.experts = nn.ModuleList(PerExpertMLP(hidden, inter, fused.act_fn) for _ in range(num_experts))
        with torch.no_grad():
            for e, mlp in enumerate(self.experts):
                mlp.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                mlp.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                mlp.down_proj.weight.copy_(fused.down_proj[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, mlp in enumerate(self.experts):
            token, k = torch.where(top_k_index == e)
            if token.numel():
                out = out.index_add(0, token, mlp(hidden_states[token]) * top_k_weights[token, k, None])
        return out


class Plain(nn.Module):
    """Hides the model type from PEFT, so plain PEFT applies plain LoRA to the per-expert Linears."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids).logits


def _fused_model(family: str, seed: int = 0):
    config = tiny_config(family, num_experts=8, top_k=2)
    config._experts_implementation = "moefuse"
    return randomize_(AutoModelForCausalLM.from_config(config), seed=seed)


def _reference(model) -> nn.Module:
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        layer.mlp.experts = PerExpertExperts(layer.mlp.experts)
    return Plain(ref)


def _randomize_lora_(peft_model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(lora_[AB]\.\w+\.weight)$")


def _copy_lora_to_reference(fused_peft, ref_peft) -> dict[str, tuple[str, int | None]]:
    """Copy every LoRA tensor of the fused model into the reference; returns fused name -> (ref name, expert)."""
    ref_params = dict(ref_peft.named_parameters())
    mapping = {}
    for name, p in fused_peft.named_parameters():
        if "lora_" not in name:
            continue
        rest = name.removeprefix("base_model.model.")
        m = _EXPERT_KEY.match(rest)
        if m is None:
            mapping[name] = (f"base_model.model.inner.{rest}", None)
        else:
            for e in range(p.shape[0]):
                mapping[f"{name}#{e}"] = (f"base_model.model.inner.{m[1]}.experts.{e}.{m[2]}.{m[3]}", e)
    with torch.no_grad():
        fused_params = dict(fused_peft.named_parameters())
        for key, (ref_name, e) in mapping.items():
            src = fused_params[key.split("#")[0]]
            ref_params[ref_name].copy_(src if e is None else src[e])
    assert len({r for r, _ in mapping.values()}) == sum("lora_" in n for n in ref_params)
    return mapping


def _pair(family: str, **config_kwargs):
    model = _fused_model(family)
    ref = _reference(model)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, **config_kwargs)
    fused_peft = get_peft_model(model, LoraConfig(**config))
    ref_peft = get_peft_model(ref, LoraConfig(**config))
    _randomize_lora_(fused_peft)
    mapping = _copy_lora_to_reference(fused_peft, ref_peft)
    return fused_peft, ref_peft, mapping


# Keys of one layer's expert projection, for the fused model and the reference (experts.<e>. in between).
ONE_EXPERTS_GATE = r"layers\.1\.mlp\.experts\.(experts\.\d+\.)?gate_proj"
ONE_EXPERTS_UP = r"layers\.0\.mlp\.experts\.(experts\.\d+\.)?up_proj"
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "family,config_kwargs",
    [
        ("qwen3_moe", dict(rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})),
        ("mixtral", dict(use_rslora=True, rank_pattern={ONE_EXPERTS_GATE: 6})),
        ("olmoe", {}),
    ],
)
def test_outputs_and_lora_grads_match_per_expert_peft(family, config_kwargs):
    fused_peft, ref_peft, mapping = _pair(family, **config_kwargs)
    assert sum(isinstance(m, ExpertsLoraLayer) for m in fused_peft.modules()) == 2
    out = fused_peft(input_ids=IDS).logits
    ref = ref_peft(IDS)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    fused_params, ref_params = dict(fused_peft.named_parameters()), dict(ref_peft.named_parameters())
    for key, (ref_name, e) in mapping.items():
        got = fused_params[key.split("#")[0]].grad
        got = got if e is None else got[e]
        want = ref_params[ref_name].grad  # None for an expert that received no token
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-4, atol=1e-5)
    frozen = [n for n, p in fused_peft.named_parameters() if "lora_" not in n]
    assert frozen and all(fused_params[n].grad is None for n in frozen)  # no dW for the base weights


def test_rank_pattern_reaches_each_projection():
    fused_peft, _, _ = _pair("qwen3_moe", rank_pattern={"down_proj": 2, ONE_EXPERTS_UP: 5})
    experts = fused_peft.base_model.model.model.layers
    assert experts[0].mlp.experts.r["default"] == {"gate_proj": 4, "up_proj": 5, "down_proj": 2}
    assert experts[1].mlp.experts.r["default"] == {"gate_proj": 4, "up_proj": 4, "down_proj": 2}
    assert experts[0].mlp.experts.down_proj.lora_A["default"].weight.shape == (8, 2, 16)


def test_peft_does_not_call_the_expert_patterns_it_cannot_see_ignored():
    """PEFT >= 0.21 warns about rank/alpha_pattern keys that name no targeted module; the experts' projections are
    not modules, so its warning would call moefuse's expert keys "ignored" while they apply. It lists only the
    keys nothing applied."""
    import inspect
    import warnings

    from peft.tuners.tuners_utils import BaseTuner

    config = LoraConfig(
        r=4, target_modules=TARGETS, rank_pattern={"experts.down_proj": 2, "no_such_module": 3},
        alpha_pattern={"experts.gate_proj": 16},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(_fused_model("qwen3_moe"), config)
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert experts.r["default"]["down_proj"] == 2 and experts.lora_alpha["default"]["gate_proj"] == 16
    messages = [str(w.message) for w in caught if "did not match any targeted module" in str(w.message)]
    assert not any("experts." in m for m in messages), messages
    if "did not match any targeted module" in inspect.getsource(BaseTuner.inject_adapter):
        # PEFT 0.21: "... any targeted module and were ignored"; >= 0.22: "... module or parameter and were ignored"
        assert len(messages) == 1, messages
        assert messages[0].startswith("The following rank_pattern keys did not match any targeted module")
        assert messages[0].endswith("were ignored: ['no_such_module'].")
        # Experts on Transformers' own implementation get no moefuse LoRA, so moefuse leaves PEFT's word on their
        # keys standing.
        grouped = _fused_model("qwen3_moe")
        grouped.set_experts_implementation("grouped_mm")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_grouped = get_peft_model(
                grouped, LoraConfig(r=4, target_modules=TARGETS, rank_pattern={"experts.down_proj": 2})
            )
        warned = any(
            "did not match any targeted module" in str(w.message) and "'experts.down_proj'" in str(w.message)
            for w in caught
        )
        experts = peft_grouped.base_model.model.model.layers[0].mlp.experts
        down_a = experts.lora_A["default"].weight  # PEFT's target_parameters LoRA on down_proj: [E*r, I]
        assert down_a.shape[0] == 2 * grouped.config.num_experts  # the key reached PEFT's LoRA
        # PEFT 0.21 calls it ignored all the same; moefuse, which did not apply it, passes that on as it is
        assert warned == ("targeted module or parameter" not in inspect.getsource(BaseTuner.inject_adapter))


def _saved(peft_model, path) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """The model's logits in eval mode, and the shapes of the tensors it saves to ``path``."""
    peft_model.eval()
    with torch.no_grad():
        out = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(path)
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return out, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_save_load_keys_and_outputs(tmp_path):
    fused_peft, _, _ = _pair("qwen3_moe", rank_pattern={"down_proj": 2})
    out, shapes = _saved(fused_peft, tmp_path)
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert shapes[f"{prefix}.gate_proj.lora_A.weight"] == (8, 4, 32)
    assert shapes[f"{prefix}.up_proj.lora_B.weight"] == (8, 16, 4)
    assert shapes[f"{prefix}.down_proj.lora_A.weight"] == (8, 2, 16)
    assert shapes[f"{prefix}.down_proj.lora_B.weight"] == (8, 32, 2)
    assert not any("base_layer" in k for k in shapes)

    loaded = PeftModel.from_pretrained(_fused_model("qwen3_moe"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, out)


def _gate_up_lora(model):
    """``model`` with random LoRA r=4 on q_proj and the experts' gate_up_proj (gate and up together) and down_proj."""
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_up_proj", "down_proj"])
    )
    _randomize_lora_(peft_model)
    return peft_model


def _stacked_pair(family: str):
    """The model with LoRA on gate_up_proj (moefuse), and a copy on Transformers' eager experts with PEFT's
    ``target_parameters`` LoRA on the stacked weights, holding the same factors."""
    model = _fused_model(family)
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    fused_peft = _gate_up_lora(model)
    ref_peft = get_peft_model(
        ref,
        LoraConfig(
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            r=4,
            lora_alpha=8,
        ),
    )
    fused_params, ref_params = dict(fused_peft.named_parameters()), dict(ref_peft.named_parameters())
    pairs = []  # (fused name, ref name, fused [E, r, in] / [E, out, r] -> PEFT [E*r, in] / [out, E*r])
    for name in fused_params:
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up|down)_proj\.lora_([AB])\.default\.weight$", name)
        if m is None:
            if "lora_" in name:
                pairs.append((name, name, lambda t: t))
            continue
        # PEFT nests the wrappers in the order the experts register their parameters: gate_up_proj inside.
        depth = "base_layer." if m[2] == "gate_up" else ""
        ref_name = f"{m[1]}.{depth}lora_{m[3]}.default.weight"
        pack = (
            (lambda t: t.reshape(-1, t.shape[2]))
            if m[3] == "A"
            else (lambda t: t.permute(1, 2, 0).reshape(t.shape[1], -1))
        )
        pairs.append((name, ref_name, pack))
    with torch.no_grad():
        for name, ref_name, pack in pairs:
            ref_params[ref_name].copy_(pack(fused_params[name]))
    assert len(pairs) == sum("lora_" in n for n in ref_params)
    return fused_peft, ref_peft, pairs


@pytest.mark.skipif(
    Version(peft.__version__) < Version("0.19.1"),
    reason="PEFT < 0.19.1 swaps in and out of target_parameters LoRA on experts stored [E, out, in]",
)
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gate_up_proj_is_peft_target_parameters_lora(family):
    """LoRA on gate_up_proj (one A for gate and up) computes what PEFT's target_parameters LoRA on the stacked
    weights computes, on Transformers' experts: the same logits and factor gradients for the same factors. GPT-OSS's
    experts (transposed storage, biases, interleaved gate/up rows, a clamped SwiGLU) run composed around it."""
    fused_peft, ref_peft, pairs = _stacked_pair(family)
    layer = fused_peft.base_model.model.model.layers[0].mlp.experts
    assert layer.r["default"] == {"gate_up_proj": 4, "down_proj": 4}
    inter = layer.down_proj.lora_A["default"].weight.shape[2]
    assert layer.gate_up_proj.lora_B["default"].weight.shape == (8, 2 * inter, 4)
    out = fused_peft(input_ids=IDS).logits
    ref = ref_peft(input_ids=IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    fused_params, ref_params = dict(fused_peft.named_parameters()), dict(ref_peft.named_parameters())
    for name, ref_name, pack in pairs:
        torch.testing.assert_close(
            pack(fused_params[name].grad), ref_params[ref_name].grad, rtol=1e-4, atol=1e-5, msg=name
        )


def test_gate_up_proj_saves_loads_and_merges(tmp_path):
    fused_peft = _gate_up_lora(_fused_model("qwen3_moe"))
    out, shapes = _saved(fused_peft, tmp_path)
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert shapes[f"{prefix}.gate_up_proj.lora_A.weight"] == (8, 4, 32)
    assert shapes[f"{prefix}.gate_up_proj.lora_B.weight"] == (8, 32, 4)
    assert not any(".gate_proj." in k or "base_layer" in k for k in shapes)
    loaded = PeftModel.from_pretrained(_fused_model("qwen3_moe"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, out)
    lora = fused_peft.base_model.model.model.layers[0].mlp.experts.experts_lora("default")
    base = copy.deepcopy(fused_peft.base_model.model.model.layers[0].mlp.experts.base_layer)
    merged = fused_peft.merge_and_unload()
    torch.testing.assert_close(
        merged.model.layers[0].mlp.experts.gate_up_proj, base.gate_up_proj + lora.gate_up.delta_weight()
    )
    torch.testing.assert_close(merged(IDS).logits, out, rtol=1e-4, atol=1e-5)


def test_gate_proj_apart_on_interleaved_experts_is_refused_naming_gate_up_proj():
    from moefuse import UnsupportedExpertsError

    with pytest.raises(
        UnsupportedExpertsError,
        match=r"'gpt_oss'.*, so LoRA on gate_proj apart cannot be placed; target gate_up_proj",
    ):
        get_peft_model(_fused_model("gpt_oss"), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"]))


def test_gate_up_proj_and_gate_proj_together_is_refused():
    with pytest.raises(ValueError, match=r"gate_up_proj \(gate and up together\) and gate_proj \(apart\)"):
        get_peft_model(
            _fused_model("qwen3_moe"), LoraConfig(r=4, target_modules=["gate_proj", "gate_up_proj"])
        )


def test_merge_and_unload_equals_base_plus_lora():
    fused_peft, _, _ = _pair("qwen3_moe")
    base_experts = copy.deepcopy(fused_peft.base_model.model.model.layers[0].mlp.experts.base_layer)
    layer = fused_peft.base_model.model.model.layers[0].mlp.experts
    lora = layer.experts_lora("default")
    with torch.no_grad():
        out = fused_peft(input_ids=IDS).logits
    merged = fused_peft.merge_and_unload()
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and not any(
        isinstance(m, ExpertsLoraLayer) for m in merged.modules()
    )
    delta_gate_up = torch.cat([lora.gate.delta_weight(), lora.up.delta_weight()], dim=1)
    torch.testing.assert_close(experts.gate_up_proj, base_experts.gate_up_proj + delta_gate_up)
    torch.testing.assert_close(experts.down_proj, base_experts.down_proj + lora.down.delta_weight())
    torch.testing.assert_close(merged(IDS).logits, out, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_and_disable_adapter():
    model = _fused_model("qwen3_moe")
    with torch.no_grad():
        base = model(IDS).logits
    fused_peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    _randomize_lora_(fused_peft)
    with torch.no_grad():
        out = fused_peft(input_ids=IDS).logits
        assert (out - base).abs().max() > 1e-3
        with fused_peft.disable_adapter():
            torch.testing.assert_close(fused_peft(input_ids=IDS).logits, base)
        fused_peft.base_model.merge_adapter()
        torch.testing.assert_close(fused_peft(input_ids=IDS).logits, out, rtol=1e-4, atol=1e-5)
        fused_peft.base_model.unmerge_adapter()
        torch.testing.assert_close(fused_peft(input_ids=IDS).logits, out, rtol=1e-4, atol=1e-5)
        with fused_peft.disable_adapter():
            torch.testing.assert_close(fused_peft(input_ids=IDS).logits, base, rtol=1e-4, atol=1e-5)


def test_dropout_in_train_mode():
    model = _fused_model("qwen3_moe")
    fused_peft = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["gate_proj", "down_proj"])
    )
    _randomize_lora_(fused_peft)
    layer = fused_peft.base_model.model.model.layers[0].mlp.experts
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    fused_peft.train()
    first, second = fused_peft(input_ids=IDS).logits, fused_peft(input_ids=IDS).logits
    assert (first - second).abs().max() > 1e-4  # masks differ between calls
    first.sum().backward()
    assert layer.down_proj.lora_B["default"].weight.grad is not None
    fused_peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused_peft(input_ids=IDS).logits, fused_peft(input_ids=IDS).logits)


def test_multiple_adapters(tmp_path):
    model = _fused_model("qwen3_moe")
    fused_peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    fused_peft.add_adapter("other", LoraConfig(r=2, target_modules=["down_proj"]))
    _randomize_lora_(fused_peft)
    layer = fused_peft.base_model.model.model.layers[0].mlp.experts
    assert set(layer.scaling) == {"default", "other"} and set(layer.scaling["other"]) == {"down_proj"}
    with torch.no_grad():
        default = fused_peft(input_ids=IDS).logits
        fused_peft.set_adapter("other")
        other = fused_peft(input_ids=IDS).logits
    assert (default - other).abs().max() > 1e-3
    assert layer.down_proj.lora_A["other"].weight.requires_grad
    assert not layer.gate_proj.lora_A["default"].weight.requires_grad
    fused_peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_fused_model("qwen3_moe"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, default)
        loaded.set_adapter("other")
        torch.testing.assert_close(loaded(input_ids=IDS).logits, other)
    fused_peft.delete_adapter("default")
    assert set(layer.scaling) == {"other"} and "default" not in layer.gate_proj.lora_A


def test_qwen2_moe_shared_expert_gets_plain_lora():
    model = _fused_model("qwen2_moe")
    fused_peft = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    mlp = fused_peft.base_model.model.model.layers[0].mlp
    assert isinstance(mlp.experts, ExpertsLoraLayer)
    assert type(mlp.shared_expert.gate_proj).__name__ == "Linear" and hasattr(
        mlp.shared_expert.gate_proj, "lora_A"
    )
    fused_peft(input_ids=IDS).logits.sum().backward()


def test_router_target_parameters_beside_experts():
    model = _fused_model("qwen3_moe")
    config = LoraConfig(r=4, target_modules=TARGETS, target_parameters=["mlp.gate.weight"])
    fused_peft = get_peft_model(model, config)
    fused_peft(input_ids=IDS).logits.sum().backward()
    router = [n for n, p in fused_peft.named_parameters() if "mlp.gate" in n and "lora_" in n]
    assert router and all(dict(fused_peft.named_parameters())[n].grad is not None for n in router)


def test_one_call_helper():
    model = _fused_model("qwen3_moe")
    fused_peft = moefuse.lora.get_peft_model(model, r=8)
    layer = fused_peft.base_model.model.model.layers[0]
    assert layer.mlp.experts.r["default"] == {"gate_proj": 8, "up_proj": 8, "down_proj": 8}
    assert layer.mlp.experts.scaling["default"]["gate_proj"] == 2.0
    assert hasattr(layer.self_attn.o_proj, "lora_A")


def test_experts_not_on_moefuse_keep_plain_peft():
    # PEFT >= 0.21 turns the projection names into its own target_parameters LoRA here; older PEFT leaves the
    # experts alone and moefuse warns that they need experts_implementation="moefuse".
    config = tiny_config("qwen3_moe", num_experts=8)
    config._experts_implementation = "eager"
    model = randomize_(AutoModelForCausalLM.from_config(config))
    fused_peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert not any(isinstance(m, ExpertsLoraLayer) for m in fused_peft.modules())


def test_unsupported_options_raise_naming_them():
    model = _fused_model("qwen3_moe")
    with pytest.raises(
        ValueError, match=r"experts at model\.layers\.0\.mlp\.experts does not support use_dora"
    ):
        get_peft_model(model, LoraConfig(r=4, use_dora=True, target_modules=["down_proj"]))
