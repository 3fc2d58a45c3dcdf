"""LLaMA-Factory with moefuse experts: ``python -m moefuse.train.llamafactory CONFIG.yaml [key=value ...]``.

The YAML is LLaMA-Factory's, plus one key, ``custom_model_class`` (e.g. ``moefuse.Qwen3MoeFusedForCausalLM``):
the class is registered as ``AutoModelForCausalLM``'s model for its config class, so LLaMA-Factory's own loader
builds it, and the run goes on as ``llamafactory-cli train CONFIG.yaml`` would (released LLaMA-Factory, up to
0.9.5, has no ``custom_model_class`` key of its own). Launch several GPUs with ``torchrun --nproc-per-node N -m
moefuse.train.llamafactory CONFIG.yaml``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

CUSTOM_MODEL_CLASS = "custom_model_class"


def import_class(dotted: str) -> type:
    module_name, _, class_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(
            f"{CUSTOM_MODEL_CLASS}: cannot import '{dotted}' ({e}); give module.Class, "
            "e.g. moefuse.Qwen3MoeFusedForCausalLM"
        ) from e


def register_custom_model_class(dotted: str) -> type:
    """Make ``AutoModelForCausalLM`` build ``dotted`` for checkpoints of its config class."""
    from transformers import AutoModelForCausalLM

    cls = import_class(dotted)
    AutoModelForCausalLM.register(cls.config_class, cls, exist_ok=True)
    return cls


def read_config(argv: list[str]) -> dict[str, Any]:
    """LLaMA-Factory's reading of ``CONFIG.yaml key=value ...`` (OmegaConf, as ``llamafactory-cli`` does)."""
    from omegaconf import OmegaConf

    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise SystemExit("usage: python -m moefuse.train.llamafactory CONFIG.yaml [key=value ...]")
    path = Path(argv[0])
    if not path.is_file():
        raise SystemExit(f"{path}: no such config file")
    merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_cli(argv[1:]))
    return OmegaConf.to_container(merged)


def main(argv: list[str] | None = None) -> None:
    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as e:
        raise SystemExit(
            f"LLaMA-Factory is not importable ({e}); install it (pip install llamafactory), see the README"
        ) from e
    args = read_config(sys.argv[1:] if argv is None else argv)
    dotted = args.pop(CUSTOM_MODEL_CLASS, None)
    if dotted is None:
        raise SystemExit(f"{CUSTOM_MODEL_CLASS}: missing; set it to e.g. moefuse.Qwen3MoeFusedForCausalLM")
    register_custom_model_class(dotted)
    run_exp(args)


if __name__ == "__main__":
    main()
