"""moefuse's experts under torch.compile: the fused experts are the custom operators ``moefuse::experts`` and
``moefuse::experts_backward`` (checked with ``torch.library.opcheck``), so a decoder layer with moefuse experts and
PEFT LoRA compiles with ``fullgraph=True`` and gives eager's results; paths that launch Triton kernels outside the
operators run eagerly between the compiled graphs, with their reason."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import moefuse
from conftest import randomize_, tiny_config
from moefuse.lora.linear import LoraLinear, use_fused_lora_linear
from moefuse.ops.backend import use_backend
from moefuse.ops.gating import SWIGLU, Gating
from moefuse.ops.moe_triton import (
    _EagerExperts,
    _experts_backward_op,
    _experts_op,
    _operator_out,
    _saved_present,
)

pytestmark = pytest.mark.interpreter  # the operators run the Triton kernels (interpreted on the CPU)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with use_backend("triton"):
        yield
    torch._dynamo.reset()


def _operator_args(
    lora: bool,
    trained: bool,
    tokens: int = 7,
    gating: Gating = SWIGLU,
    together: bool = False,
    biases: bool = False,
) -> tuple:
    """The experts operator's arguments; with ``together`` the LoRA's first pair is gate_up's (B ``[E, 2I, r]``)
    and up has none; with ``biases`` both projections have them (trained as the base weights are)."""
    torch.manual_seed(0)
    experts, hidden, inter, top_k = 4, 16, 8, 2
    x = torch.randn(tokens, hidden, requires_grad=True)
    gate_up = (torch.randn(experts, 2 * inter, hidden) * 0.3).requires_grad_(trained)
    down = (torch.randn(experts, hidden, inter) * 0.3).requires_grad_(trained)
    weights, index = torch.randn(tokens, experts).softmax(-1).topk(top_k, dim=-1)
    weights = weights.detach().requires_grad_()
    factors = [None] * 6
    if lora:
        rank = 2
        factors = [
            torch.randn(experts, rank, hidden, requires_grad=True),
            torch.randn(experts, inter, rank, requires_grad=True),
            torch.randn(experts, rank, hidden, requires_grad=True),
            torch.randn(experts, inter, rank, requires_grad=True),
            torch.randn(experts, rank, inter, requires_grad=True),
            torch.randn(experts, hidden, rank, requires_grad=True),
        ]
        if together:
            factors[1:4] = [torch.randn(experts, 2 * inter, rank, requires_grad=True), None, None]
    scalings = [2.0, 2.0, 0.5] if lora else [0.0, 0.0, 0.0]
    bias_tensors = [None, None]
    if biases:
        bias_tensors = [torch.randn(experts, 2 * inter).requires_grad_(trained), torch.randn(experts, hidden)]
        bias_tensors[1].requires_grad_(trained)
    # ..., biases, scalings, the gating's fields, lora_dropout, store_gate_up, prescaled_h, the grouped_mm choices
    return (
        x,
        gate_up,
        down,
        index,
        weights,
        *factors,
        *bias_tensors,
        scalings,
        *_gating_fields(gating),
        0.0,
        True,
        trained and not lora and not biases,
        False,
        False,
        False,
    )


def _gating_fields(gating: Gating) -> tuple:
    return (gating.activation, gating.alpha, gating.limit, gating.up_shift, gating.interleaved)


GPT_OSS = Gating("silu", alpha=1.702, limit=0.5, up_shift=1.0, interleaved=True)


@pytest.mark.parametrize(
    "lora,trained,tokens,gating,biases",
    [
        (False, True, 7, SWIGLU, False),
        (True, False, 7, SWIGLU, False),
        (True, True, 7, Gating("gelu_tanh"), False),
        (True, False, 0, SWIGLU, False),
        (False, True, 1, Gating("gelu_tanh"), False),
        (False, True, 7, GPT_OSS, True),
    ],
)
def test_experts_operator_opcheck(lora, trained, tokens, gating, biases):
    args = _operator_args(lora, trained, tokens, gating, together=lora and biases, biases=biases)
    torch.library.opcheck(_experts_op, args)


@pytest.mark.parametrize(
    "lora,together,biases",
    [(False, False, False), (True, False, False), (True, True, False), (False, False, True)],
)
def test_experts_backward_operator_opcheck(lora, together, biases):
    gating = GPT_OSS if biases else SWIGLU
    args = _operator_args(lora, trained=not lora, gating=gating, together=together, biases=biases)
    if together:
        torch.library.opcheck(_experts_op, args)
    outputs = _experts_op(*args)
    x, gate_up, down, index = args[:4]
    down_bias = args[12]
    ranks = ([2, 0, 2] if together else [2, 2, 2]) if lora else [0, 0, 0]
    present = _saved_present(ranks, lora_dropout=0.0, store_gate_up=True)
    saved = [t if there else None for t, there in zip(outputs[6:], present, strict=True)]
    needs = [True, not lora, not lora, True, *(f is not None for f in args[5:13])]
    backward_args = (
        torch.randn_like(outputs[0]),
        x.detach(),
        gate_up.detach(),
        down.detach(),
        None if down_bias is None else down_bias.detach(),
        *outputs[1:6],
        index.shape[1],
        saved,
        ranks,
        together,
        list(args[13]),
        torch.float32,
        torch.float32,
        needs,
        *_gating_fields(gating),
        0.0,
        not lora and not biases,
        False,
        False,
    )
    torch.library.opcheck(_experts_backward_op, backward_args)


_SAVED = (
    "scale",
    "gate_up",
    "h",
    "gate_up_a",
    "gate_up_b",
    "t",
    "x_mask",
    "down_a",
    "down_b",
    "td",
    "h_mask",
)


def _lora_model(fused_linear: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen3_moe", num_experts=8, top_k=2),
        experts_implementation=moefuse.EXPERTS_IMPLEMENTATION,
    )
    model = randomize_(model, std=0.1).float()
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, target_modules=targets)
    model = get_peft_model(model, use_fused_lora_linear(config) if fused_linear else config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make every factor's gradient count
            torch.nn.init.normal_(param, std=0.1)
    return model


def _layer_step(layer: torch.nn.Module, inner: torch.nn.Module, call) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)
    tokens = 12
    hidden = torch.randn(1, tokens, inner.config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None]
    layer.zero_grad(set_to_none=True)
    out = call(
        hidden,
        position_embeddings=inner.rotary_emb(hidden, positions),
        attention_mask=None,
        position_ids=positions,
    )
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, "input": hidden.grad}


@pytest.mark.parametrize("fused_linear", [False, True], ids=["peft-linear", "moefuse-linear"])
def test_decoder_layer_with_lora_compiles_fullgraph(fused_linear):
    """Attention LoRA through PEFT's Linear or moefuse's (one autograd function), the experts' LoRA fused."""
    model = _lora_model(fused_linear)
    assert any(type(m) is LoraLinear for m in model.modules()) == fused_linear
    inner = model.base_model.model.model
    layer = inner.layers[0]
    ref, ref_grads = _layer_step(layer, inner, layer)
    out, grads = _layer_step(layer, inner, torch.compile(layer, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("experts.down_proj.lora_A" in n for n in grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


FRESH_PROCESS_LAYER = """
import sys
import torch
from transformers import AutoModelForCausalLM
import moefuse
sys.path.insert(0, {tests!r})
from conftest import tiny_config
model = AutoModelForCausalLM.from_config(
    tiny_config("qwen3_moe", num_experts=8), experts_implementation=moefuse.EXPERTS_IMPLEMENTATION
).float()
layer = model.model.layers[0]
hidden = torch.randn(1, 6, model.config.hidden_size, requires_grad=True)
positions = torch.arange(6)[None]
out = torch.compile(layer, backend="aot_eager", fullgraph=True)(
    hidden, position_embeddings=model.model.rotary_emb(hidden, positions), attention_mask=None,
    position_ids=positions,
)
(out[0] if isinstance(out, tuple) else out).sum().backward()
"""


def test_a_fresh_process_compiles_a_layer_fullgraph_before_any_eager_call():
    """The first experts call of a process may be the one torch.compile traces: moefuse's settings must be read by
    then (they are read at import), since Dynamo cannot trace reading the environment."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEFUSE_BACKEND": "triton"}
    script = FRESH_PROCESS_LAYER.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _loss_and_grads(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return loss.detach(), grads


def test_compiled_model_matches_eager_with_the_experts_in_the_graph():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen3_moe", num_experts=8, top_k=2),
        experts_implementation=moefuse.EXPERTS_IMPLEMENTATION,
    )
    model = randomize_(model, std=0.1).float()
    ids = torch.randint(0, 128, (2, 12))
    loss, grads = _loss_and_grads(model, ids)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(model, backend="aot_eager"), ids)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    explained = torch._dynamo.explain(model)(ids)
    ops = [str(op) for graph in explained.ops_per_graph for op in graph]
    # Each layer's experts are one operator call (a frame compiled for one layer may serve the next).
    assert any("moefuse.experts" in op for op in ops)
    assert not any("moefuse" in str(b.reason) for b in explained.break_reasons)


def test_composed_experts_on_triton_run_eagerly_with_their_reason():
    """A structure the fused operator does not take (here a gate function) runs composed, eagerly under compile."""
    torch.manual_seed(0)
    x, gate_up, down, index, weights = _operator_args(lora=False, trained=False)[:5]

    def experts(x: torch.Tensor) -> torch.Tensor:
        return moefuse.fused_experts(
            x, gate_up, down, index, weights, gate_fn=lambda g: g[:, : g.shape[1] // 2]
        )

    with pytest.raises(Exception, match="composed experts on the Triton kernels run eagerly"):
        torch.compile(experts, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(experts, backend="eager")(x), experts(x))


class _Calls(TorchDispatchMode):
    """The names of the operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("experts", [_operator_out, _EagerExperts.apply], ids=["operator", "eager"])
def test_the_backward_builds_no_gradient_for_the_saved_outputs(experts):
    """The routing and saved tensors leave the forward only to reach the backward: autograd must not materialise a
    zero gradient of each one's size (a memset of the [rows, 2I] activations per layer), through the operator (they
    are its outputs, marked as taking none) or through the eager autograd function (they stay on its context)."""
    args = _operator_args(lora=True, trained=True)
    if experts is _operator_out:
        outputs = _experts_op(*args)
        assert all(not o.requires_grad for o in outputs[1:])
    out = experts(*args)
    assert out.requires_grad
    with _Calls() as calls:
        out.sum().backward()
    assert ("experts_backward.default" in calls.names) == (experts is _operator_out)
    assert not [name for name in calls.names if name.startswith(("zeros", "zeros_like", "fill"))], calls.names
    assert all(t.grad is not None for t in (args[0], args[1], args[2], args[4], *args[5:11]))


@pytest.mark.parametrize(
    "lora,together,biases", [(True, False, False), (True, True, False), (False, False, True)]
)
def test_eager_experts_call_the_operators_functions_without_their_dispatch(lora, together, biases):
    """Eager ``fused_experts`` runs the operators' forward and backward directly (their dispatch is host work on
    every layer of every step) with the operator's output and gradients, bit for bit."""

    def output_and_grads(experts) -> list[torch.Tensor]:
        args = _operator_args(lora=lora, trained=True, together=together, biases=biases)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        out = experts(*args)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in leaves)]

    for got, want in zip(output_and_grads(_EagerExperts.apply), output_and_grads(_operator_out), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x, gate_up, down, index, weights = _operator_args(lora=False, trained=True)[:5]
    with _Calls() as calls:
        moefuse.fused_experts(x, gate_up, down, index, weights).sum().backward()
    assert not [name for name in calls.names if name.startswith("experts")], calls.names
