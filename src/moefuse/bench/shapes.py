"""The experts' shapes of a config, read from the model Transformers builds for it (on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..experts import UnsupportedExpertsError, stacked_expert_weights
from .configs import experts_per_token


@dataclass(frozen=True)
class MoeShape:
    """What the FLOP counts need, and the class of the model's sparse MoE block (router + experts)."""

    block_class: type[torch.nn.Module]
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    gate_up_rows: int  # 2 * intermediate for gated experts, intermediate otherwise

    @property
    def expert_params(self) -> int:
        """Weights of one expert's matmuls: one routed token costs ``2 * expert_params`` FLOPs forward."""
        return self.gate_up_rows * self.hidden + self.hidden * self.intermediate

    def projections(self) -> dict[str, tuple[int, int]]:
        """``{name: (out_features, in_features)}`` of the experts' two grouped GEMMs."""
        return {"gate_up": (self.gate_up_rows, self.hidden), "down": (self.hidden, self.intermediate)}

    def as_dict(self) -> dict:
        return {
            "block_class": self.block_class.__name__,
            "moe_layers": self.num_moe_layers,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "hidden": self.hidden,
            "moe_intermediate": self.intermediate,
            "gate_up_rows": self.gate_up_rows,
        }


def meta_moe_blocks(config: PretrainedConfig) -> list[torch.nn.Module]:
    """The modules of ``config``'s model (built on the meta device: no memory) holding an ``experts`` module, the
    first of which stores stacked 3-D weights; :class:`~moefuse.UnsupportedExpertsError` where there is none."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]
    if not blocks or not isinstance(getattr(blocks[0].experts, "down_proj", None), torch.Tensor):
        raise UnsupportedExpertsError(
            f"model type '{config.model_type}' has no experts module storing stacked 3-D weights "
            "(gate_up_proj/down_proj) as Transformers 5 MoE models do; give the config of such a model"
        )
    return blocks


def moe_shape(config: PretrainedConfig) -> MoeShape:
    """Build ``config``'s model on the meta device (no memory) and read its first MoE block."""
    try:
        blocks = meta_moe_blocks(config)
    except UnsupportedExpertsError as error:
        raise SystemExit(f"moefuse bench: {error}") from None
    experts = blocks[0].experts
    if hasattr(experts, "gate_up_proj"):
        gate_up, down = stacked_expert_weights(experts)
    else:  # experts without a gate store up_proj in gate_up_proj's place
        gate_up, down = experts.up_proj, experts.down_proj
    num_experts, hidden, intermediate = down.shape
    return MoeShape(
        block_class=type(blocks[0]),
        num_moe_layers=len(blocks),
        num_experts=num_experts,
        top_k=experts_per_token(config),
        hidden=hidden,
        intermediate=intermediate,
        gate_up_rows=gate_up.shape[1],
    )


def attention_width(model: torch.nn.Module) -> int:
    """The query width (heads x head size) summed over the model's attention layers, read from their ``q_proj``
    modules: right also where layers differ (Gemma 4's full-attention layers have a wider head)."""
    return sum(
        module.out_features
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "q_proj" and hasattr(module, "out_features")
    )
