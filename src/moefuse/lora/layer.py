"""PEFT LoRA layer for Transformers' fused experts modules running on moefuse.

:class:`ExpertsLoraLayer` wraps an experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) the way
PEFT's own layers wrap an ``nn.Linear``: the experts become ``base_layer`` and the adapter weights live beside
them, one child per projection, so the adapter's state dict reads
``<...>.mlp.experts.{gate_proj|up_proj|gate_up_proj|down_proj}.lora_A.weight [E, r, in]`` and
``.lora_B.weight [E, out, r]``: each expert's PEFT factors stacked, which converts losslessly to per-expert
adapters (``gate_up_proj``'s one A serving gate and up both) and to PEFT's ``target_parameters``.
The forward runs :func:`moefuse.fused_experts` with the LoRA terms as thin grouped GEMMs (never ``W + B·A``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..experts import check_lora_supported, experts_structure, stacked_expert_weights
from ..ops.lora import ExpertsLora, LoraWeights
from ..ops.moe import fused_experts
from .targets import PROJECTIONS, take_request


class ExpertsLoraFactor(nn.Module):
    """One stacked LoRA factor, ``weight [E, rows, cols]`` (a module so the key ends in ``.weight`` as in PEFT)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class ExpertsProjectionLora(nn.Module):
    """The adapters of one projection of every expert: ``lora_A[adapter]`` and ``lora_B[adapter]``."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()


def _factor_dict(projection: str, factor: str) -> property:
    return property(lambda self: getattr(getattr(self, projection), f"lora_{factor}"))


class ExpertsLoraLayer(nn.Module, LoraLayer):
    """LoRA on every expert's gate, up and down projections of a Transformers experts module.

    Created by PEFT when ``target_modules`` names ``gate_proj``, ``up_proj``, ``gate_up_proj`` or ``down_proj``
    and the model's experts run on moefuse (see :mod:`moefuse.lora.targets`). Ranks, alphas (``rank_pattern`` /
    ``alpha_pattern`` keyed by ``<...>.experts.gate_proj`` and so on), rsLoRA and dropout follow the config per
    projection. The dropout module of an adapter is shared by its projections; gate and up read the same
    tokens and share one mask.
    """

    # PEFT walks these names to switch, freeze, move and delete adapters; each is the ModuleDict of one child.
    adapter_layer_names = tuple(f"{p}_lora_{f}" for p in PROJECTIONS for f in "AB")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        for projection in PROJECTIONS:
            setattr(self, projection, ExpertsProjectionLora())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        hidden = self._projection_shapes(module)["down_proj"][1]
        return hidden, hidden

    @staticmethod
    def _projection_shapes(experts: nn.Module) -> dict[str, tuple[int, int, int]]:
        """``[E, out, in]`` of each projection."""
        gate_up = experts.gate_up_proj
        num_experts = gate_up.shape[0]
        two_i, hidden = (
            (gate_up.shape[2], gate_up.shape[1])
            if getattr(experts, "is_transposed", False)
            else gate_up.shape[1:]
        )
        inter = two_i // 2
        return {
            "gate_proj": (num_experts, inter, hidden),
            "up_proj": (num_experts, inter, hidden),
            "gate_up_proj": (num_experts, two_i, hidden),
            "down_proj": (num_experts, hidden, inter),
        }

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Add ``adapter_name``; its settings come from the config PEFT is injecting (see ``take_request``).

        PEFT passes the experts module's own ``r``/``lora_alpha`` positionally; they are ignored in favour of
        each projection's entry (``rank_pattern`` keys are matched against ``<experts key>.<projection>``).
        """
        experts = self.get_base_layer()
        requests = take_request(experts)
        shapes = self._projection_shapes(experts)
        weight = experts.gate_up_proj
        self.r[adapter_name], self.lora_alpha[adapter_name], self.scaling[adapter_name] = {}, {}, {}
        dropout = requests[0].dropout if requests else 0.0
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.use_rslora[adapter_name] = any(r.use_rslora for r in requests)
        for request in requests:
            num_experts, out_features, in_features = shapes[request.projection]
            lora_A = torch.empty(
                num_experts, request.r, in_features, device=weight.device, dtype=weight.dtype
            )
            lora_B = torch.empty(
                num_experts, out_features, request.r, device=weight.device, dtype=weight.dtype
            )
            _init_factors(lora_A, lora_B, request.init_lora_weights)
            child = getattr(self, request.projection)
            child.lora_A[adapter_name] = ExpertsLoraFactor(lora_A)
            child.lora_B[adapter_name] = ExpertsLoraFactor(lora_B)
            self.r[adapter_name][request.projection] = request.r
            self.lora_alpha[adapter_name][request.projection] = request.lora_alpha
            self.scaling[adapter_name][request.projection] = request.scaling
        self.set_adapter(self.active_adapters)

    def experts_lora(self, adapter_name: str) -> ExpertsLora:
        """The adapter's factors as the op takes them."""
        weights = {}
        for projection, scaling in self.scaling[adapter_name].items():
            child = getattr(self, projection)
            weights[projection.removesuffix("_proj")] = LoraWeights(
                child.lora_A[adapter_name].weight, child.lora_B[adapter_name].weight, scaling
            )
        return ExpertsLora(**weights, dropout=self.lora_dropout[adapter_name])

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "moefuse experts LoRA does not support adapter_names (mixed adapters in one batch); "
                "switch adapters with set_adapter instead"
            )
        experts = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [self.experts_lora(a) for a in self.active_adapters if a in self.scaling]
        if self.disable_adapters or self.merged or not adapters:
            return experts(hidden_states, top_k_index, top_k_weights, **kwargs)
        check_lora_supported(experts, {p for a in self.active_adapters if a in self.r for p in self.r[a]})
        gate_up, down = stacked_expert_weights(experts)
        # Ids from the router's topk are in range: no host sync per layer to check them (as in experts.py).
        return fused_experts(
            hidden_states,
            gate_up,
            down,
            top_k_index,
            top_k_weights,
            lora=adapters,
            check_index_range=False,
            **experts_structure(experts),
        )

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}``: what merging adds (zeros where not adapted)."""
        gate_up, down = stacked_expert_weights(self.get_base_layer())
        lora = self.experts_lora(adapter_name)
        inter = down.shape[2]

        def delta(weights: LoraWeights | None, shape: tuple[int, ...]) -> torch.Tensor:
            if weights is None:
                return torch.zeros(shape, device=gate_up.device, dtype=torch.float32)
            return LoraWeights(weights.lora_A.float(), weights.lora_B.float(), weights.scaling).delta_weight()

        half = (gate_up.shape[0], inter, gate_up.shape[2])
        together = lora.gate_up is not None
        return {
            "gate_up_proj": delta(lora.gate_up, tuple(gate_up.shape))
            if together
            else torch.cat([delta(lora.gate, half), delta(lora.up, half)], dim=1),
            "down_proj": delta(lora.down, tuple(down.shape)),
        }

    def _add_delta(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        experts = self.get_base_layer()
        for name, delta in self.get_delta_weight(adapter_name).items():
            param = getattr(experts, name)
            stored = delta.transpose(1, 2) if getattr(experts, "is_transposed", False) else delta
            merged = (param.data.float() + sign * stored).to(param.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter '{adapter_name}' into {name} gives non-finite values; the adapter is broken"
                )
            param.data.copy_(merged)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ``scaling * B @ A`` into the experts' weights (in place)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.scaling:
                self._add_delta(name, +1, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters again (exact up to the weights' rounding)."""
        while self.merged_adapters:
            self._add_delta(self.merged_adapters.pop(), -1)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _init_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
    """PEFT's initialisations, per expert: ``True`` (A as ``nn.Linear``, B zero), ``"gaussian"``, ``False``."""
    with torch.no_grad():
        bound_a = 1 / math.sqrt(lora_A.shape[2])  # kaiming_uniform(a=sqrt(5)) of nn.Linear(in, r)
        if init is True:
            lora_A.uniform_(-bound_a, bound_a)
            lora_B.zero_()
        elif init == "gaussian":
            lora_A.normal_(0, 1 / lora_A.shape[1])
            lora_B.zero_()
        elif init is False:
            lora_A.uniform_(-bound_a, bound_a)
            bound_b = 1 / math.sqrt(lora_B.shape[2])
            lora_B.uniform_(-bound_b, bound_b)
        else:
            raise ValueError(
                f"init_lora_weights={init!r} is not supported on moefuse experts; use True, False or 'gaussian'"
            )


for _projection in PROJECTIONS:
    for _factor in "AB":
        setattr(ExpertsLoraLayer, f"{_projection}_lora_{_factor}", _factor_dict(_projection, _factor))

__all__ = ["ExpertsLoraFactor", "ExpertsLoraLayer", "ExpertsProjectionLora"]
