"""Level ``model``: a causal LM of the config's family at the config's dims with ``--layers`` decoder layers,
one training step (forward, loss, backward, AdamW step), as full fine-tuning and LoRA (QLoRA: skipped here;
``benchmarks/qlora.py`` measures it).

One model is built per token count and shared by every case: full fine-tuning restores the same random weights
before each implementation (the optimizer moves them), LoRA wraps the model with PEFT and unwraps it after.
LoRA is moefuse's PEFT LoRA (attention + each expert's gate/up/down, see :mod:`moefuse.lora`) for ``moefuse``,
and PEFT's own ``target_parameters`` LoRA on ``experts.gate_up_proj``/``experts.down_proj`` beside the same
attention LoRA for Transformers' implementations. Both get the same adapter values (see
:mod:`moefuse.bench.lora_factors`), so their losses and adapter gradients are compared like any other.
An implementation named with ``+loss`` (``moefuse+loss``) computes the loss with moefuse's ``causal_lm_loss``
(one Triton kernel per pass on a GPU, no fp32 copy of the logits), and with ``+norm`` its RMSNorm modules run
moefuse's ``rms_norm`` (one kernel each way), as ``moefuse train`` does by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..lora import ATTENTION_PROJECTIONS, lora_config
from ..ops.cross_entropy import use_chunked_loss
from ..ops.rms_norm import RMS_NORM_CLASSES, use_fused_rms_norm
from ..ops.rope import ROPE_MODEL_TYPES, fused_rope
from .block import randomize_
from .configs import with_layers
from .implementations import Implementation, set_experts_implementation
from .lora_factors import canonical_factors, canonical_grads, random_canonical_values, write_canonical
from .runner import BenchContext, Case
from .shapes import attention_width

DESCRIPTION = "{layers} decoder layers at the config's dims, one AdamW training step"
MODES = ("step",)
SETUPS = ("full", "lora", "qlora")
FLOPS_FORMULA = (
    "per token: L = 2 * (2-D weights outside the embedding: attention, routers, shared/dense MLPs, lm_head) "
    "+ 2 * top_k * P_expert per MoE layer; S = 2 * seq_len * heads * head_dim per layer (causal attention "
    "scores); full step = 3 * (L + S); LoRA step = 2 * L (frozen weights get no weight gradient) + 3 * S + "
    "3 * 2 * r * (in + out) per adapted projection (attention, and each routed expert's gate, up, down)"
)
LEARNING_RATE = 1e-5
# The experts' stacked parameters as PEFT's target_parameters names them in Transformers 5 MoE models.
EXPERTS_TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def unsupported(implementation: Implementation) -> str | None:
    """The model level runs every implementation (``+loss`` and ``+norm`` included)."""
    return None


def unsupported_setup(setup: str) -> str | None:
    """Why ``setup`` cannot run here (``None`` when it can)."""
    if setup == "qlora":
        return (
            "moefuse bench does not compare QLoRA steps yet (benchmarks/qlora.py measures moefuse's, 4-bit "
            "experts and bitsandbytes linears); skipped"
        )
    return None


def build_model(ctx: BenchContext) -> PreTrainedModel:
    """The config's causal LM with ``ctx.options["layers"]`` layers, on the device in ``ctx.dtype``."""
    config = with_layers(ctx.config, ctx.options["layers"])
    config.use_cache = False  # training: no KV cache
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype, attn_implementation="sdpa")
    return model.train()


def _dense_matmul_params(model: PreTrainedModel) -> int:
    """Weights every token multiplies by: the 2-D parameters outside the embedding (lm_head counted even when
    tied to it)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)
    if model.get_output_embeddings().weight is embedding:
        total += embedding.numel()
    return total


class StepFlops:
    """The model level's FLOP formula (see ``FLOPS_FORMULA``) for one step of ``tokens`` tokens."""

    def __init__(self, model: PreTrainedModel, ctx: BenchContext, seq_len: int, tokens: int):
        shape = ctx.shape
        moe_layers = sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module))
        self.tokens = tokens
        self.linear = 2 * (_dense_matmul_params(model) + moe_layers * shape.top_k * shape.expert_params)
        self.attention = 2 * seq_len * attention_width(model)
        attention_linear = sum(
            m.in_features + m.out_features
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
        )
        experts_per_token = moe_layers * shape.top_k * 3 * (shape.hidden + shape.intermediate)
        self.lora_per_rank = 2 * (attention_linear + experts_per_token)

    def step(self, setup: str, rank: int) -> float:
        if setup == "full":
            return 3 * (self.linear + self.attention) * self.tokens
        return (2 * self.linear + 3 * self.attention + 3 * rank * self.lora_per_rank) * self.tokens


