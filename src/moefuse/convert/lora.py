"""LoRA adapters on MoE experts, converted losslessly between PEFT's per-expert format and the fused ones.

The layouts are those of :mod:`.layouts` (``per_expert``, ``fused``, ``qwen3_moe_fused``,
``peft_target_parameters``, ``mixtral``): the fused factors are the per-expert ones stacked on a new first dimension (expert
``e`` is ``[e]``), gate, up and down kept apart, so every conversion among them is an exact copy. PEFT's
``target_parameters`` factors are read and written through a view in the ``fused`` layout
(:mod:`.peft_params`): exact too, gate and up sharing one A, or stacked at rank 2r. moefuse's LoRA on
``gate_up_proj`` (gate and up together, one A) is read as gate and up apart, both with that A, and the ``fused``
layout is written so again wherever every block's gate and up share one A: exact as well.
Other adapter tensors (attention, router, shared experts) are copied unchanged.

``adapter_config.json`` is rewritten: ``rank_pattern`` / ``alpha_pattern`` keys naming experts
(``<...>.experts.3.gate_proj`` per expert, ``<...>.experts.gate_proj`` fused, ``<...>.mlp.gate_proj`` in
``qwen3_moe_fused``) are renamed for the new layout; ``target_modules`` (``gate_proj``, ``up_proj``,
``down_proj``) reach the experts in every layout, and are renamed to and from Mixtral's ``w1``/``w3``/``w2``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError, DerivedCheckpoint, Piece
from .engines import ALIASES, resolve
from .layouts import (
    BLOCK,
    LORA,
    LORA_LAYOUTS,
    MIXTRAL_BLOCK,
    MIXTRAL_NAMES,
    PER_EXPERT_LAYOUTS,
    PLANNED_AS,
    ExpertBlock,
    Planned,
    detect_lora_layout,
    find_blocks,
    mixtral_stem,
    plan_conversion,
    read_planned,
)
from .model import read_json, report_left_behind
from .peft_params import PEFT_LAYOUT, config_from_peft, config_to_peft, fused_view, packed
from .streaming import check_destination, copy_side_files, staged_output, verify_written, write_shards

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_INDEX = "adapter_model.safetensors.index.json"  # PEFT writes one file; an index never exists
_PATTERN_KEYS = {
    "per_expert": re.compile(r"^(?P<head>.*)\.experts\.(?P<e>\d+)\.(?P<proj>(gate|up|down)_proj)$"),
    "fused": re.compile(r"^(?P<head>.*)\.experts\.(?P<proj>(gate|up|down)_proj)$"),
    "qwen3_moe_fused": re.compile(r"^(?P<head>(.*\.)?mlp)\.(?P<proj>(gate|up|down)_proj)$"),
    "mixtral": re.compile(r"^(?P<head>.*)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<proj>w[123])$"),
}
_FROM_MIXTRAL = {w: f"{p}_proj" for p, w in MIXTRAL_NAMES.items()}
_EXPERT_TARGET = re.compile(r"experts\.(gate|up|down)_proj")
_TO_MIXTRAL = {v: k for k, v in _FROM_MIXTRAL.items()}


# moefuse's LoRA on gate and up together: lora_A [E, r, H] for both, lora_B [E, 2I, r] (gate rows first).
_GATE_UP = re.compile(r"^(?P<head>.+\.experts)\.gate_up_proj\.(?P<factor>lora_[AB](?:\.[\w-]+)?)\.weight$")


def gate_up_apart(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with each ``gate_up_proj`` LoRA pair read as ``gate_proj`` and ``up_proj`` pairs: its A for both,
    its B's gate and up rows. Exact: every expert's gate and up outputs are those of the pair together, for
    experts that store the gate rows, then the up rows; an adapter of experts that interleave them (GPT-OSS) keeps
    its meaning only whole, as ``peft_target_parameters``."""
    found = {n: m for n, s in ckpt.shapes.items() if (m := _GATE_UP.match(n)) is not None and len(s) == 3}
    if not found:
        return ckpt
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    groups = {}
    for name, shape in ckpt.shapes.items():
        m = found.get(name)
        if m is None:
            shapes[name], dtypes[name] = shape, ckpt.dtypes[name]
            continue
        num_experts, rows, cols = shape
        is_b = m["factor"].startswith("lora_B")
        apart = [f"{m['head']}.{proj}.{m['factor']}.weight" for proj in ("gate_proj", "up_proj")]
        for new in apart:
            shapes[new], dtypes[new] = (num_experts, rows // 2, cols) if is_b else shape, ckpt.dtypes[name]

        def make(name=name, apart=apart, is_b=is_b) -> dict:
            t = ckpt.tensor(name)
            return dict(zip(apart, t.chunk(2, dim=1) if is_b else (t, t), strict=True))

        groups.update(dict.fromkeys(apart, make))
    return DerivedCheckpoint(ckpt, shapes, dtypes, groups)


def config_gate_up_apart(config: dict, where: object) -> dict:
    """An adapter config with ``gate_up_proj`` targets and pattern keys named as ``gate_proj`` and ``up_proj``
    (what :func:`gate_up_apart` turns its factors into)."""
    config = dict(config)
    targets = config.get("target_modules")
    if isinstance(targets, str) and "gate_up_proj" in targets:
        raise CheckpointError(
            f"{where}: target_modules is the pattern {targets!r}, which names gate_up_proj; moefuse rewrites lists "
            "of names only: give target_modules as a list"
        )
    if isinstance(targets, list):  # gate_up_proj, or experts.gate_up_proj, names gate and up
        config["target_modules"] = sorted(_apart_names(dict.fromkeys(targets)))
    for kind in ("rank_pattern", "alpha_pattern"):
        if config.get(kind):
            config[kind] = _apart_names(config[kind])
    return config


def _apart_names(names: dict) -> dict:
    """``names`` (target names or pattern keys, with their values) with each ``<stem>gate_up_proj`` as
    ``<stem>gate_proj`` and ``<stem>up_proj``, both with its value."""
    return {
        new: value
        for name, value in names.items()
        for new in (
            [name.removesuffix("gate_up_proj") + p for p in ("gate_proj", "up_proj")]
            if name.endswith("gate_up_proj")
            else [name]
        )
    }


def gate_up_joined(
    ckpt: Checkpoint, plan: dict[str, Planned], blocks: list[ExpertBlock], config: dict
) -> tuple[Checkpoint, dict[str, Planned], dict] | None:
    """A plan into the ``fused`` layout with every block's gate_proj and up_proj pairs written as one gate_up_proj
    pair (A, and B = [B_gate; B_up]) with its config, where every block's gate and up share one A, so that the
    adapter trains on moefuse as it was trained: an adapter from LoRA on gate_up_proj, or from PEFT's
    ``target_parameters``. None where any block's differ, or gate/up LoRA or names elsewhere (a shared expert's)
    would be caught up in the renaming: all stay apart then."""
    if any(re.search(r"\.(gate|up)_proj\.lora_", n) and ".experts." not in n for n in plan):
        return None
    pairs: dict[str, dict[tuple[str, str], str]] = {}
    for block in blocks:
        names = {
            (p, f): f"{block.prefix}.experts.{p}.lora_{f}.weight"
            for p in ("gate_proj", "up_proj")
            for f in "AB"
        }
        if not all(name in plan for name in names.values()) or not torch.equal(
            read_planned(ckpt, plan[names["gate_proj", "A"]]), read_planned(ckpt, plan[names["up_proj", "A"]])
        ):
            return None
        pairs[block.prefix] = names
    config = dict(config)
    for kind in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(kind) or {}
        joined_patterns = _joined_names(patterns)
        if joined_patterns is None:
            return None
        if patterns:
            config[kind] = joined_patterns
    targets = config.get("target_modules")
    joined_targets = _joined_names(dict.fromkeys(targets)) if isinstance(targets, list) else None
    if joined_targets is None:
        return None
    config["target_modules"] = sorted(joined_targets)

    shapes, dtypes = dict(ckpt.shapes), dict(ckpt.dtypes)
    groups = {}
    for prefix, names in pairs.items():
        joined = {f: f"{prefix}.experts.gate_up_proj.lora_{f}.weight" for f in "AB"}

        def make(names=names, joined=joined) -> dict[str, torch.Tensor]:
            gate_b, up_b = (read_planned(ckpt, plan[names[p, "B"]]) for p in ("gate_proj", "up_proj"))
            return {
                joined["A"]: read_planned(ckpt, plan[names["gate_proj", "A"]]),
                joined["B"]: torch.cat([gate_b, up_b], dim=1),
            }

        groups.update(dict.fromkeys(joined.values(), make))
    # gate's factors' places in the plan take the joined ones; up's are left out
    firsts = {names["gate_proj", f]: (prefix, f) for prefix, names in pairs.items() for f in "AB"}
    dropped = {names["up_proj", f] for names in pairs.values() for f in "AB"}
    joined_plan: dict[str, Planned] = {}
    for name, planned in plan.items():
        if name in dropped:
            continue
        if name not in firsts:
            joined_plan[name] = planned
            continue
        prefix, factor = firsts[name]
        joined_name = f"{prefix}.experts.gate_up_proj.lora_{factor}.weight"
        num_experts, rows, cols = planned.shape
        shape = (num_experts, 2 * rows, cols) if factor == "B" else planned.shape
        shapes[joined_name], dtypes[joined_name] = shape, planned.dtype
        joined_plan[joined_name] = Planned(shape, planned.dtype, [Piece(joined_name, 0, math.prod(shape))])
    return DerivedCheckpoint(ckpt, shapes, dtypes, groups), joined_plan, config


def _joined_names(names: dict) -> dict | None:
    """``names`` (target names or pattern keys, with their values) with each ``<stem>gate_proj`` and
    ``<stem>up_proj`` pair as one ``<stem>gate_up_proj`` (their values equal); None where one of a pair is missing
    or their values differ."""
    joined: dict = {}
    for name, value in names.items():
        stem = name.removesuffix("gate_proj").removesuffix("up_proj")
        # other names stay: gate_up_proj itself, and other modules' (w_gate_proj)
        if stem == name or stem.endswith("gate_") or (stem and not stem.endswith(".")):
            joined[name] = value
            continue
        gate, up = f"{stem}gate_proj", f"{stem}up_proj"
        if gate not in names or up not in names or names[gate] != names[up]:
            return None
        joined[f"{stem}gate_up_proj"] = value
    return joined


def _opened(path: Path) -> Checkpoint:
    return gate_up_apart(Checkpoint.open(path, _INDEX))


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def adapter_layout(path: str | os.PathLike) -> str | None:
    """The layout of an adapter folder's expert LoRA (read from its safetensors headers); ``None`` without LoRA
    on experts."""
    return detect_lora_layout(_opened(Path(path)).shapes, path)


def open_adapter(path: str | os.PathLike) -> tuple[Checkpoint, dict, str, list[ExpertBlock]]:
    """An adapter folder's tensors, config, LoRA layout and expert blocks, or a one-line error saying why not."""
    path = Path(path)
    config = read_json(path / ADAPTER_CONFIG, "a PEFT adapter")
    ckpt = _opened(path)
    ckpt.check_dtypes()
    if isinstance(ckpt, DerivedCheckpoint):  # LoRA on gate_up_proj, read as gate and up apart
        config = config_gate_up_apart(config, path / ADAPTER_CONFIG)
    layout = detect_lora_layout(ckpt.shapes, path)
    if layout is None:
        raise CheckpointError(
            f"{path}: an adapter without LoRA on experts (no '<...>.experts.[e.]gate_proj.lora_A.weight'); "
            "nothing to convert, use it as it is"
        )
    if layout == PEFT_LAYOUT:
        ckpt = fused_view(ckpt, config, path)
    return ckpt, config, layout, find_blocks(ckpt.shapes, ckpt.dtypes, LORA, layout, path)


def _interleaving_base(config: dict) -> str | None:
    """The model type of the adapter's base model where its experts interleave gate and up rows (GPT-OSS), so that
    LoRA on gate_up_proj keeps its meaning only whole; ``None`` where they do not, or where the base
    (``base_model_name_or_path``) is not a local folder with a ``config.json`` (its experts are then not known)."""
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    from ..bench.shapes import meta_moe_blocks
    from ..experts import UnsupportedExpertsError, gate_and_up_apart

    base_config = AutoConfig.from_pretrained(base)
    try:
        experts = meta_moe_blocks(base_config)[0].experts
    except UnsupportedExpertsError:
        return None
    return None if gate_and_up_apart(experts) else base_config.model_type


def _gate_up_targeted(config: dict) -> bool:
    """Whether the adapter's config targets the stacked gate_up_proj (PEFT's target_parameters or moefuse's)."""
    return any(
        "gate_up_proj" in str(config.get(key) or "") for key in ("target_modules", "target_parameters")
    )


def _refuse_split_of_interleaved(config: dict, layout: str, where: Path) -> None:
    """A one-line error where writing ``layout`` would split an interleaving base's gate_up_proj LoRA."""
    if layout in (PEFT_LAYOUT, "fused") or not _gate_up_targeted(config):
        return
    model_type = _interleaving_base(config)
    if model_type is not None:
        raise CheckpointError(
            f"{where}: the adapter's LoRA on gate_up_proj cannot be split into gate_proj and up_proj for "
            f"{layout}: its base model ({config['base_model_name_or_path']}, model type '{model_type}') interleaves "
            "gate and up rows; convert to peft_target_parameters (vllm_3d) or fused, which keep it whole"
        )


def _rewrite_patterns(patterns: dict, in_layout: str, out_layout: str, num_experts: int, where: Path) -> dict:
    """``rank_pattern`` / ``alpha_pattern`` keys naming expert projections, in ``out_layout``'s naming."""
    out: dict = {}
    for key, value in patterns.items():
        m = _PATTERN_KEYS[in_layout].match(key)
        if m is None or in_layout == out_layout:
            out[key] = value
            continue
        # the block's prefix, without ".experts" (Mixtral's block_sparse_moe stands for mlp), and the projection
        head, proj = m["head"], m["proj"]
        if in_layout == "mixtral":
            head, proj = head + BLOCK, _FROM_MIXTRAL[proj]
        if out_layout == "per_expert":
            keys = [f"{head}.experts.{e}.{proj}" for e in range(num_experts)]
        elif out_layout == "mixtral":
            stem = mixtral_stem(head)
            keys = [f"{stem}{MIXTRAL_BLOCK}.experts.{e}.{_TO_MIXTRAL[proj]}" for e in range(num_experts)]
        elif out_layout == "fused":
            keys = [f"{head}.experts.{proj}"]
        else:
            keys = [f"{head}.{proj}"]
        for target in keys:
            if out.setdefault(target, value) != value:
                raise CheckpointError(
                    f"{where}: experts of {target} have different values ({out[target]}, {value}) in "
                    "rank_pattern/alpha_pattern; a fused adapter holds one rank and alpha per projection"
                )
    return out


def convert_lora(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the PEFT adapter folder ``in_dir`` to ``out_dir`` with its expert LoRA in ``layout`` (any of
    :data:`~moefuse.convert.LORA_LAYOUTS`, or an engine's name for one of them, :data:`.engines.ALIASES`); the input
    may be in any of them. Returns ``out_dir``."""
    layout = resolve(layout)
    if layout not in LORA_LAYOUTS:
        raise ValueError(
            f"unknown LoRA layout {layout!r}; choose one of {', '.join((*LORA_LAYOUTS, *ALIASES))}"
        )
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_destination(in_dir, out_dir, overwrite)
    written_config = read_json(in_dir / ADAPTER_CONFIG, "a PEFT adapter")  # as written, before any renaming
    _refuse_split_of_interleaved(written_config, layout, in_dir)
    ckpt, config, in_layout, blocks = open_adapter(in_dir)
    plan = plan_conversion(ckpt.shapes, ckpt.dtypes, LORA, in_layout, layout, blocks, in_dir)
    num_experts = max(block.num_experts for block in blocks)
    where = in_dir / ADAPTER_CONFIG
    if in_layout == PEFT_LAYOUT and layout != PEFT_LAYOUT:
        config = config_from_peft(config, blocks, where)
    if layout in PER_EXPERT_LAYOUTS and isinstance(config.get("target_modules"), list):
        # "experts.gate_proj" names the fused experts' projection; a per-expert module is experts.<e>.gate_proj
        config["target_modules"] = sorted(
            {
                t.removeprefix("experts.") if _EXPERT_TARGET.fullmatch(t) else t
                for t in config["target_modules"]
            }
        )
    if (in_layout == "mixtral") != (layout == "mixtral") and isinstance(config.get("target_modules"), list):
        names = _FROM_MIXTRAL if in_layout == "mixtral" else _TO_MIXTRAL
        config["target_modules"] = sorted({names.get(t, t) for t in config["target_modules"]})
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):  # PEFT's layout names its patterns as the fused one's (plus gate_up_proj)
            config[key] = _rewrite_patterns(
                config[key],
                PLANNED_AS.get(in_layout, in_layout),
                PLANNED_AS.get(layout, layout),
                num_experts,
                where,
            )
    if layout == "fused" and (joined := gate_up_joined(ckpt, plan, blocks, config)) is not None:
        ckpt, plan, config = joined
    elif layout == "fused":  # gate and up apart
        _refuse_split_of_interleaved(written_config, "fused apart", in_dir)
    if layout == PEFT_LAYOUT:
        ckpt, plan, gate_up_ranks = packed(ckpt, plan, blocks, in_dir)
        if in_layout != PEFT_LAYOUT:
            config = config_to_peft(config, blocks, gate_up_ranks, list(plan), where)
    with staged_output(out_dir) as staging:
        write_shards(
            plan,
            ckpt,
            staging,
            max_shard_size=2**62,  # one file, as PEFT writes and reads adapters
            filename_pattern="adapter_model{suffix}.safetensors",
            index_name=_INDEX,
            progress=progress,
        )
        verify_written(staging, plan, _INDEX)
        left_behind = copy_side_files(in_dir, staging, rewritten=(ADAPTER_CONFIG,))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report_left_behind(in_dir, left_behind)
    return out_dir


def convert_lora_to_fused(
    in_dir: str | os.PathLike, out_dir: str | os.PathLike, layout: str = "fused", **kwargs
) -> Path:
    """:func:`convert_lora` into a fused layout: ``fused`` (default: what moefuse's LoRA loads) or
    ``qwen3_moe_fused``."""
    if layout == "per_expert":
        raise ValueError("'per_expert' is not a fused layout; choose fused or qwen3_moe_fused")
    return convert_lora(in_dir, out_dir, layout, **kwargs)


def convert_lora_to_unfused(in_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """:func:`convert_lora` into PEFT's per-expert adapter layout (per-expert ``nn.Linear`` experts, vLLM)."""
    return convert_lora(in_dir, out_dir, "per_expert", **kwargs)
