"""How PEFT finds the experts: ``target_modules`` names ``gate_proj``/``up_proj``/``down_proj``, or
``gate_up_proj``.

Transformers stores a block's experts as one module (``mlp.experts``) with stacked parameters, so PEFT, which
matches module names, sees no ``mlp.experts.gate_proj``. :func:`install` (run by ``import moefuse``) adds one
rule to PEFT's LoRA injection: an experts module running on moefuse is targeted when any of
``<key>.gate_proj``, ``<key>.up_proj``, ``<key>.gate_up_proj``, ``<key>.down_proj`` is, judged by PEFT's own
matcher (so lists, regexes, ``exclude_modules`` and ``layers_to_transform`` behave as for any module), and it
becomes an :class:`~moefuse.lora.layer.ExpertsLoraLayer` through PEFT's custom-module mechanism. Each
projection's rank, alpha, rsLoRA and init come from the config for ``<key>.<projection>``. ``gate_proj`` and
``up_proj`` adapt gate and up apart (as PEFT's LoRA on per-expert ``nn.Linear`` experts); ``gate_up_proj``
adapts them together, one A for both (as PEFT's ``target_parameters`` on the stacked weight); an adapter takes
one way or the other. ``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter`` and ``load_adapter``
all go through this injection.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from ..experts import EXPERTS_IMPLEMENTATION, check_lora_supported

PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
_REQUESTS = (
    "_moefuse_lora_requests"  # attribute of an experts module: what the injection in progress asks for
)
_TARGETED = "_moefuse_experts_keys"  # attribute of a LoraConfig: experts module keys it targets
_PATTERN_KEYS = "_moefuse_pattern_keys"  # attribute of a LoraConfig: rank/alpha_pattern keys moefuse applied
# PEFT >= 0.21 warns about pattern keys that name no targeted module: the experts' projections are not modules
# (>= 0.22 says "module or parameter").
_UNMATCHED = re.compile(
    r"^The following (?:rank|alpha)_pattern keys did not match any targeted module(?: or parameter)? and were "
    r"ignored: (\[.*\])\.$"
)


@dataclass(frozen=True)
class ProjectionRequest:
    """What one adapter asks for on one projection of an experts module."""

    projection: str
    r: int
    lora_alpha: float
    use_rslora: bool
    dropout: float
    init_lora_weights: bool | str
    pattern_keys: tuple[str, ...] = ()  # the rank_pattern / alpha_pattern keys that set r and lora_alpha

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _is_targeted(config: LoraConfig, key: str) -> bool:
    # PEFT's matcher returns a falsy marker object for excluded modules.
    return bool(check_target_module_exists(config, key))


def projection_requests(config: LoraConfig, experts_key: str) -> list[ProjectionRequest]:
    """The projections of the experts at ``experts_key`` that ``config`` targets, with their settings."""
    requests = []
    for projection in PROJECTIONS:
        key = f"{experts_key}.{projection}"
        if not _is_targeted(config, key):
            continue
        rank_key = get_pattern_key(config.rank_pattern.keys(), key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), key)
        r = config.rank_pattern.get(rank_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        pattern_keys = tuple(
            k
            for k, patterns in ((rank_key, config.rank_pattern), (alpha_key, config.alpha_pattern))
            if k in patterns
        )
        requests.append(
            ProjectionRequest(
                projection,
                r,
                alpha,
                config.use_rslora,
                config.lora_dropout,
                config.init_lora_weights,
                pattern_keys,
            )
        )
    named = {request.projection for request in requests}
    if "gate_up_proj" in named and named & {"gate_proj", "up_proj"}:
        raise ValueError(
            f"target_modules reach {experts_key}'s gate_up_proj (gate and up together) and "
            f"{' and '.join(sorted(named & {'gate_proj', 'up_proj'}))} (apart); target one way or the other"
        )
    return requests


def _check_config(config: LoraConfig, experts_key: str) -> None:
    unsupported = [
        name
        for name, on in (
            ("use_dora", config.use_dora),
            ("lora_bias", getattr(config, "lora_bias", False)),
            ("fan_in_fan_out", config.fan_in_fan_out),
        )
        if on
    ]
    if unsupported:
        raise ValueError(
            f"LoRA on the moefuse experts at {experts_key} does not support {', '.join(unsupported)}; "
            "set them to False, or leave gate_proj/up_proj/gate_up_proj/down_proj out of target_modules"
        )


def take_request(experts: nn.Module) -> list[ProjectionRequest]:
    """The requests :func:`install`'s hook left on ``experts`` for the adapter being added (consumed)."""
    requests = experts.__dict__.pop(_REQUESTS, None)
    if requests is None:
        raise RuntimeError(
            f"{type(experts).__name__}: moefuse experts LoRA layers are created by PEFT's injection "
            "(get_peft_model, PeftModel.from_pretrained, add_adapter, load_adapter) after `import moefuse`"
        )
    return requests


