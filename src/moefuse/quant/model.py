"""4-bit experts in a model: quantize in place, load, save and reload.

- :func:`quantize_experts` turns every experts module's ``gate_up_proj`` / ``down_proj`` into
  :class:`~moefuse.quant.ExpertWeights4bit`, one module at a time and a few experts at a time on the target
  device, so the bf16 stacks of the model never sit on the GPU together (a model held on the CPU sends each
  module's stack there in slices).
- :func:`from_pretrained` loads a checkpoint with Transformers and bitsandbytes (attention and other
  ``nn.Linear`` layers in 4-bit, as ``BitsAndBytesConfig`` asks), keeping it on the CPU, then quantizes the
  experts onto the device and moves the rest there. It also reloads what :func:`save_pretrained` wrote.
- :func:`save_pretrained` writes the 4-bit model (safetensors shards, bitsandbytes' components for its layers,
  :meth:`~moefuse.quant.ExpertWeights4bit.components` for the experts) and its config.

Why not ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` alone: Transformers' bitsandbytes
integration quantizes ``nn.Linear`` weights only and loads the expert stacks in bf16 straight onto the device
(too large for a 24 GB card with Qwen3-30B-A3B), and its save path splits the stacks back into per-expert
tensors; hooking expert quantization into it would mean replacing its registered quantizer class and patching
its weight conversions, which change between Transformers releases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .tensor import ExpertWeights4bit, is_4bit

PROJECTIONS = ("gate_up_proj", "down_proj")
CONFIG_KEY = "moefuse_quantization"  # config.json entry of a model whose experts are 4-bit
_BNB_STATE = "weight.quant_state.bitsandbytes__"  # bitsandbytes' marker of a serialized Linear4bit weight


def _settings(quantization_config: Any) -> dict[str, Any]:
    """Quant type, nesting and blocksize for the experts from a ``BitsAndBytesConfig`` (or its dict)."""
    if quantization_config is None:
        return {"quant_type": "nf4", "compress_statistics": True, "blocksize": 64, "skip_modules": []}
    config = (
        quantization_config.to_dict()
        if hasattr(quantization_config, "to_dict")
        else dict(quantization_config)
    )
    if not config.get("load_in_4bit", False):
        raise ValueError(
            "moefuse.quant needs a 4-bit BitsAndBytesConfig (load_in_4bit=True) for the experts; 8-bit experts are "
            "not supported"
        )
    storage = str(config.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if storage != "uint8":
        raise ValueError(
            f"bnb_4bit_quant_storage={storage} is not supported for the experts: moefuse stores them as uint8 "
            "(the default); drop the setting"
        )
    return {
        "quant_type": config.get("bnb_4bit_quant_type", "fp4"),
        "compress_statistics": bool(config.get("bnb_4bit_use_double_quant", False)),
        "blocksize": 64,  # bitsandbytes' Linear4bit blocksize; BitsAndBytesConfig has no setting for it
        "skip_modules": list(config.get("llm_int8_skip_modules") or []),
    }


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(key, experts)`` for every experts module of ``model`` (fused ``gate_up_proj`` / ``down_proj``),
    also inside PEFT layers."""
    from ..lora.targets import moefuse_experts

    return moefuse_experts(model)


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def quantize_experts(
    model: nn.Module,
    quantization_config: Any = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize the expert stacks of ``model`` to 4-bit in place (frozen), one experts module at a time.

    Args:
        model: a Transformers MoE model whose experts run on moefuse (``experts_implementation="moefuse"``).
        quantization_config: a ``BitsAndBytesConfig`` with ``load_in_4bit=True``: its ``bnb_4bit_quant_type``
            (``nf4`` or ``fp4``) and ``bnb_4bit_use_double_quant`` (nested absmax) apply to the experts, blocks
            of 64 as bitsandbytes' ``Linear4bit``; experts modules whose key contains an entry of
            ``llm_int8_skip_modules`` stay as they are. ``None``: NF4 with nested statistics.
        device: where the 4-bit stacks go (default: where each stack is). A stack on the CPU is sent there a
            few experts at a time.
        progress: a progress bar over the experts modules.

    Returns:
        ``model``, whose ``config.moefuse_quantization`` records the format. Experts compute in the dtype their
        weights had.
    """
    settings = _settings(quantization_config)
    targets = []
    for key, experts in experts_modules(model):
        if any(pattern in key for pattern in settings["skip_modules"]):
            continue
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        if implementation != "moefuse":
            raise ValueError(
                f"{key}: these experts run on '{implementation}'; 4-bit experts need moefuse's: load with "
                "experts_implementation='moefuse' or call model.set_experts_implementation('moefuse') first"
            )
        targets.append((key, experts))
    for _key, experts in tqdm(targets, desc="Quantizing experts to 4-bit", disable=not progress):
        for name in PROJECTIONS:
            weight = getattr(experts, name)
            if is_4bit(weight):
                continue
            quantized = ExpertWeights4bit.quantize(
                weight.data,
                settings["quant_type"],
                settings["blocksize"],
                settings["compress_statistics"],
                device=device,
            )
            # Replaced, not copied into: the dense stack is freed as soon as nothing else holds it.
            setattr(experts, name, nn.Parameter(quantized, requires_grad=False))
            del weight
    if targets:
        _record_format(model, settings)
    return model


def portable_cpu_linears(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' ``Linear4bit`` layers of ``model`` on its portable CPU path.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a ``Linear4bit`` weight in place at its first
    inference call and runs it on a kernel fetched from the Hugging Face Hub through the ``kernels`` package
    (which Transformers 5.25 installs). The repacking fails for layers narrower than a quantization block, and
    the fetch fails offline or for an untrusted publisher; the portable path computes the same products."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _record_format(model: nn.Module, settings: dict[str, Any]) -> None:
    """``config.moefuse_quantization``: how the experts are stored (read back by :func:`from_pretrained`)."""
    config = _config_of(model)
    if config is not None:
        fields = {k: settings[k] for k in ("quant_type", "blocksize", "compress_statistics")}
        setattr(config, CONFIG_KEY, {"experts": "bitsandbytes-4bit", **fields})


def _build(model_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """``model_class`` built from ``config``: an Auto class (``from_config``) or a model class."""
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, dtype=dtype)
    return model_class._from_config(config, dtype=dtype)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    quantization_config: Any = None,
    *,
    device: torch.device | str | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """A model with 4-bit experts (and bitsandbytes 4-bit linear layers) on ``device``.

    ``pretrained_model_name_or_path`` is a Transformers checkpoint (any layout Transformers or
    ``model_class`` reads), loaded with ``quantization_config`` (a ``BitsAndBytesConfig``; ``None`` leaves the
    linear layers in their dtype) and ``experts_implementation="moefuse"`` on the CPU, then
    :func:`quantize_experts` moves the experts to ``device`` in 4-bit and the rest follows. Host memory must
    hold the model in its checkpoint dtype while loading. A folder written by :func:`save_pretrained` is
    reloaded as it was saved (``quantization_config`` then does not apply).

    Args:
        device: default the current CUDA device, else the CPU.
        model_class: default ``transformers.AutoModelForCausalLM``.
        kwargs: passed to ``model_class.from_pretrained`` (``dtype``, ``revision``, ``attn_implementation``...).
    """
    device = torch.device(device) if device is not None else _default_device()
    path = Path(os.fspath(pretrained_model_name_or_path))
    if (path / "config.json").is_file() and CONFIG_KEY in json.loads((path / "config.json").read_text()):
        return load_quantized(path, device=device, model_class=model_class)
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs.setdefault("experts_implementation", "moefuse")
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = model_class.from_pretrained(pretrained_model_name_or_path, device_map="cpu", **kwargs)
    quantize_experts(model, quantization_config, device=device)
    return portable_cpu_linears(model.to(device))


def quantize_linears(
    model: nn.Module, quantization_config: Any, *, device: torch.device | str | None = None
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` (not its output embedding, nor those whose key contains an
    entry of ``llm_int8_skip_modules``) by bitsandbytes ``Linear4bit`` layers quantized from their weights, as
    Transformers' bitsandbytes integration does at load time; for models built in memory (random weights)."""
    import bitsandbytes as bnb

    settings = _settings(quantization_config)
    config = (
        quantization_config.to_dict()
        if hasattr(quantization_config, "to_dict")
        else dict(quantization_config)
    )
    compute_dtype = _dtype(config.get("bnb_4bit_compute_dtype")) or torch.float32
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for key, module in list(model.named_modules()):
        if (
            type(module) is not nn.Linear
            or module is output
            or any(p in key for p in settings["skip_modules"])
        ):
            continue
        target = torch.device(device) if device is not None else module.weight.device
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=settings["compress_statistics"],
            quant_type=settings["quant_type"],
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data,
            requires_grad=False,
            compress_statistics=settings["compress_statistics"],
            quant_type=settings["quant_type"],
            module=layer,
        ).to(target)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.to(target), requires_grad=module.bias.requires_grad)
        parent_key, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent_key) if parent_key else model, child, layer)
    if hasattr(model, "config"):
        model.config.quantization_config = config
    return portable_cpu_linears(model)


