"""Expert parallelism on gloo with 2 and 4 processes: forward and gradients equal the single-process model.

Workers are forked (the parent has already imported torch and transformers, which takes seconds per process;
spawned instead once this process has run CUDA work, whose autograd threads cannot be forked) and meet through
a file store. Every rank also builds the single-process reference from the same seeds.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

import moefuse
from conftest import randomize_, tiny_config
from moefuse import Qwen3MoeFusedForCausalLM
from moefuse.convert.checkpoint import CheckpointError
from moefuse.convert.layouts import Checkpoint, detect_layout
from moefuse.ops import ExpertsLora, LoraWeights, fused_experts_reference
from moefuse.parallel import (
    apply_expert_parallel,
    clip_grad_norm_,
    expert_parallel_fused_experts,
    expert_parallel_state_dict,
    expert_parameters,
    load_expert_parallel,
    save_expert_parallel,
)
from test_qwen3_moe_fused_model import _write_layout

TOL = dict(rtol=1e-5, atol=1e-5)


def _worker(rank: int, world_size: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, tmp_path, fn, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a gloo group."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = str(tmp_path / "store")
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(
        _worker, args=(world_size, store, fn, args), nprocs=world_size, join=True, start_method=start_method
    )


# ---- the op: expert_parallel_fused_experts against the per-expert loop on the full stacks ----

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 16, 8, 2


def _routing_case(case: str, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of one rank, the same on every process that asks."""
    g = torch.Generator().manual_seed(100 * rank + 7)
    num_tokens = {"uneven": 5 + 4 * rank, "lora": 5 + 4 * rank, "empty_experts": 6}.get(case, 7)
    if case == "empty_rank" and rank == 1:
        num_tokens = 0
    if case in ("uneven", "lora"):
        # skewed: low expert ids (rank 0's experts) much more likely, some experts get nothing
        probs = torch.tensor([8.0, 6, 4, 2, 1, 1, 0.5, 0])
        rows = [torch.multinomial(probs, TOP_K, generator=g) for _ in range(num_tokens)]
    elif case == "empty_experts":
        # every token goes to experts 0 and 1: in EP only rank 0's experts compute anything
        rows = [torch.tensor([0, 1])] * num_tokens
    else:
        rows = [torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(num_tokens)]
    index = torch.stack(rows) if rows else torch.zeros(0, TOP_K, dtype=torch.long)
    hidden = torch.randn(num_tokens, HIDDEN, generator=g)
    weights = torch.rand(num_tokens, TOP_K, generator=g)
    return hidden, index, weights


