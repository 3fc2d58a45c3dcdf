"""moefuse's experts under torch.compile: they run eagerly between the compiled graphs, with the same results as
without compile; a ``fullgraph=True`` compile is refused with moefuse's reason."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moefuse
from conftest import randomize_, tiny_config


def _model(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen3_moe", num_experts=8, top_k=2), experts_implementation=implementation
    )
    return randomize_(model, std=0.1).float()


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


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_matches_eager_with_experts_run_eagerly():
    model = _model(moefuse.EXPERTS_IMPLEMENTATION)
    ids = torch.randint(0, 128, (2, 12))
    loss, grads = _loss_and_grads(model, ids)
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss, compiled_grads = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The experts are the only graph breaks: the rest of the model compiles whole.
    reasons = [str(b.reason) for b in torch._dynamo.explain(model)(ids).break_reasons]
    assert reasons and all("moefuse's experts run eagerly" in r for r in reasons), reasons


def test_fullgraph_compile_is_refused_with_the_reason():
    model = _model(moefuse.EXPERTS_IMPLEMENTATION)
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(Exception, match="moefuse's experts run eagerly"):
        torch.compile(model, backend="eager", fullgraph=True)(ids)
