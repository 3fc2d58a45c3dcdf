"""Optimizer states of MoE models and expert LoRA, converted losslessly between expert layouts.

An optimizer keeps, per parameter, tensors shaped like it (AdamW's ``exp_avg`` / ``exp_avg_sq``, bitsandbytes'
8-bit ``state1`` / ``state2``) and small values (``step``; bitsandbytes' quantization maps ``qmap1`` /
``qmap2`` and per-block scales ``absmax1`` / ``absmax2``). Converting the parameters between expert layouts
regroups the parameter-shaped tensors exactly as the weights are regrouped (the same plan as checkpoints, see
:mod:`.layouts`), keeps the small values, which must agree between the experts that become one parameter, and
regroups bitsandbytes' scales with their blocks of 256 values: exact when no block straddles two experts'
matrices, i.e. when each expert matrix holds a multiple of 256 values (Qwen3-30B-A3B's do).

Both forms of optimizer state dicts are read: keyed by parameter name (what
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gives and ``set_optimizer_state_dict``
loads) and keyed by index (``optimizer.state_dict()``, HF Trainer's ``optimizer.pt``), for which the parameter
names in the optimizer's order are needed (:func:`optimizer_param_names`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .checkpoint import CheckpointError
from .layouts import (
    LAYOUTS,
    LORA,
    MODEL,
    Planned,
    detect_layout,
    detect_lora_layout,
    find_blocks,
    lora_layout_for,
    names_expert,
    plan_conversion,
)

BNB_BLOCKSIZE = 256  # values per absmax scale in bitsandbytes' blockwise 8-bit optimizers
_WHERE = "optimizer state"


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its order (the indices of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _tensors(state: dict) -> Iterator[torch.Tensor]:
    """Every tensor of a parameter's state, also inside nested dicts (bitsandbytes >= 0.50 keeps its 8-bit
    state under ``__bnb_optimizer_quant_state__``)."""
    for value in state.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def _reference(state: dict) -> torch.Tensor | None:
    """The parameter-shaped tensor of a parameter's state: the one with the most dimensions."""
    return max(_tensors(state), key=lambda t: t.dim(), default=None)