def from_config(
    config: Any,
    quantization_config: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    model_class: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A model of ``config`` with random weights, 4-bit experts and (given a ``BitsAndBytesConfig``)
    bitsandbytes 4-bit linear layers, built on ``device`` without ever holding more than one expert stack in
    ``dtype``: for benchmarks and tests at real dimensions (Qwen3-30B-A3B fits a 24 GB card this way).

    Weights are drawn from ``N(0, initializer_range)`` (norm weights 1, biases 0), as Transformers initialises
    these models."""
    from accelerate import init_empty_weights

    device = torch.device(device) if device is not None else _default_device()
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    config._experts_implementation = "moefuse"
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed for real
        model = _build(model_class, config, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)

    def random(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator).mul_(std)

    settings = _settings(quantization_config)
    for _, experts in tqdm(list(experts_modules(model)), desc="Random 4-bit experts", disable=not progress):
        for name in PROJECTIONS:
            quantized = ExpertWeights4bit.quantize(
                random(getattr(experts, name).shape),
                settings["quant_type"],
                settings["blocksize"],
                settings["compress_statistics"],
            )
            setattr(experts, name, nn.Parameter(quantized, requires_grad=False))
    for key, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        module_key, _, name = key.rpartition(".")
        module = model.get_submodule(module_key)
        if param.dim() >= 2:
            value = random(param.shape)
        elif "norm" in key.lower():
            value = torch.ones(param.shape, device=device, dtype=dtype)
        else:
            value = torch.zeros(param.shape, device=device, dtype=dtype)
        module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _record_format(model, settings)
    if quantization_config is not None:
        quantize_linears(model, quantization_config, device=device)
    return model.to(device)


# ---- save and reload ------------------------------------------------------------------------------------------


def _state_dict_4bit(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every 4-bit expert stack as its components, each tensor its own storage."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if is_4bit(value):
            state.update(value.components(key))
        else:
            state[key] = value.data if isinstance(value, nn.Parameter) else value
    seen: set[int] = set()
    for key, value in state.items():
        # Shared storage (e.g. one code table referenced by many layers) would be dropped by safetensors' writer.
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            state[key] = value.clone()
        seen.add(pointer)
    return state


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, *, max_shard_size: str | int = "5GB"
) -> None:
    """Write ``model`` with its 4-bit experts to ``save_directory``: ``config.json`` (with
    ``moefuse_quantization``, and ``quantization_config`` where bitsandbytes quantized its linear layers),
    safetensors shards with an index, and the generation config. Reload with :func:`from_pretrained`.

    Transformers' own ``save_pretrained`` cannot write these models: it would split the 4-bit stacks as if they
    were the dense ones. A PEFT adapter is saved as usual, alone (``peft_model.save_pretrained``).
    """
    from huggingface_hub import save_torch_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "this model holds PEFT adapter layers: save the adapter with peft_model.save_pretrained(...) and the "
            "4-bit base model before get_peft_model (or after peft_model.unload())"
        )
    config = _config_of(model)
    if config is None or getattr(config, CONFIG_KEY, None) is None:
        raise ValueError(
            "this model has no 4-bit experts (moefuse.quant.quantize_experts); use its save_pretrained"
        )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(_state_dict_4bit(model), out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(out)


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no safetensors files; save the model with moefuse.quant.save_pretrained"
        )
    return files


class _Tensors:
    """Every tensor of a checkpoint folder, read on demand onto ``device``."""

    def __init__(self, path: Path, device: torch.device):
        self._handles = [safe_open(str(f), framework="pt", device=str(device)) for f in _tensor_files(path)]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """``prefix`` and the keys under ``prefix.``."""
        return {k: self[k] for k in self._where if k == prefix or k.startswith(prefix + ".")}


def _linear4bit(
    linear: nn.Module, tensors: _Tensors, key: str, compute_dtype: torch.dtype, device: torch.device
):
    """A bitsandbytes Linear4bit for the ``nn.Linear`` at ``key``, with its saved 4-bit weight."""
    import bitsandbytes as bnb

    weight_key = f"{key}.weight"
    stats = {
        k.removeprefix(weight_key + "."): v for k, v in tensors.group(weight_key).items() if k != weight_key
    }
    quant_type = next(k.rsplit("__", 1)[1] for k in stats if k.startswith("quant_state.bitsandbytes__"))
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit.from_prequantized(
        data=tensors[weight_key], quantized_stats=stats, requires_grad=False, device=device, module=module
    )
    if linear.bias is not None:
        module.bias = nn.Parameter(tensors[f"{key}.bias"], requires_grad=linear.bias.requires_grad)
    return module


def load_quantized(
    path: str | os.PathLike, *, device: torch.device | str | None = None, model_class: Any = None
) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` on ``device``: built without allocating its weights,
    then each tensor read from the shards onto the device (4-bit experts, bitsandbytes layers, the rest)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(os.fspath(path))
    device = torch.device(device) if device is not None else _default_device()
    config = AutoConfig.from_pretrained(path)
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    config._experts_implementation = "moefuse"
    dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed for real
        model = _build(model_class, config, dtype)
    tensors = _Tensors(path, device)
    keys = set(tensors.keys())
    compute_dtype = _bnb_compute_dtype(config, dtype)

    bnb_modules = sorted({k.split(f".{_BNB_STATE}")[0] for k in keys if f".{_BNB_STATE}" in k})
    for module_key in bnb_modules:
        parent_key, _, child = module_key.rpartition(".")
        parent = model.get_submodule(parent_key) if parent_key else model
        setattr(
            parent, child, _linear4bit(getattr(parent, child), tensors, module_key, compute_dtype, device)
        )
    for module_key, experts in experts_modules(model):
        for name in PROJECTIONS:
            key = f"{module_key}.{name}"
            if any(k.startswith(f"{key}.quant_state.moefuse__") for k in keys):
                quantized = ExpertWeights4bit.from_components(tensors.group(key), key)
                setattr(experts, name, nn.Parameter(quantized, requires_grad=False))
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in keys or is_4bit(value) or any(key.startswith(m + ".") for m in bnb_modules):
            continue
        module_key, _, name = key.rpartition(".")
        module = model.get_submodule(module_key) if module_key else model
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensors[key], requires_grad=value.requires_grad)
        else:
            module._buffers[name] = tensors[key]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k, v in model.named_parameters() if v.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}"
        )
    return portable_cpu_linears(model.to(device).eval())


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))


def _bnb_compute_dtype(config: Any, default: torch.dtype) -> torch.dtype:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return default
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return _dtype(quantization.get("bnb_4bit_compute_dtype")) or default
