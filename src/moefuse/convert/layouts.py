"""Checkpoint layouts of MoE expert weights, their detection, and a lazy view in Transformers' layout.

Layouts (``{p}`` is a block's MoE prefix, e.g. ``model.layers.3.mlp``; E experts, hidden H, intermediate I):

``per_expert``       ``{p}.experts.{e}.gate_proj.weight [I, H]``, ``...up_proj.weight [I, H]``,
                     ``...down_proj.weight [H, I]``: the Hub layout that vLLM, SGLang and llama.cpp read.
``transformers``     ``{p}.experts.gate_up_proj [E, 2I, H]``, ``{p}.experts.down_proj [E, H, I]``:
                     Transformers 5.x's in-memory layout.
``qwen3_moe_fused``  ``{p}.gate_proj.weight [E, I, H]``, ``{p}.up_proj.weight``, ``{p}.down_proj.weight [E, H, I]``:
                     transformers-qwen3-moe-fused.
``veomni``           ``{p}.experts.gate_proj [E, I, H]``, ``{p}.experts.up_proj``, ``{p}.experts.down_proj [E, H, I]``:
                     VeOmni and the Qwen3-30B-A3B-fused EP model card.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

LAYOUTS = ("per_expert", "transformers", "qwen3_moe_fused", "veomni")

_PATTERNS = {
    "per_expert": re.compile(r"^(?P<p>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"),
    "transformers": re.compile(r"^(?P<p>.+\.mlp)\.experts\.(?P<proj>gate_up|down)_proj$"),
    "veomni": re.compile(r"^(?P<p>.+\.mlp)\.experts\.(?P<proj>gate|up|down)_proj$"),
    "qwen3_moe_fused": re.compile(r"^(?P<p>.+\.mlp)\.(?P<proj>gate|up|down)_proj\.weight$"),
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the file and the fix."""


@dataclass
class Checkpoint:
    """The safetensors files of a checkpoint folder, read lazily: names and shapes come from the headers."""

    path: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: not a folder; give the folder that holds config.json and *.safetensors"
            )
        ckpt = cls(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{index}: not a safetensors index ({e}); restore or remove the file"
                ) from e
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in path.glob("*.safetensors"))
            if not shard_names:
                raise CheckpointError(
                    f"{path}: no *.safetensors files; moefuse reads safetensors checkpoints only"
                )
        for name in shard_names:
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{file}: missing shard named by {index.name}; download it again")
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        ckpt.files[key] = file
                        ckpt.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise CheckpointError(f"{file}: unreadable safetensors file ({e}); download it again") from e
        return ckpt

    def tensor(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)


def detect_layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The expert layout of a checkpoint given its tensor names and shapes; ``None`` when it holds no experts."""
    # experts.down_proj is shared by transformers and veomni: tell them apart by the gate tensor.
    for layout, gate in (("per_expert", "gate"), ("transformers", "gate_up"), ("veomni", "gate")):
        if any((m := _PATTERNS[layout].match(k)) and m["proj"] == gate for k in shapes):
            return layout
    # Dense MLPs also have mlp.gate_proj.weight: only 3-D stacks are fused experts.
    if any(_PATTERNS["qwen3_moe_fused"].match(k) and len(s) == 3 for k, s in shapes.items()):
        return "qwen3_moe_fused"
    return None


class TransformersLayoutView(Mapping):
    """A read-only ``{name: tensor}`` view of a ``qwen3_moe_fused`` or ``veomni`` checkpoint in Transformers'
    layout. Tensors are read from disk when asked for, so a model can be loaded from it one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, layout: str):
        if layout not in ("qwen3_moe_fused", "veomni"):
            raise ValueError(
                f"TransformersLayoutView reads qwen3_moe_fused or veomni checkpoints, not {layout}"
            )
        self._ckpt = ckpt
        self._sources: dict[str, tuple[str, ...]] = {}
        pattern = _PATTERNS[layout]
        for key, shape in ckpt.shapes.items():
            m = pattern.match(key)
            if m is None or len(shape) != 3:
                self._sources[key] = (key,)
                continue
            prefix, proj = m["p"], m["proj"]
            if proj == "down":
                self._sources[f"{prefix}.experts.down_proj"] = (key,)
            else:
                self._sources[f"{prefix}.experts.gate_up_proj"] = tuple(
                    f"{prefix}.experts.{p}_proj" if layout == "veomni" else f"{prefix}.{p}_proj.weight"
                    for p in ("gate", "up")
                )
        for target, sources in self._sources.items():
            missing = [s for s in sources if s not in ckpt.shapes]
            if missing:
                raise CheckpointError(f"{ckpt.path}: {target} needs {missing[0]}, which no shard holds")

    def __getitem__(self, key: str) -> torch.Tensor:
        sources = self._sources[key]
        if len(sources) == 1:
            return self._ckpt.tensor(sources[0])
        return torch.cat([self._ckpt.tensor(s) for s in sources], dim=1)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
