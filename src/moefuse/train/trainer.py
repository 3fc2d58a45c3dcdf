"""TRL's ``SFTTrainer`` as ``moefuse train`` runs it: steps without host syncs where moefuse can avoid them, and
the memory savers (optimizer step in the backward, activations in CPU memory) as options.

What a step would otherwise synchronise on, and what this class does about it:

- TRL's loss computes entropy, token accuracy and the MoE auxiliary loss for every micro-batch and reads them on
  the host (``.item()`` and ``if num_valid > 0``: five syncs). Here the same per-micro-batch figures stay on the
  device and are read once, when the Trainer logs; the logged values are TRL's. Only on TRL's default path (one
  process, ``nll`` loss, no ``compute_loss_func``, no label smoothing); otherwise TRL computes them itself.
- Transformers builds the attention mask of packed rows (``position_ids`` without ``attention_mask``) after
  asking the host whether the row holds more than one sequence. Here the mask is built by Transformers' own mask
  functions from the sequence index TRL's collator computed on the CPU (``seq_idx``), and handed to the model as a
  prepared 4-D mask (a forward pre-hook on the decoder), which Transformers takes as it is (``sdpa`` and ``eager``
  attention, no sliding window). With ``"moefuse_varlen"`` attention, which takes the sequences from the
  collator's ``cu_seq_lens_q``, the decoder is handed the padding mask such a batch has (all true) instead, so
  Transformers does not look for packed sequences in ``position_ids`` at all.
- ``offload_activations`` copies the tensors saved for the backward to pinned host memory. PyTorch's
  ``save_on_cpu`` makes each copy a blocking one (a sync per saved tensor) and copies the parameters autograd
  saves too; :class:`OffloadSavedTensors` does neither.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from transformers import PretrainedConfig, TrainerCallback
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    packed_sequence_mask_function,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer
from trl import SFTTrainer

from ..attention import ATTN_IMPLEMENTATION
from .config import trl_fused_lm_head

PREPARED_MASK_ATTENTION = ("sdpa", "eager")  # attention that takes a prepared 4-D mask


def packed_sequence_index(inputs: dict) -> torch.Tensor | None:
    """The sequence each token of a packed row belongs to, ``[1, T]``, or ``None`` when the batch is not packed
    rows without an attention mask. TRL's padding-free collator computes it on the CPU (``seq_idx``); otherwise
    it is derived on the device from ``position_ids`` (a new sequence wherever a position does not follow the
    previous one), without reading anything back."""
    position_ids = inputs.get("position_ids")
    if position_ids is None or inputs.get("attention_mask") is not None or position_ids.shape[0] != 1:
        return None
    if inputs.get("seq_idx") is not None:
        return inputs["seq_idx"]
    previous = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=-1)
    return (position_ids != previous + 1).cumsum(-1)


def takes_prepared_mask(config: PretrainedConfig) -> bool:
    """Whether every layer of ``config`` attends causally over the whole row through a mask Transformers builds
    with ``create_causal_mask`` (no sliding window), in an attention that takes a prepared 4-D mask."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        config._attn_implementation in PREPARED_MASK_ATTENTION
        and getattr(config, "sliding_window", None) is None
        and all(t == "full_attention" for t in layer_types)
    )