def moefuse_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(key, experts)`` for every experts module of ``model`` that runs on moefuse (wrapped by LoRA or not)."""
    from .layer import ExpertsLoraLayer

    wrapped: list[str] = []
    for key, module in model.named_modules():
        if any(key.startswith(prefix) for prefix in wrapped):
            continue  # inside a LoRA layer: its base experts were reported under the layer's key
        if isinstance(module, BaseTunerLayer):
            wrapped.append(key + ".")
            if not isinstance(module, ExpertsLoraLayer):
                continue
        experts = module.get_base_layer() if isinstance(module, ExpertsLoraLayer) else module
        if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) and isinstance(
            getattr(experts, "down_proj", None), nn.Parameter
        ):
            yield key, experts


def _runs_on_moefuse(experts: nn.Module) -> bool:
    return (
        getattr(getattr(experts, "config", None), "_experts_implementation", None) == EXPERTS_IMPLEMENTATION
    )


def prepare_experts_targets(config: LoraConfig, model: nn.Module) -> None:
    """Mark the experts modules ``config`` targets through their projection names (PEFT ``_prepare_model`` hook)."""
    from .layer import ExpertsLoraLayer

    targeted, pattern_keys = set(), set()
    for key, experts in moefuse_experts(model):
        requests = projection_requests(config, key)
        if not requests:
            continue
        if not _runs_on_moefuse(experts):
            warnings.warn(
                f"{key}: target_modules name expert projections but these experts run on "
                f"'{getattr(experts.config, '_experts_implementation', None)}'; they get LoRA only with "
                f"experts_implementation='{EXPERTS_IMPLEMENTATION}' (or use PEFT's target_parameters)",
                stacklevel=3,
            )
            continue
        check_lora_supported(experts, [request.projection for request in requests])
        _check_config(config, key)
        experts.__dict__[_REQUESTS] = requests
        config._register_custom_module({type(experts): ExpertsLoraLayer})
        targeted.add(key)
        pattern_keys.update(k for request in requests for k in request.pattern_keys)
    setattr(config, _TARGETED, frozenset(targeted))
    setattr(config, _PATTERN_KEYS, frozenset(pattern_keys))


def _targets_moefuse_experts(config: LoraConfig, model: nn.Module) -> bool:
    if config.target_modules is None:
        return False
    return any(
        _runs_on_moefuse(experts) and projection_requests(config, key)
        for key, experts in moefuse_experts(model)
    )


def _keep_projection_targets() -> None:
    """PEFT >= 0.21 rewrites ``gate_proj``/``up_proj``/``down_proj`` targets of some MoE families into
    ``target_parameters`` on the stacked weights (for adapters trained on Transformers 4); leave configs that
    target moefuse experts as they are, so the experts get the per-projection layer instead."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # PEFT < 0.21 has no such rewrite
        return
    convert = conversion.convert_peft_config_for_transformers

    def convert_peft_config_for_transformers(peft_config, model, conversions):
        if isinstance(peft_config, LoraConfig) and _targets_moefuse_experts(peft_config, model):
            return None
        return convert(peft_config, model, conversions)

    conversion.convert_peft_config_for_transformers = convert_peft_config_for_transformers


def install() -> None:
    """Teach PEFT's LoRA injection to target moefuse experts by projection name (idempotent)."""
    if getattr(LoraModel._prepare_model, "_moefuse", False):
        return
    _keep_projection_targets()
    prepare_model = LoraModel._prepare_model
    check_target = LoraModel._check_target_module_exists

    def _prepare_model(self, peft_config, model):
        prepare_model(self, peft_config, model)
        if isinstance(peft_config, LoraConfig):
            prepare_experts_targets(peft_config, model)

    def _check_target_module_exists(peft_config, key):
        result = check_target(peft_config, key)
        if not result and key in getattr(peft_config, _TARGETED, ()):
            return True
        return result

    inject = LoraModel.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        # PEFT's warning that pattern keys "were ignored" leaves out the keys moefuse applied to the experts.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = inject(self, model, adapter_name, *args, **kwargs)
        applied = getattr(self.peft_config.get(adapter_name), _PATTERN_KEYS, frozenset())
        for warning in caught:
            message, unmatched = warning.message, _UNMATCHED.match(str(warning.message))
            if unmatched:
                left = [key for key in ast.literal_eval(unmatched[1]) if key not in applied]
                if not left:
                    continue
                message = f"{str(message).rpartition(': [')[0]}: {left}."
            warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
        return result

    _prepare_model._moefuse = True
    LoraModel._prepare_model = _prepare_model
    LoraModel._check_target_module_exists = staticmethod(_check_target_module_exists)
    LoraModel.inject_adapter = inject_adapter