def _copy(value: object) -> object:
    """``value`` with its tensors cloned: a converted state must not share tensors with the input, or stepping
    one optimizer would change the other's state (and experts sharing one ``step`` would count it E times)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _show(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.item()) if value.numel() == 1 else f"a {value.dtype} tensor {list(value.shape)}"
    return repr(value)


def _blocks(
    values: list[torch.Tensor], planned: Planned, shapes: dict, out_name: str, key: str
) -> torch.Tensor:
    """bitsandbytes' per-block scales of ``out_name``, taken block by block from the pieces' sources."""
    parts, offset, total = [], 0, torch.Size(planned.shape).numel()
    for value, piece in zip(values, planned.pieces, strict=True):
        source_size = torch.Size(shapes[piece.name]).numel()
        size = piece.stop - piece.start
        whole_blocks = piece.start % BNB_BLOCKSIZE == 0 and offset % BNB_BLOCKSIZE == 0
        ends_both = piece.stop == source_size and offset + size == total
        if not whole_blocks or (size % BNB_BLOCKSIZE and not ends_both):
            raise CheckpointError(
                f"{_WHERE}: bitsandbytes blocks of {BNB_BLOCKSIZE} values straddle experts in {out_name} ({key}: "
                f"expert matrices of {size} values); this 8-bit state cannot be regrouped losslessly"
            )
        if value.numel() != -(-source_size // BNB_BLOCKSIZE):
            raise CheckpointError(
                f"{_WHERE}: {piece.name} has {value.numel()} {key} scales for {source_size} values, not one per "
                f"{BNB_BLOCKSIZE}; not a bitsandbytes blockwise 8-bit state moefuse knows"
            )
        parts.append(value[piece.start // BNB_BLOCKSIZE : -(-piece.stop // BNB_BLOCKSIZE)])
        offset += size
    return torch.cat(parts)


def _gather(planned: Planned, piece_states: list[dict], shapes: dict, out_name: str) -> dict:
    """The state of output parameter ``out_name`` from its pieces' sources' states (one per piece)."""
    pieces = planned.pieces
    for piece, state in zip(pieces, piece_states, strict=True):
        if state.keys() != piece_states[0].keys():
            raise CheckpointError(
                f"{_WHERE}: {pieces[0].name} has state {sorted(piece_states[0])}, {piece.name} has {sorted(state)}; "
                f"they become one parameter {out_name}, so they need the same"
            )
    eight_bit = any(
        isinstance(v, torch.Tensor) and v.dtype == torch.uint8
        for k, v in piece_states[0].items()
        if k.startswith("state")
    )
    out = {}
    for key in piece_states[0]:
        values = [state[key] for state in piece_states]
        if isinstance(values[0], dict):
            out[key] = _gather(planned, values, shapes, out_name)
        elif all(
            isinstance(v, torch.Tensor) and tuple(v.shape) == shapes[p.name]
            for v, p in zip(values, pieces, strict=True)
        ):
            if len({v.dtype for v in values}) != 1:
                raise CheckpointError(f"{_WHERE}: {key} of the parts of {out_name} mix dtypes")
            flat = [v.reshape(-1)[p.start : p.stop] for v, p in zip(values, pieces, strict=True)]
            out[key] = torch.cat(flat).view(planned.shape)
        elif key.startswith("absmax") and eight_bit:
            out[key] = _blocks(values, planned, shapes, out_name, key)
        else:
            for value, piece in zip(values[1:], pieces[1:], strict=True):
                if not _same(values[0], value):
                    raise CheckpointError(
                        f"{_WHERE}: {key} is {_show(values[0])} for {pieces[0].name} but {_show(value)} for "
                        f"{piece.name}; they become one parameter {out_name}, which holds one {key}"
                    )
            out[key] = _copy(values[0])
    return out


def convert_optimizer_state(
    state_dict: dict,
    layout: str,
    *,
    param_names: Sequence[str] | None = None,
    target_param_names: Sequence[str] | None = None,
) -> dict:
    """``state_dict`` (an optimizer's) for the model with its experts (or expert LoRA) in ``layout``.

    ``layout`` is a model layout of :data:`~moefuse.convert.LAYOUTS` or a LoRA layout (``fused``): expert
    weights go to the model layout, expert LoRA factors to the matching LoRA layout (``fused`` for
    ``transformers`` and ``veomni``). Works on name-keyed state dicts as they are; an index-keyed one needs
    ``param_names`` (its parameters' names in order) and comes back index-keyed, numbered in the order of
    ``target_param_names`` (the new optimizer's, from :func:`optimizer_param_names`) or else with each expert
    block's new parameters where its old ones were. Parameters outside expert blocks keep their state as it is.
    """
    groups = state_dict["param_groups"]
    keys = [key for group in groups for key in group["params"]]
    named = all(isinstance(key, str) for key in keys)
    if not named and param_names is None:
        raise ValueError(
            "an index-keyed optimizer state dict (optimizer.state_dict(), HF Trainer's optimizer.pt) needs "
            "param_names: the parameters' names in order, e.g. moefuse.convert.optimizer_param_names(model, optimizer)"
        )
    names = keys if named else list(param_names)
    if len(names) != len(keys):
        raise CheckpointError(f"{_WHERE}: has {len(keys)} parameters, param_names names {len(names)}")
    name_of = dict(zip(keys, names, strict=True))
    states = {name_of[key]: state for key, state in state_dict["state"].items()}
    references = {name: _reference(states.get(name, {})) for name in names}
    shapes = {name: tuple(ref.shape) if ref is not None else () for name, ref in references.items()}
    # Each state tensor is checked on its own when parts are joined; a block may mix 8- and 32-bit states.
    dtypes = dict.fromkeys(names, "state")

    model_layout, lora_layout = detect_layout(shapes, _WHERE), detect_lora_layout(shapes, _WHERE)
    if model_layout and lora_layout:
        raise CheckpointError(
            f"{_WHERE}: holds both expert weights and expert LoRA; convert one model at a time"
        )
    kind, in_layout = (MODEL, model_layout) if model_layout else (LORA, lora_layout)
    out_layout = (
        lora_layout_for(layout) if kind == LORA else ("transformers" if layout == "fused" else layout)
    )
    if kind == MODEL and out_layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    blocks = []
    if in_layout is not None:
        stateless = [name for name in names if not states.get(name) and names_expert(name, kind, in_layout)]
        if stateless:
            raise CheckpointError(
                f"{_WHERE}: {stateless[0]} has no state (the optimizer never updated it: did the expert receive "
                "no token?); its state cannot join its block's"
            )
        blocks = find_blocks(shapes, dtypes, kind, in_layout, _WHERE)
    plan = plan_conversion(shapes, dtypes, kind, in_layout, out_layout, blocks, _WHERE)

    group_of = {name_of[key]: i for i, group in enumerate(groups) for key in group["params"]}
    out_groups: list[list[str]] = [[] for _ in groups]
    out_states = {}
    for out_name, planned in plan.items():
        if len({group_of[piece.name] for piece in planned.pieces}) != 1:
            raise CheckpointError(
                f"{_WHERE}: the parts of {out_name} are in different parameter groups; they must share one"
            )
        out_groups[group_of[planned.pieces[0].name]].append(out_name)
        piece_states = [states.get(piece.name, {}) for piece in planned.pieces]
        if len(planned.pieces) == 1 and tuple(planned.shape) == shapes[planned.pieces[0].name]:
            state = _copy(piece_states[0])  # a parameter that keeps its shape keeps its state
        else:
            state = _gather(planned, piece_states, shapes, out_name)
        if state:
            out_states[out_name] = state
    if named:
        return {
            "state": out_states,
            "param_groups": [
                {**group, "params": params} for group, params in zip(groups, out_groups, strict=True)
            ],
        }

    target = list(target_param_names) if target_param_names is not None else list(plan)
    if sorted(target) != sorted(plan):
        odd = sorted(set(plan) ^ set(target))
        raise CheckpointError(
            f"{_WHERE}: target_param_names does not name the converted parameters ({odd[0]} is in one but not the "
            f"other); give the names of a model with its experts in the {out_layout} layout"
        )
    index = {name: i for i, name in enumerate(target)}
    return {
        "state": {index[name]: state for name, state in out_states.items()},
        "param_groups": [
            {**group, "params": sorted(index[name] for name in params)}
            for group, params in zip(groups, out_groups, strict=True)
        ],
    }