def packed_causal_mask(
    config: PretrainedConfig, sequence_index: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The mask ``create_causal_mask`` builds for packed rows (causal, and within each sequence), by the same
    mask functions, without its host-side check for rows holding a single sequence."""
    length = sequence_index.shape[-1]
    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=sequence_index.shape[0],
        q_length=length,
        kv_length=length,
        mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(sequence_index)),
        attention_mask=None,
        allow_is_causal_skip=False,
        dtype=dtype,
        config=config,
        device=sequence_index.device,
    )


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (``linear`` saves its weight transposed)."""
    return isinstance(tensor if tensor._base is None else tensor._base, nn.Parameter)


class OffloadSavedTensors(saved_tensors_hooks):
    """The tensors autograd saves for the backward, on ``device_type``, wait in host memory (pinned where CUDA is
    available): each is copied out when saved and back when the backward unpacks it, both queued on the current
    stream without waiting for the device (the stream orders the copy back after the copy out, and the caching
    allocators keep both buffers until their copies ran). Parameters stay where they are (they are resident
    anyway), and so do tensors under ``min_bytes`` (a copy costs more host time than their memory is worth)."""

    def __init__(self, device_type: str, min_bytes: int = 1024):
        pin = torch.cuda.is_available()

        def pack(tensor: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
            if (
                tensor.device.type != device_type
                or tensor.layout != torch.strided
                or _is_parameter(tensor)
                or tensor.numel() * tensor.element_size() < min_bytes
            ):
                return tensor
            packed = torch.empty_like(tensor, device="cpu", pin_memory=pin)
            packed.copy_(tensor, non_blocking=pin)
            return tensor.device, packed

        def unpack(packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, tensor = packed
            return tensor.to(device, non_blocking=pin)

        super().__init__(pack, unpack)


def _call(function, *args):
    return function(*args)


class CompileBelowCheckpoints(TrainerCallback):
    """``torch.compile`` of each checkpointed decoder layer's forward, the checkpoint itself left eager: once
    the Trainer has turned gradient checkpointing on, every layer's checkpoint function runs a compiled call of
    what it checkpoints (the forward, and its recompute in the backward). One compiled function serves every
    layer (Dynamo keeps one graph for layers of one class). :attr:`layers` counts the layers it reached."""

    def __init__(self, **compile_options):
        self.compiled = torch.compile(_call, **compile_options)
        self.layers = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            checkpoint = getattr(module, "_gradient_checkpointing_func", None)
            if (
                isinstance(module, GradientCheckpointingLayer)
                and module.gradient_checkpointing
                and checkpoint is not None
                and not getattr(checkpoint, "compiles_below", False)
            ):
                module._gradient_checkpointing_func = partial(self._checkpoint, checkpoint)
                module._gradient_checkpointing_func.compiles_below = True
                self.layers += 1

    def _checkpoint(self, checkpoint, function, *args, **kwargs):
        return checkpoint(self.compiled, function, *args, **kwargs)


class MoefuseSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with ``step_in_backward`` (an optimizer per trainable tensor, stepped by a hook when its
    gradient is complete, behind Transformers' no-op layer-wise optimizer) and ``offload_activations``
    (:class:`OffloadSavedTensors`), ``compile_below_checkpoints`` (the ``torch.compile`` options of
    :class:`CompileBelowCheckpoints`), and the sync-free loss metrics and packed masks described in the module's
    docstring."""

    def __init__(
        self,
        *args,
        step_in_backward: bool = False,
        offload_activations: bool = False,
        compile_below_checkpoints: dict | None = None,
        **kwargs,
    ):
        self.step_in_backward = step_in_backward
        self.offload_activations = offload_activations
        self._pending_metrics: list[
            torch.Tensor
        ] = []  # [entropy, accuracy] of each micro-batch, on the device
        self._pending_tokens: torch.Tensor | int = 0
        super().__init__(*args, **kwargs)
        self.layer_compile = None
        if compile_below_checkpoints is not None:
            self.layer_compile = CompileBelowCheckpoints(**compile_below_checkpoints)
            self.add_callback(self.layer_compile)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._decoder = base.base_model  # the module that builds the attention mask
        if takes_prepared_mask(self._decoder.config):
            self._decoder.register_forward_pre_hook(self._packed_mask, with_kwargs=True)
        elif self._decoder.config._attn_implementation == ATTN_IMPLEMENTATION:
            self._decoder.register_forward_pre_hook(self._padding_free_mask, with_kwargs=True)

    def _packed_mask(self, module, args: tuple, kwargs: dict):
        """Hand the decoder the mask of packed rows ready-made (a forward pre-hook; the causal-LM model above it
        keeps ``attention_mask=None``, which its auxiliary loss reads as 'no padding')."""
        sequence_index = packed_sequence_index(kwargs)
        if sequence_index is None:
            return None
        dtype = module.get_input_embeddings().weight.dtype
        return args, {**kwargs, "attention_mask": packed_causal_mask(module.config, sequence_index, dtype)}

    def _padding_free_mask(self, module, args: tuple, kwargs: dict):
        """Hand the decoder the padding mask of a padding-free batch (all true) where the collator gave the
        sequences' bounds (a forward pre-hook, for ``"moefuse_varlen"`` attention)."""
        position_ids = kwargs.get("position_ids")
        if (
            kwargs.get("cu_seq_lens_q") is None
            or kwargs.get("attention_mask") is not None
            or position_ids is None
        ):
            return None
        mask = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)
        return args, {**kwargs, "attention_mask": mask}

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if not self.step_in_backward or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        decay = set(self.get_decay_parameter_names(model))
        optimizers = {
            p: optimizer_cls(
                [{"params": [p], "weight_decay": self.args.weight_decay if n in decay else 0.0}],
                **optimizer_kwargs,
            )
            for n, p in model.named_parameters()
            if p.requires_grad
        }

        # The Trainer's schedule sets the learning rate of the layer-wise optimizer's one group at the end of each
        # step (Transformers' own per-tensor schedules fail on this torch: LayerWiseDummyScheduler gives one rate
        # per tensor to an optimizer of one group); each tensor's step takes it from there.
        schedule = LayerWiseDummyOptimizer(optimizer_dict=optimizers, lr=self.args.learning_rate)

        def step(param: torch.Tensor) -> None:
            optimizer = optimizers[param]
            group, lr = optimizer.param_groups[0], schedule.param_groups[0]["lr"]
            if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers read a tensor, set in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # the gradient is freed as soon as it is used

        for param in optimizers:
            param.register_post_accumulate_grad_hook(step)
        self.optimizer = schedule
        return self.optimizer

    def training_step(self, *args, **kwargs):
        offload = OffloadSavedTensors(self.args.device.type) if self.offload_activations else nullcontext()
        with offload:
            return super().training_step(*args, **kwargs)

    def _deferred_metrics_path(self, model, return_outputs: bool) -> bool:
        """Whether this call takes TRL's default loss path, whose metrics can wait on the device."""
        return (
            model.training
            and not return_outputs
            and trl_fused_lm_head()
            and self.accelerator.num_processes == 1
            and self.args.loss_type == "nll"
            and self.compute_loss_func is None
            and self.label_smoother is None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._deferred_metrics_path(model, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's default training loss (SFTTrainer.compute_loss), its metrics kept on the device.
        inputs = {**inputs, "use_cache": False}
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        num_valid = outputs.label_mask.sum()
        per_token = torch.stack([outputs.entropy.detach().sum(), outputs.is_top1.sum().to(torch.float32)])
        metrics = [torch.where(num_valid > 0, per_token / num_valid.clamp(min=1), 0.0)]
        if self.aux_loss_enabled:
            # a per-micro-batch mean: with num_items_in_batch the loss carries the accumulation, as in TRL
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            metrics.append(outputs.aux_loss.detach().float().reshape(1))
        self._pending_metrics.append(torch.cat(metrics))
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else inputs["position_ids"].size(1)
        self._pending_tokens = self._pending_tokens + tokens
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._pending_metrics:
            metrics = self._metrics["train"]
            for row in torch.stack(self._pending_metrics).tolist():  # one read for the logging interval
                metrics["entropy"].append(row[0])
                metrics["mean_token_accuracy"].append(row[1])
                if self.aux_loss_enabled:
                    metrics["aux_loss"].append(row[2])
            self._total_train_tokens += int(self._pending_tokens)
            metrics["num_tokens"] = [self._total_train_tokens]
            self._pending_metrics, self._pending_tokens = [], 0
        super().log(logs, start_time)
