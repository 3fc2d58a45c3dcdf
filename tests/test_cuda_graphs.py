"""moefuse's experts replay in a CUDA graph: routing, the grouped GEMMs and their backward launch with grids fixed
by the number of rows and never wait for the host, so a whole forward and backward can be captured once and
replayed on new inputs (Transformers' ``grouped_mm`` experts cannot be). Each replay must give what an eager step
gives on the same inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

import moefuse
from conftest import randomize_, tiny_config
from moefuse.ops.backend import use_backend
from moefuse.ops.lora import ExpertsLora, LoraWeights

pytestmark = pytest.mark.gpu


def _replay_against_eager(
    step: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    new_inputs: list[torch.Tensor],
    trained: list[torch.Tensor],
) -> None:
    """Capture ``step`` (forward and backward, reading ``inputs``), copy ``new_inputs`` into them, replay, and
    compare the output and every gradient with an eager step on the same inputs."""

    def clear_grads() -> None:
        for tensor in trained:
            tensor.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(
        side
    ):  # warm-up off the default stream, as capture needs: autotuning, first launches
        for _ in range(3):
            clear_grads()
            step()
    torch.cuda.current_stream().wait_stream(side)
    clear_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = step()
    captured_at_capture = captured_out.clone()

    with torch.no_grad():
        for static, new in zip(inputs, new_inputs, strict=True):
            static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [captured_out.clone(), *(t.grad.clone() for t in trained)]
    assert not torch.equal(replayed[0], captured_at_capture)  # the replay computed the new inputs

    clear_grads()
    eager = [step().detach(), *(t.grad for t in trained)]
    for got, want in zip(replayed, eager, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_experts_forward_backward_replay_in_a_cuda_graph(lora):
    torch.manual_seed(0)
    experts, hidden, inter, top_k, tokens, rank = 8, 256, 128, 2, 256, 8
    options = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, **options, requires_grad=True)
    router = (torch.randn(experts, hidden, **options) * 0.1).requires_grad_()
    gate_up = (torch.randn(experts, 2 * inter, hidden, **options) * 0.05).requires_grad_(not lora)
    down = (torch.randn(experts, hidden, inter, **options) * 0.05).requires_grad_(not lora)
    probe = torch.randn(tokens, hidden, device="cuda")
    adapters, trained = [], [x, router]
    if lora:
        factors = [
            torch.randn(experts, rank, hidden, **options) * 0.05,
            torch.randn(experts, 2 * inter, rank, **options) * 0.05,
            torch.randn(experts, rank, inter, **options) * 0.05,
            torch.randn(experts, hidden, rank, **options) * 0.05,
        ]
        factors = [f.requires_grad_() for f in factors]
        adapters = [
            ExpertsLora(
                gate_up=LoraWeights(*factors[:2], scaling=2.0), down=LoraWeights(*factors[2:], scaling=2.0)
            )
        ]
        trained += factors
    else:
        trained += [gate_up, down]

    def step() -> torch.Tensor:
        probs = (x @ router.t()).float().softmax(-1)
        weights, index = probs.topk(top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = moefuse.fused_experts(x, gate_up, down, index, weights, lora=adapters, check_index_range=False)
        (out.float() * probe).sum().backward()
        return out

    with use_backend("triton"):
        _replay_against_eager(step, [x], [torch.randn_like(x)], trained)


def test_a_causal_lm_step_with_moefuse_experts_replays_in_a_cuda_graph():
    """A tiny Qwen3-MoE's whole step (embeddings, attention, router, moefuse experts, loss, backward) as one graph."""
    config = tiny_config("qwen3_moe")
    config._experts_implementation = "moefuse"
    config._attn_implementation = "sdpa"
    model = randomize_(AutoModelForCausalLM.from_config(config)).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 32), device="cuda")

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    new_ids = torch.randint(0, config.vocab_size, ids.shape, device="cuda")
    with use_backend("triton"):
        _replay_against_eager(step, [ids], [new_ids], [p for p in model.parameters() if p.requires_grad])