class TrainStep:
    """Forward with the LM loss, backward, AdamW step, gradients cleared: one training step."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        flops: float,
        grads: Callable[[], dict[str, torch.Tensor]],
        on_close: Callable[[], None],
        implementation: Implementation,
    ):
        self.model, self.input_ids, self._flops, self._grads, self._on_close = (
            model,
            input_ids,
            flops,
            grads,
            on_close,
        )
        self.forward = implementation.compile(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None

    def _loss_backward(self) -> torch.Tensor:
        loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        return loss

    def check_tensors(self) -> dict[str, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        loss = self._loss_backward()
        tensors = {"loss": loss.detach().reshape(1), **self._grads()}
        self.model.zero_grad(set_to_none=True)
        return tensors

    def perturbed_check_tensors(self) -> dict[str, torch.Tensor]:
        """From layer 2 on, each implementation's rounding reaches the router and may flip a near-tie routing
        decision; perturbing every experts output by one unit of rounding (seeded) shows how far that moves
        each tensor, i.e. how far a correct implementation may be from this one."""
        generator = torch.Generator(self.input_ids.device).manual_seed(0)

        def perturb(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            unit = torch.finfo(out.dtype).eps / 2
            noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
            return out + out * (noise * unit).to(out.dtype)

        experts = [
            m.experts for m in self.model.modules() if isinstance(getattr(m, "experts", None), nn.Module)
        ]
        handles = [e.register_forward_hook(perturb) for e in experts]
        try:
            return self.check_tensors()
        finally:
            for handle in handles:
                handle.remove()

    def run(self, mode: str) -> None:
        if self.optimizer is None:  # created in the first (warm-up) step, so its states count in the peak
            fused = self.input_ids.device.type == "cuda"  # what Transformers' Trainer uses on a GPU
            self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, fused=fused or None)
        self._loss_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self, mode: str) -> float:
        return self._flops

    def details(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.params)}

    def close(self) -> None:
        self.optimizer = None
        self.model.zero_grad(set_to_none=True)
        if self.forward is not self.model:
            torch._dynamo.reset()  # the next implementation compiles afresh
        self._on_close()


def set_model_kernels(model: PreTrainedModel, implementation: Implementation) -> Callable[[], None]:
    """Give ``model`` moefuse's causal-LM loss (``+loss``), RMSNorm (``+norm``) and rotary embeddings (``+rope``)
    when ``implementation`` asks for them; returns the undo."""
    if implementation.moefuse_loss and not use_chunked_loss(model):
        raise SystemExit(
            f"moefuse bench: '{implementation.name}': this model's loss is not Transformers' ForCausalLMLoss, "
            "so moefuse's causal-LM loss cannot stand in for it; drop '+loss'"
        )
    if implementation.moefuse_norm and not use_fused_rms_norm(model):
        raise SystemExit(
            f"moefuse bench: '{implementation.name}': this model has no RMSNorm module moefuse's rms_norm computes "
            f"({', '.join(sorted(RMS_NORM_CLASSES))}); drop '+norm'"
        )
    rope = contextlib.ExitStack()
    if implementation.moefuse_rope and not rope.enter_context(fused_rope(model)):
        raise SystemExit(
            f"moefuse bench: '{implementation.name}': moefuse's rotary embeddings stand in for the modeling code of "
            f"{', '.join(sorted(ROPE_MODEL_TYPES))} only, not {model.config.model_type}'s; drop '+rope'"
        )

    def undo() -> None:
        if implementation.moefuse_loss:
            vars(model).pop("_loss_function", None)  # back to the class's loss_function
        if implementation.moefuse_norm:
            use_fused_rms_norm(model, enable=False)
        rope.close()

    return undo


def lora_config_for(rank: int, moefuse: bool) -> LoraConfig:
    """LoRA ``rank`` on attention + the routed experts, the same adapter both ways: moefuse's LoRA on gate_up_proj
    (one A for gate and up) and down_proj, or PEFT's ``target_parameters`` on the stacked weights for
    Transformers' experts implementations."""
    attention = list(ATTENTION_PROJECTIONS)
    if moefuse:
        # "experts.": the routed experts only, not shared experts
        return lora_config(rank, target_modules=[*attention, "experts.gate_up_proj", "experts.down_proj"])
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=attention,
        target_parameters=EXPERTS_TARGET_PARAMETERS,
        task_type="CAUSAL_LM",
    )


def cases(ctx: BenchContext, tokens: int) -> list[Case]:
    seq_len = min(ctx.options["seq_len"], tokens)
    if tokens % seq_len:
        raise SystemExit(
            f"moefuse bench: {tokens} tokens are not a whole number of {seq_len}-token sequences; "
            "pick --tokens multiple of --seq-len"
        )
    model = build_model(ctx)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed + 1)
    input_ids = torch.randint(
        0, model.config.vocab_size, (tokens // seq_len, seq_len), generator=generator, device=ctx.device
    )
    flops = StepFlops(model, ctx, seq_len, tokens)
    std = getattr(ctx.config, "initializer_range", 0.02)
    rank = ctx.options["lora_rank"]
    lora_values: dict[str, torch.Tensor] = {}

    def full(implementation: Implementation) -> TrainStep:
        randomize_(model, ctx.seed, std)  # the weights every implementation starts from
        model.requires_grad_(True)
        set_experts_implementation(model, implementation)
        named = list(model.named_parameters())

        def grads() -> dict[str, torch.Tensor]:
            return {f"grad {name}": p.grad for name, p in named if p.grad is not None}

        return TrainStep(
            model,
            input_ids,
            flops.step("full", rank),
            grads,
            set_model_kernels(model, implementation),
            implementation,
        )

    def lora(implementation: Implementation) -> TrainStep:
        randomize_(model, ctx.seed, std)
        set_experts_implementation(model, implementation)
        peft_model = get_peft_model(model, lora_config_for(rank, implementation.is_moefuse))
        factors = canonical_factors(peft_model)
        if not lora_values:  # the first implementation draws the adapter values, the others take them
            lora_values.update(random_canonical_values(factors, ctx.seed + 2, std))
        write_canonical(factors, lora_values)
        restore_kernels = set_model_kernels(model, implementation)

        def close() -> None:
            restore_kernels()
            peft_model.unload()

        return TrainStep(
            peft_model,
            input_ids,
            flops.step("lora", rank),
            lambda: canonical_grads(factors),
            close,
            implementation,
        )

    makers = {"full": full, "lora": lora}
    return [
        Case(setup, impl, lambda make=makers[setup], impl=impl: make(impl))
        for setup in ctx.options["setups"]
        for impl in ctx.implementations
    ]