def _lora_factors(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Gate and down LoRA factors of all experts (rank 3), up left without."""
    shapes = {
        "gate_A": (NUM_EXPERTS, 3, HIDDEN),
        "gate_B": (NUM_EXPERTS, INTER, 3),
        "down_A": (NUM_EXPERTS, 3, INTER),
        "down_B": (NUM_EXPERTS, HIDDEN, 3),
    }
    return {k: torch.randn(shape, generator=g) * 0.3 for k, shape in shapes.items()}


def _experts_lora(factors: dict[str, torch.Tensor]) -> list[ExpertsLora]:
    return [
        ExpertsLora(
            gate=LoraWeights(factors["gate_A"], factors["gate_B"], 0.5),
            down=LoraWeights(factors["down_A"], factors["down_B"], 2.0),
        )
    ]


def _check_op(rank: int, world_size: int, case: str) -> None:
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.3
    down = torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=g) * 0.3
    cot = [torch.randn(100, HIDDEN, generator=g) for _ in range(world_size)]  # upstream gradient per rank
    lora = _lora_factors(g) if case == "lora" else {}
    ref_lora = {k: v.clone().requires_grad_() for k, v in lora.items()}

    # reference: every rank's tokens through the full experts, loss summed over ranks
    ref_gate_up, ref_down = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
    ref_inputs = []
    for r in range(world_size):
        hidden, index, weights = _routing_case(case, r, world_size)
        hidden.requires_grad_(), weights.requires_grad_()
        out = fused_experts_reference(
            hidden, ref_gate_up, ref_down, index, weights, lora=_experts_lora(ref_lora) if lora else ()
        )
        if out.requires_grad:  # not for a rank without tokens
            (out * cot[r][: out.shape[0]]).sum().backward()
        ref_inputs.append((hidden, weights, out.detach()))

    local = slice(rank * NUM_EXPERTS // world_size, (rank + 1) * NUM_EXPERTS // world_size)
    my_gate_up, my_down = gate_up[local].clone().requires_grad_(), down[local].clone().requires_grad_()
    my_lora = {k: v[local].clone().requires_grad_() for k, v in lora.items()}
    hidden, index, weights = _routing_case(case, rank, world_size)
    hidden.requires_grad_(), weights.requires_grad_()
    out = expert_parallel_fused_experts(
        hidden,
        my_gate_up,
        my_down,
        index,
        weights,
        group=dist.group.WORLD,
        lora=_experts_lora(my_lora) if lora else (),
    )
    (out * cot[rank][: out.shape[0]]).sum().backward()

    ref_hidden, ref_weights, ref_out = ref_inputs[rank]
    torch.testing.assert_close(out, ref_out, **TOL)
    if hidden.shape[0]:
        torch.testing.assert_close(hidden.grad, ref_hidden.grad, **TOL)
        torch.testing.assert_close(weights.grad, ref_weights.grad, **TOL)
    torch.testing.assert_close(my_gate_up.grad, ref_gate_up.grad[local], **TOL)
    torch.testing.assert_close(my_down.grad, ref_down.grad[local], **TOL)
    for key, factor in my_lora.items():
        torch.testing.assert_close(factor.grad, ref_lora[key].grad[local], **TOL)


@pytest.mark.parametrize("world_size", [2, 4])
def test_op_matches_single_process(tmp_path, world_size):
    for case in ("uneven", "empty_experts", "empty_rank", "lora"):
        run_ranks(world_size, tmp_path / case, _check_op, case)


# ---- a tiny Qwen3-MoE, EP composed with DDP / FSDP2, against the unsharded model ----


def _tiny_model() -> Qwen3MoeFusedForCausalLM:
    torch.manual_seed(0)
    return randomize_(Qwen3MoeFusedForCausalLM(tiny_config("qwen3_moe", num_experts=8)), seed=3)


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 5 + rank), generator=torch.Generator().manual_seed(rank))


CLIP = 0.05  # below the gradients' norm: clipping scales them


def _check_model(rank: int, world_size: int, wrapper: str, ep_size: int) -> None:
    reference = _tiny_model()
    # the global loss of data parallelism: the mean of the ranks' losses
    ref_loss = sum(reference(_batch(r), labels=_batch(r)).loss for r in range(world_size)) / world_size
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
    ref_grads = {k: p.grad for k, p in reference.named_parameters()}
    ref_logits = reference(_batch(rank)).logits.detach()

    model = _tiny_model()
    mesh = init_device_mesh("cpu", (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    apply_expert_parallel(model, mesh)
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        dp_mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=dp_mesh, ignored_params=expert_parameters(model))
        wrapped = fully_shard(model, mesh=dp_mesh, ignored_params=expert_parameters(model))
    out = wrapped(_batch(rank), labels=_batch(rank))
    torch.testing.assert_close(out.logits, ref_logits, **TOL)
    out.loss.backward()
    torch.testing.assert_close(clip_grad_norm_(model, CLIP), ref_norm, **TOL)

    ep_rank = mesh["ep"].get_local_rank()
    local = slice(ep_rank * 8 // ep_size, (ep_rank + 1) * 8 // ep_size)
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        expected = ref_grads[name][local] if param in expert_parameters(model) else ref_grads[name]
        torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_model_ep2_matches_single_process(tmp_path, wrapper):
    run_ranks(2, tmp_path, _check_model, wrapper, 2)


def test_model_ep2_dp2_matches_single_process(tmp_path):
    """4 ranks: 2 replicas of a 2-way expert split (expert gradients summed over the replicas)."""
    run_ranks(4, tmp_path, _check_model, "ddp", 2)


def _family_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, num_experts=8), experts_implementation=moefuse.EXPERTS_IMPLEMENTATION
    )
    return randomize_(model, seed=3)


def _check_family(rank: int, world_size: int, family: str, out_dir: str) -> None:
    reference = _family_model(family)
    ref_loss = sum(reference(_batch(r), labels=_batch(r)).loss for r in range(world_size)) / world_size
    ref_loss.backward()
    ref_grads = {k: p.grad for k, p in reference.named_parameters()}
    ref_logits = reference(_batch(rank)).logits.detach()

    model = _family_model(family)
    apply_expert_parallel(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",)))
    sharded = expert_parameters(model)
    names = {name for name, p in model.named_parameters() if p in sharded}
    assert any(name.endswith("_bias") for name in names) == (family == "gpt_oss")  # biases sharded too
    wrapped = DistributedDataParallel(model)  # kept: its reducer averages the dense gradients in the backward
    out = wrapped(_batch(rank), labels=_batch(rank))
    torch.testing.assert_close(out.logits, ref_logits, **TOL)
    out.loss.backward()
    local = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    for name, param in model.named_parameters():
        expected = ref_grads[name][local] if name in names else ref_grads[name]
        torch.testing.assert_close(param.grad, expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    state = expert_parallel_state_dict(model)  # gathered whole, biases included
    for key, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    if family == "gpt_oss":  # sharded loading reads [E, 2I, H] row ranges: these stacks are stored otherwise
        saved = Path(out_dir)
        save_expert_parallel(model, saved)
        with pytest.raises(CheckpointError, match="transposed"):
            load_expert_parallel(type(reference), saved, init_device_mesh("cpu", (world_size,)))


@pytest.mark.parametrize("family", ["gpt_oss", "gemma4_text"])
def test_other_experts_structures_ep2_match_single_process(tmp_path, family):
    """GPT-OSS (biases, interleaved gate/up rows, a clamped SwiGLU, transposed stacks) and Gemma 4 (GeGLU experts
    on the decoder layer) shard like Qwen3-MoE: forward, every gradient, and the gathered state dict."""
    run_ranks(2, tmp_path, _check_family, family, str(tmp_path / "saved"))


# ---- checkpoints: each rank reads its experts from any layout; saving gathers a normal checkpoint ----


def _check_checkpoint(rank: int, world_size: int, sources: dict, out_dir: str) -> None:
    full = Qwen3MoeForCausalLM.from_pretrained(sources["per_expert"]).state_dict()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    local = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    for layout, path in sources.items():
        model = load_expert_parallel(Qwen3MoeFusedForCausalLM, path, mesh)
        for key, tensor in model.state_dict().items():
            expected = full[key][local] if "experts" in key else full[key]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=f"{layout} {key}")
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8 // world_size
    state = expert_parallel_state_dict(model)
    assert state.keys() == full.keys()
    save_expert_parallel(model, out_dir)


@pytest.mark.parametrize("world_size", [2, 4])
def test_checkpoint_round_trip(tmp_path, world_size):
    hub = tmp_path / "hub"
    original = _tiny_model()
    Qwen3MoeForCausalLM.save_pretrained(original, hub)  # the per-expert Hub layout
    sources = {"per_expert": str(hub)}
    for layout in ("transformers", "qwen3_moe_fused", "veomni"):
        sources[layout] = str(_write_layout(hub, tmp_path / layout, layout))
    out_dir = tmp_path / "saved"
    run_ranks(world_size, tmp_path, _check_checkpoint, sources, str(out_dir))

    reloaded = Qwen3MoeForCausalLM.from_pretrained(out_dir)
    assert reloaded.config.architectures == ["Qwen3MoeForCausalLM"]
    expected = original.state_dict()
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)
    assert detect_layout(Checkpoint.open(out_dir).shapes) == "per_expert"


# ---- clear errors ----


def _check_errors(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    with pytest.raises(ValueError, match="3 experts, not divisible by ep_size=2"):
        apply_expert_parallel(Qwen3MoeFusedForCausalLM(tiny_config("qwen3_moe", num_experts=3)), mesh)
    with pytest.raises(ValueError, match="has no experts module"):
        apply_expert_parallel(torch.nn.Linear(2, 2), mesh)
    with pytest.raises(ValueError, match="puts LoRA on the experts"):
        apply_expert_parallel(moefuse.lora.get_peft_model(_tiny_model(), r=2), mesh)
    model = apply_expert_parallel(_tiny_model(), mesh)
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(model, mesh)
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(IndexError, match="expert id 8, outside"):
        experts(torch.randn(3, 32), torch.full((3, 2), 8), torch.rand(3, 2))


def test_clear_errors(tmp_path):
    run_ranks(2, tmp_path, _check_errors)
