"""Streaming, lossless conversion of MoE model checkpoints between the layouts of :mod:`.layouts`.

Expert tensors are only regrouped (never cast or computed on), so a round trip gives back the input bit for
bit; every other tensor is copied as it is. Data moves a piece at a time (see :mod:`.streaming`), so peak RAM
is a few MiB above the interpreter's, whatever the size of the model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .checkpoint import Checkpoint, CheckpointError
from .layouts import (
    FUSED_LAYOUTS,
    LAYOUTS,
    MODEL,
    PER_EXPERT_LAYOUTS,
    ExpertBlock,
    detect_layout,
    find_blocks,
    plan_conversion,
)
from .streaming import check_destination, copy_side_files, staged_output, verify_written, write_shards

# Where the configs of MoE families keep the number of routed experts.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX = "model.safetensors.index.json"
logger = logging.getLogger("moefuse.convert")


def report_left_behind(in_dir: Path, left_behind: list[str]) -> None:
    if left_behind:
        logger.warning(
            f"{in_dir}: not copied: {', '.join(left_behind)} (optimizer states are in the input's layout: convert "
            "them with moefuse.convert.convert_optimizer_state; folders are not copied)"
        )


def read_json(file: Path, what: str) -> dict:
    if not file.exists():
        raise CheckpointError(f"{file}: missing; {what} needs it, copy it from where the weights came from")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); restore the file") from e


def config_num_experts(config: dict) -> int | None:
    for section in (config, config.get("text_config") or {}):
        for key in _EXPERT_COUNT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def open_model(path: str | os.PathLike) -> tuple[Checkpoint, dict, str, list[ExpertBlock]]:
    """A model folder's checkpoint, config, expert layout and MoE blocks, or a one-line error saying why not."""
    path = Path(path)
    ckpt = Checkpoint.open(path)
    ckpt.check_dtypes()
    config = read_json(path / "config.json", "a model checkpoint")
    family = config.get("model_type", "unknown")
    layout = detect_layout(ckpt.shapes, path)
    if layout is None:
        if config_num_experts(config) is None:
            raise CheckpointError(
                f"{path}: a {family} model has no experts; moefuse converts MoE checkpoints "
                "(Qwen3-MoE, Qwen2-MoE, OLMoE, ...) only"
            )
        raise CheckpointError(
            f"{path}: the {family} expert tensors use names no moefuse layout knows (expected "
            "'<...>.mlp.experts.{e}.gate_proj.weight' or a fused layout); this model family is not supported"
        )
    blocks = find_blocks(ckpt.shapes, ckpt.dtypes, MODEL, layout, path)
    expected = config_num_experts(config)
    for block in blocks:
        if expected is not None and block.num_experts != expected:
            raise CheckpointError(
                f"{path / 'config.json'}: mismatched expert counts: it says {expected} experts, {block.prefix} "
                f"holds {block.num_experts}; use the config.json that came with these weights"
            )
    return ckpt, config, layout, blocks


def _architectures(config: dict, layout: str) -> list[str] | None:
    """``architectures`` for ``layout``: for Qwen3-MoE in the layouts only moefuse's classes load, those classes;
    otherwise the family's Transformers classes."""
    names = [name.replace("Qwen3MoeFused", "Qwen3Moe") for name in config.get("architectures") or []]
    if config.get("model_type") == "qwen3_moe" and layout in ("qwen3_moe_fused", "veomni"):
        names = [name.replace("Qwen3Moe", "Qwen3MoeFused") for name in names]
    return names or config.get("architectures")


def convert_model(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write the model checkpoint folder ``in_dir`` to ``out_dir`` with its experts in ``layout`` (any of
    :data:`~moefuse.convert.LAYOUTS`); the input may be in any layout.

    Shards of at most ``max_shard_size`` (``"5GB"``, or bytes) with an index; ``config.json`` is rewritten
    (``architectures``: ``Qwen3MoeFusedForCausalLM`` for Qwen3-MoE in the ``qwen3_moe_fused`` and ``veomni``
    layouts, the Transformers class otherwise) and the tokenizer, generation config and other small files are
    copied. The input is never written to; ``out_dir`` must be empty unless ``overwrite``. Returns
    ``out_dir``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_destination(in_dir, out_dir, overwrite)
    ckpt, config, in_layout, blocks = open_model(in_dir)
    if layout in PER_EXPERT_LAYOUTS and in_layout not in PER_EXPERT_LAYOUTS:
        check_loads_per_expert(config, in_dir)
    plan = plan_conversion(ckpt.shapes, ckpt.dtypes, MODEL, in_layout, layout, blocks, in_dir)
    with staged_output(out_dir) as staging:
        write_shards(plan, ckpt, staging, max_shard_size=max_shard_size, progress=progress)
        verify_written(staging, plan, INDEX)
        left_behind = copy_side_files(in_dir, staging, rewritten=("config.json",))
        config["architectures"] = _architectures(config, layout)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report_left_behind(in_dir, left_behind)
    return out_dir


def check_loads_per_expert(config: dict, where: object) -> None:
    """Refuse to write per-expert experts for a family that Transformers loads stacked only: its conversion
    mapping (what ``from_pretrained`` applies to a checkpoint's names) has no rule that stacks per-expert
    tensors, because the family's checkpoints are published stacked (e.g. Gemma 4, GPT-OSS)."""
    from transformers import __version__
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    families = [config.get("model_type"), (config.get("text_config") or {}).get("model_type")]
    families = [f for f in families if f]
    if not families:
        return  # no family named: nothing to check against
    for family in families:
        for rule in get_checkpoint_conversion_mapping(family) or []:
            sources = str(getattr(rule, "source_patterns", ""))
            if "experts.*." in sources and "experts." in str(getattr(rule, "target_patterns", "")):
                return
    raise CheckpointError(
        f"{where}: Transformers {__version__} loads {families[0]}'s experts stacked only (its checkpoints are "
        "published so), so a per-expert checkpoint would not load; keep the transformers layout, the one its "
        "checkpoints are published in"
    )


def convert_model_to_fused(
    in_dir: str | os.PathLike, out_dir: str | os.PathLike, layout: str = "transformers", **kwargs
) -> Path:
    """:func:`convert_model` into a fused layout: ``transformers`` (default: what Transformers 5.x and moefuse
    load directly), ``qwen3_moe_fused`` or ``veomni``."""
    if layout not in FUSED_LAYOUTS:
        raise ValueError(f"{layout!r} is not a fused layout; choose one of {', '.join(FUSED_LAYOUTS)}")
    return convert_model(in_dir, out_dir, layout, **kwargs)


def convert_model_to_unfused(in_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """:func:`convert_model` into the per-expert Hub layout that vLLM, SGLang and llama.cpp read."""
    return convert_model(in_dir, out_dir, "per_expert", **kwargs)
