"""``moefuse inspect``: what a checkpoint or adapter folder holds, and whether two hold the same tensors.

Two folders are compared up to layout: both are read in the per-expert layout (``<...>.mlp.experts.{e}.
gate_proj.weight``, or ``....gate_proj.lora_A.weight`` for adapters), a piece at a time, and every tensor's
dtype, shape and SHA-256 of its bytes are compared.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import engines, lora
from .layouts import LORA, MODEL, plan_conversion
from .model import open_model
from .peft_params import PEFT_LAYOUT, orientation


def _open(path: Path):
    """``(kind, checkpoint, config, layout, blocks)`` of a model or adapter folder."""
    if lora.is_adapter(path):
        return (LORA, *lora.open_adapter(path))
    return (MODEL, *open_model(path))


def tensor_hashes(path: str | os.PathLike) -> dict[str, str]:
    """``{per-expert name: "DTYPE[shape]:sha256"}`` of every tensor of a model or adapter folder, whatever its
    layout (read a piece at a time)."""
    path = Path(path)
    kind, ckpt, _, layout, blocks = _open(path)
    plan = plan_conversion(ckpt.shapes, ckpt.dtypes, kind, layout, "per_expert", blocks, path)
    hashes = {}
    for name, planned in plan.items():
        digest = hashlib.sha256()
        for chunk in ckpt.read_chunks(planned.pieces):
            digest.update(chunk.view(torch.uint8).numpy().data)
        hashes[name] = f"{planned.dtype}{list(planned.shape)}:{digest.hexdigest()}"
    ckpt.close()
    return hashes


@dataclass
class Difference:
    name: str
    first: str | None  # digest in the first folder, None when absent
    second: str | None


def compare(first: str | os.PathLike, second: str | os.PathLike) -> list[Difference]:
    """The tensors that differ between two model or adapter folders, up to layout (empty when they hold the
    same tensors)."""
    a, b = tensor_hashes(first), tensor_hashes(second)
    return [
        Difference(name, a.get(name), b.get(name)) for name in sorted(a | b) if a.get(name) != b.get(name)
    ]


def describe(path: str | os.PathLike) -> dict[str, object]:
    """Kind, layout, family, experts, dtypes, size and shards of a model or adapter folder, from headers only; for
    an adapter also the engines that read its layout as it is (a list, one line each)."""
    path = Path(path)
    kind, ckpt, config, layout, blocks = _open(path)
    dtypes = Counter(ckpt.dtypes.values())
    size = sum(ckpt.nbytes(name) for name in ckpt.shapes)
    rows: dict[str, object] = {
        "path": str(path),
        "kind": "model" if kind == MODEL else "LoRA adapter",
        "layout": layout,
    }
    if kind == MODEL:
        rows["model family"] = config.get("model_type", "unknown")
        rows["architectures"] = ", ".join(config.get("architectures") or []) or "-"
    else:
        targets = config.get("target_modules")
        rows["base model"] = config.get("base_model_name_or_path") or "-"
        rows["r / alpha"] = f"{config.get('r')} / {config.get('lora_alpha')}"
        rows["target modules"] = (
            targets if isinstance(targets, str) else ", ".join(sorted(targets or [])) or "-"
        )
        if layout == PEFT_LAYOUT:
            rows["target parameters"] = ", ".join(config.get("target_parameters") or []) or "-"
            rows["orientation"] = orientation(config)
        rows["engine names"] = ", ".join(engines.aliases_of(layout)) or "-"
        rows["read as is by"] = engines.readers(layout)
        warning = engines.single_scaling_warning(config)
        if warning:
            rows["scaling"] = warning
    rows["MoE blocks"] = len(blocks)
    rows["experts per block"] = ", ".join(sorted({str(b.num_experts) for b in blocks}))
    rows["tensors"] = len(ckpt.shapes)
    rows["dtypes"] = ", ".join(f"{dtype} ({count} tensors)" for dtype, count in sorted(dtypes.items()))
    rows["size"] = f"{size / 2**30:.3f} GiB ({size} bytes)"
    rows["shards"] = len(set(ckpt.files.values()))
    return rows
