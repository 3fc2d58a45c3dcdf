"""Checkpoints of expert-parallel models: each rank reads only its experts; saving gathers a normal checkpoint.

Loading reads the expert stacks of any layout in :mod:`moefuse.convert.layouts` through its Transformers-layout
view, row ranges only, so a rank touches ``1 / ep_size`` of the expert bytes; the dense tensors are read whole by
every rank. Saving gathers the experts over the EP group and writes what ``save_pretrained`` writes for the
unsharded model (the per-expert Hub layout), from the first rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoConfig

from ..convert.layouts import Checkpoint, CheckpointError, TransformersLayoutView, detect_layout
from .expert_parallel import ExpertParallelShard, apply_expert_parallel, experts_modules


def load_expert_parallel_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, device: torch.device | str | None = None
) -> nn.Module:
    """Fill an expert-parallel ``model`` (after :func:`apply_expert_parallel`, parameters possibly on the meta
    device) from the checkpoint folder ``path``: dense tensors whole, each rank's experts as slices.

    Tensors are cast to the model's parameter dtypes and put on ``device`` (default: where the parameters
    are, the CPU for meta parameters)."""
    ckpt = Checkpoint.open(path)
    layout = detect_layout(ckpt.shapes)
    if layout is None:
        raise CheckpointError(f"{ckpt.path}: holds no expert tensors in a layout moefuse reads")
    view = TransformersLayoutView(ckpt, layout)
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for name, module in experts_modules(model):
        shard: ExpertParallelShard | None = getattr(module, "expert_parallel", None)
        if shard is None:
            raise ValueError(f"{name} is not expert-parallel; call apply_expert_parallel before loading")
        if getattr(module, "is_transposed", False) or set(shard.param_names) - {"gate_up_proj", "down_proj"}:
            raise CheckpointError(
                f"{ckpt.path}: {name} stores its experts transposed or with biases, which cannot be loaded "
                "sharded yet; load the model whole (from_pretrained) and call apply_expert_parallel on it"
            )
        for projection in ("gate_up_proj", "down_proj"):
            key = f"{name}.{projection}"
            if key not in view:
                raise CheckpointError(
                    f"{ckpt.path}: no experts for {name} ({layout} layout); is this a checkpoint of the same model?"
                )
            loaded[key] = view.read(key, shard.expert_range)
    for key in state:
        if key not in loaded and key in view:
            loaded[key] = view[key]
    # Tied parameters (e.g. lm_head and the embeddings) are saved once: the others are re-tied below.
    aliases: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    tied = {k for keys in aliases.values() if any(k2 in loaded for k2 in keys) for k in keys}
    missing = [k for k in state if k not in loaded and k not in tied]
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: no tensor for {missing[0]} (and {len(missing) - 1} more); is this a checkpoint of "
            f"{type(model).__name__}?"
        )
    for key, tensor in loaded.items():
        target = state[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{ckpt.path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        where = device or (target.device if target.device.type != "meta" else "cpu")
        loaded[key] = tensor.to(device=where, dtype=target.dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def load_expert_parallel(
    model_class: type,
    path: str | os.PathLike,
    mesh: DeviceMesh,
    *,
    device: torch.device | str | None = None,
    **config_kwargs,
) -> nn.Module:
    """Build ``model_class`` (a Transformers model class, e.g. ``moefuse.Qwen3MoeFusedForCausalLM``) from the
    checkpoint folder ``path`` with its experts sharded over ``mesh``: no rank ever holds all experts.

    ``config_kwargs`` update the checkpoint's config (e.g. ``torch_dtype=torch.bfloat16``,
    ``experts_implementation`` is not needed: expert-parallel experts always run on moefuse).
    """
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    # Parameters on the meta device, buffers (rotary tables) computed for real.
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    apply_expert_parallel(model, mesh)
    load_expert_parallel_checkpoint(model, path, device=device)
    if device is not None:
        model.to(device)
    return model.eval()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. sharded by FSDP2) gathered whole; a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def expert_parallel_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the unsharded model, on every rank (every rank must call it): experts gathered over
    the EP group, FSDP2-sharded tensors gathered whole."""
    state = {k: _full(v) for k, v in model.state_dict().items()}
    for name, module in experts_modules(model):
        shard: ExpertParallelShard | None = getattr(module, "expert_parallel", None)
        if shard is None:
            continue
        for param_name in shard.param_names:
            local = getattr(module, param_name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(shard.ep_size)]
            dist.all_gather(parts, local, group=shard.group)
            state[f"{name}.{param_name}"] = torch.cat(parts, dim=0)
    return state


def save_expert_parallel(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """``save_pretrained`` of the unsharded model, written by global rank 0 (every rank must call it)."""
    state = expert_parallel_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(Path(save_directory), state_dict=state, **save_kwargs)
    dist.barrier()
