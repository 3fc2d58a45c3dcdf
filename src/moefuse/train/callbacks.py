"""Throughput of a Trainer run: tokens per second and model FLOPs utilisation (MFU), logged with the loss.

Tokens are counted where they enter the model (a forward pre-hook: the non-padding tokens of each training
micro-batch), so the figures hold for any data collator, packing included. Model FLOPs per token follow
PaLM's convention: ``2·N`` forward for the ``N`` parameters a token meets (the experts' share is
``top_k / num_experts`` of theirs; the input embedding is a lookup, not a matmul), ``2·N`` backward for the
activations, ``2·N_trainable`` for the weight gradients (LoRA trains few), plus ``12·L·d_attn·S`` for attention
over a sequence of ``S`` tokens. Recomputation (gradient checkpointing) is not counted, as MFU prescribes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

# Datasheet dense bf16/fp16 tensor-core peaks, TFLOP/s per GPU (matched on torch.cuda.get_device_name()).
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def num_experts(config: PretrainedConfig) -> int | None:
    """The routed experts per MoE layer, whatever the family calls the field."""
    return next((getattr(config, k) for k in _EXPERT_COUNT_FIELDS if getattr(config, k, None)), None)


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 datasheet peak of ``device`` if it is a GPU we know, else ``None``."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


@dataclass
class FlopsModel:
    """Training FLOPs of one token and of attention, from a model's parameters and config."""

    active_params: float
    trainable_active_params: float
    attention_width: int  # layers x attention heads x head dim
    per_token: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_token = 4 * self.active_params + 2 * self.trainable_active_params

    @classmethod
    def of(cls, model: nn.Module, config: PretrainedConfig) -> FlopsModel:
        experts = num_experts(config)
        expert_share = config.num_experts_per_tok / experts if experts else 1.0
        embedding = model.get_input_embeddings().weight
        tied = getattr(config, "tie_word_embeddings", False)
        active = trainable = 0.0
        for name, param in model.named_parameters():
            if param is embedding and not tied:
                continue  # a lookup; when tied, the same matrix is the output projection, a matmul
            count = param.numel() * (expert_share if ".experts." in f".{name}" else 1.0)
            active += count
            trainable += count if param.requires_grad else 0.0
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width = config.num_hidden_layers * config.num_attention_heads * head_dim
        return cls(active, trainable, width)

    def flops(self, tokens: int, sum_squared_lengths: int) -> float:
        return self.per_token * tokens + 12 * self.attention_width * sum_squared_lengths


def _batch_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(tokens, sum of squared sequence lengths)`` of one model input, padding left out."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        input_ids = embeds[..., 0]
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() == 2:
        lengths = mask.sum(dim=-1)
    elif position_ids is not None and input_ids.shape[0] == 1:
        # Packed without padding: a new sequence starts wherever the positions restart at 0.
        starts = torch.nonzero(position_ids.flatten().cpu() == 0).flatten()
        lengths = torch.diff(
            torch.cat([torch.tensor([0]), starts, torch.tensor([position_ids.numel()])]).unique()
        )
    else:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[-1])
    return int(lengths.sum()), int((lengths.long() ** 2).sum())


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second`` and (when the device's peak is known) ``mfu`` to each training log, measured
    on this process since the previous log; :attr:`totals` holds the whole run's figures, and under
    ``"after_first_log"`` those from the first log to the end (the steady state: Triton compiles and tunes its
    kernels in the first steps).

    Attach it with :func:`add_throughput_callback` so that the reporting integrations (TensorBoard, W&B) see
    its figures too, or pass it in ``callbacks=[...]`` (then only the console and ``log_history`` do).
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.flops_model: FlopsModel | None = None
        self._hook = None
        self._tokens = 0
        self._flops = 0.0
        self._since = 0.0
        self._run_start = 0.0
        self._run_tokens = 0
        self._run_flops = 0.0
        self._first_log: tuple[float, int, float] | None = None  # (time, tokens, flops) at the first log
        self.totals: dict = {}

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return  # evaluation batches are not training throughput
        shape = _batch_shape(args, kwargs)
        if shape is not None:
            self._tokens += shape[0]
            self._flops += self.flops_model.flops(*shape)

    def on_train_begin(self, args: TrainingArguments, state, control, model=None, **kwargs):
        config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
        self.flops_model = FlopsModel.of(model, config)
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(args.device) if (args.bf16 or args.fp16) else None
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._sync(args)
        self._since = self._run_start = time.perf_counter()

    @staticmethod
    def _sync(args: TrainingArguments) -> None:
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)

    def _figures(self, tokens: int, flops: float, seconds: float) -> dict[str, float]:
        figures = {"tokens_per_second": round(tokens / seconds, 1)}
        if self.peak_tflops:
            figures["mfu"] = round(flops / seconds / (self.peak_tflops * 1e12), 4)
        return figures

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if logs is None or "loss" not in logs or self._tokens == 0:
            return
        self._sync(args)
        now = time.perf_counter()
        figures = self._figures(self._tokens, self._flops, now - self._since)
        logs.update(figures)
        # Trainer.log appended a copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        self._run_tokens += self._tokens
        self._run_flops += self._flops
        self._tokens, self._flops, self._since = 0, 0.0, now
        if self._first_log is None:
            self._first_log = (now, self._run_tokens, self._run_flops)

    def on_train_end(self, args: TrainingArguments, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._sync(args)
        tokens, flops = self._run_tokens + self._tokens, self._run_flops + self._flops
        now = time.perf_counter()
        seconds = now - self._run_start
        if tokens:
            self.totals = {"tokens": tokens, "seconds": seconds, **self._figures(tokens, flops, seconds)}
        if self._first_log is not None and tokens > self._first_log[1]:
            since, tokens0, flops0 = self._first_log
            steady = tokens - tokens0, now - since
            self.totals["after_first_log"] = {
                "tokens": steady[0],
                "seconds": steady[1],
                **self._figures(steady[0], flops - flops0, steady[1]),
            }


def add_throughput_callback(trainer, peak_tflops: float | None = None) -> ThroughputCallback:
    """Attach a :class:`ThroughputCallback` first in ``trainer``'s callbacks, ahead of the reporting
    integrations and the progress bar, so all of them log its figures."""
    callback = ThroughputCallback(peak_tflops)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
