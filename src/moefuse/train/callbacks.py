"""Throughput of a Trainer run: tokens per second, model FLOPs utilisation (MFU), the GPU-busy fraction and peak
memory, logged with the loss and summed up in :attr:`ThroughputCallback.totals`.

Tokens are counted where they enter the model (a forward pre-hook: the non-padding tokens of each training
micro-batch), so the figures hold for any data collator, packing included. The counts stay on the device until a
log (which synchronises once), so counting adds no host sync to a step.

Model FLOPs per token follow PaLM's convention: ``2·N`` forward for the ``N`` parameters a token meets (the experts'
share is ``top_k / num_experts`` of theirs; the input embedding is a lookup, not a matmul), ``2·N`` backward for
the activations, ``2·N_trainable`` for the weight gradients (LoRA trains few), plus ``12·L·d_attn·S`` for
attention over a sequence of ``S`` tokens (``4·L·d_attn·S`` forward, twice that backward). MFU counts these alone.
Gradient checkpointing runs each checkpointed layer's forward again in the backward: ``2·N_layers +
4·L·d_attn·S`` more per token (``N_layers`` the parameters inside the checkpointed decoder layers, so not the
output head); ``hfu`` (hardware FLOPs utilisation) counts them too.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from ..bench.configs import experts_per_token, num_experts
from ..bench.shapes import attention_width

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
GIB = 2**30
GPU_BUSY_STEPS = 3  # profiled steps on a GPU unless gpu_busy_steps says otherwise
CPU_NO_GPU_BUSY = "not measured: a CPU run has no GPU kernels to profile"


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 datasheet peak of ``device`` if it is a GPU we know, else ``None``."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes' 4-bit linear weights hold two values a byte; their quant state keeps the matrix's shape.
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else param.numel()


@dataclass
class FlopsModel:
    """Training FLOPs of one token and of attention, from a model's parameters and config.

    ``active_params`` (N), ``trainable_active_params`` (N_trainable) and ``checkpointed_params`` (N_layers, zero
    without gradient checkpointing) count each expert parameter at ``top_k / num_experts``."""

    active_params: float
    trainable_active_params: float
    attention_width: int  # query width (heads x head dim) summed over the attention layers
    checkpointed_params: float = 0.0
    checkpointing: bool = False
    per_token: float = field(init=False)  # model FLOPs (MFU)
    recompute_per_token: float = field(init=False)  # checkpointing's second forward of the layers

    def __post_init__(self) -> None:
        self.per_token = 4 * self.active_params + 2 * self.trainable_active_params
        self.recompute_per_token = 2 * self.checkpointed_params if self.checkpointing else 0.0

    @classmethod
    def of(cls, model: nn.Module, config: PretrainedConfig, checkpointing: bool = False) -> FlopsModel:
        experts = num_experts(config)
        expert_share = experts_per_token(config) / experts if experts else 1.0
        embedding = model.get_input_embeddings().weight
        tied = getattr(config, "tie_word_embeddings", False)
        in_layers = {
            id(p)
            for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer)
            for p in m.parameters()
        }
        active = trainable = layers = 0.0
        for name, param in model.named_parameters():
            if param is embedding and not tied:
                continue  # a lookup; when tied, the same matrix is the output projection, a matmul
            count = _numel(param) * (expert_share if ".experts." in f".{name}" else 1.0)
            active += count
            trainable += count if param.requires_grad else 0.0
            layers += count if id(param) in in_layers else 0.0
        return cls(active, trainable, attention_width(model), layers, checkpointing)

    def flops(self, tokens: float, sum_squared_lengths: float) -> float:
        """Model FLOPs (MFU's numerator) of ``tokens`` tokens in sequences whose squared lengths sum as given."""
        return self.per_token * tokens + 12 * self.attention_width * sum_squared_lengths

    def recompute_flops(self, tokens: float, sum_squared_lengths: float) -> float:
        """The FLOPs gradient checkpointing adds (zero without it)."""
        if not self.checkpointing:
            return 0.0
        return self.recompute_per_token * tokens + 4 * self.attention_width * sum_squared_lengths


def _batch_counts(args: tuple, kwargs: dict) -> tuple[torch.Tensor | int, torch.Tensor | int] | None:
    """``(tokens, sum of squared sequence lengths)`` of one model input, padding left out; tensors where they
    come from the input (left on its device: reading them would synchronise)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        input_ids = embeds[..., 0]
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() == 2:
        lengths = mask.sum(dim=-1, dtype=torch.int64)
        return lengths.sum(), (lengths**2).sum()
    if position_ids is not None and input_ids.shape[0] == 1:
        # Packed without padding: a sequence of L tokens has positions 0..L-1, and the sum of 2p+1 over them is L².
        return position_ids.numel(), (2 * position_ids.long() + 1).sum()
    rows, length = input_ids.shape[0], input_ids.shape[-1]
    return rows * length, rows * length**2


def _device_memory_calls(stats: dict) -> tuple[int, int]:
    """The caching allocator's cudaMalloc and cudaFree calls so far, from ``torch.cuda.memory_stats``."""
    return stats.get("num_device_alloc", 0), stats.get("num_device_free", 0)


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The time covered by the union of ``(start, end)`` intervals (kernels on several streams overlap)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        busy += end - max(start, reach)
        reach = end
    return busy


TOP_KERNELS = 12  # kernels listed in the GPU-busy figures
TOP_FUNCTIONS = 12  # Python functions listed in the host profile


def host_table(profile: cProfile.Profile, wall: float, top: int = TOP_FUNCTIONS) -> list[dict]:
    """The ``top`` Python functions of ``profile`` by their own time (tottime), each with its calls, own and
    cumulative seconds, and own share of ``wall`` (seconds): where a host-bound step's time goes."""
    # (file, line, function) -> (primitive calls, calls, own seconds, cumulative seconds, callers)
    stats = pstats.Stats(profile).stats
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [
        {
            "name": f"{file}:{line}({function})"[-160:],
            "calls": calls,
            "own_seconds": round(own, 6),
            "cumulative_seconds": round(cumulative, 6),
            "own_share": round(own / wall, 4),
        }
        for (file, line, function), (_, calls, own, cumulative, _) in ranked
    ]


def kernel_table(kernels: list[tuple[str, float, float]], busy: float, top: int = TOP_KERNELS) -> list[dict]:
    """The ``top`` kernels of ``(name, start, end)`` intervals (microseconds) by their summed time: each with its
    calls, seconds and share of ``busy`` (seconds; kernels that overlap count in full, so shares can sum past 1).
    Where the GPU time of a step goes, without a separate profile."""
    totals: dict[str, list[float]] = {}
    for name, start, end in kernels:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) / 1e6
    ranked = sorted(totals.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return [
        {"name": name[:120], "calls": calls, "seconds": round(seconds, 6), "share": round(seconds / busy, 4)}
        for name, (calls, seconds) in ranked
    ]


@dataclass
class _Mark:
    """The clock and the token counts at one point of the run, read after the device caught up."""

    time: float
    tokens: int
    squares: int

    def until(self, later: _Mark) -> tuple[float, int, int]:
        return later.time - self.time, later.tokens - self.tokens, later.squares - self.squares


class TritonCompiles:
    """Triton's kernel compiles during training, by the step they fell in. A kernel meeting arguments it was not
    specialised for (or an autotuner timing its configs) compiles on the host in the middle of that step; with a
    warm disk cache a compile is a load, so the seconds tell the two apart. Through Triton's JIT hooks
    (``triton.knobs.runtime``), chained to any hooks already set and restored by :meth:`remove`; without
    Triton, or a Triton without these hooks, nothing is recorded."""

    def __init__(self):
        self.step = 0  # the step in progress (0: before the first)
        self.by_step: dict[int, list] = {}  # step -> [compiles, seconds]
        self._runtime = None
        self._saved: tuple = (None, None)
        self._started: float | None = None

    def install(self) -> None:
        try:
            from triton import knobs
        except ImportError:
            return
        runtime = knobs.runtime
        if not hasattr(runtime, "jit_post_compile_hook"):
            return
        self._runtime, self._saved = runtime, (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._before, self._after

    def remove(self) -> None:
        if self._runtime is not None:
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._saved
            self._runtime = None

    def _before(self, **kwargs):
        self._started = time.perf_counter()
        earlier = self._saved[0]
        return earlier(**kwargs) if earlier is not None else None  # a true value would skip the compile

    def _after(self, **kwargs) -> None:
        seconds = time.perf_counter() - self._started if self._started is not None else 0.0
        entry = self.by_step.setdefault(self.step, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        if self._saved[1] is not None:
            self._saved[1](**kwargs)

    def seconds_within(self, first: int, leave_out: Collection[int] = ()) -> float:
        """The compiles' seconds in steps ``first`` on, those in ``leave_out`` left out."""
        return sum(s for step, (_, s) in self.by_step.items() if step >= first and step not in leave_out)

    def record(self) -> dict:
        """``{"compiles", "seconds", "by_step": [{"step", "compiles", "seconds"}, ...]}`` (step 0: before the
        first step)."""
        return {
            "compiles": sum(count for count, _ in self.by_step.values()),
            "seconds": round(sum(seconds for _, seconds in self.by_step.values()), 3),
            "by_step": [
                {"step": step, "compiles": count, "seconds": round(seconds, 3)}
                for step, (count, seconds) in sorted(self.by_step.items())
            ],
        }


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second`` and (when the device's peak is known) ``mfu`` and ``hfu`` to each training log,
    measured on this process since the previous log. :attr:`totals` holds the whole run's figures; under
    ``"after_warmup"`` those from the first log at or after ``warmup_steps`` (default: the first log) to the end,
    less the profiled steps (the steady state: Triton compiles and tunes its kernels in the first steps; the
    seconds of compiles that still fell in it, for a batch shape first met there, are given apart);
    ``gpu_busy`` (CUDA): the device's busy time over the wall time of ``gpu_busy_steps`` steps profiled with
    ``torch.profiler`` right after the warm-up (kernels, copies and fills; overlapping ones counted once);
    ``memory``: CUDA's peak allocated and reserved memory over the training, the allocations retried after
    freeing the cache (under a memory cap, each costs device syncs), and the allocator's cudaMalloc and cudaFree
    calls after the warm-up; ``triton_compiles``: Triton's kernel
    compiles by step (:class:`TritonCompiles`); ``by_log``: each log's step, seconds, tokens and figures (the
    profiled steps included), to tell a slow stretch of the run from a slow run; ``host_profile`` (with
    ``host_profile_steps``): the Python functions by their own time over that many steps profiled with cProfile
    after the GPU-busy steps (left out of the after-warm-up figures too: cProfile slows the host).

    Attach it with :func:`add_throughput_callback` so that the reporting integrations (TensorBoard, W&B) see
    its figures too, or pass it in ``callbacks=[...]`` (then only the console and ``log_history`` do).
    """

    def __init__(
        self,
        peak_tflops: float | None = None,
        warmup_steps: int | None = None,
        gpu_busy_steps: int | None = None,
        host_profile_steps: int = 0,
    ):
        self.peak_tflops = peak_tflops
        self.warmup_steps = warmup_steps
        self.gpu_busy_steps = gpu_busy_steps
        self.host_profile_steps = host_profile_steps
        self.flops_model: FlopsModel | None = None
        self._hook = None
        self._tokens: torch.Tensor | int = 0  # since the start, on the device until a mark reads them
        self._squares: torch.Tensor | int = 0
        self._start: _Mark | None = None
        self._last_log: _Mark | None = None
        self._steady: _Mark | None = None
        self._steady_device_calls: tuple[int, int] | None = None  # (cudaMalloc, cudaFree) calls at its start
        self._profiler = None  # torch.profiler's (the GPU-busy steps) or cProfile's (the host-profile steps)
        # the profiled window open: (kind, mark, clock after the profiler started, the step before its first)
        self._window: tuple[str, _Mark, float, int] | None = None
        self._profiled = (0.0, 0, 0)  # (seconds, tokens, squares) the steady figures leave out
        self._gpu_busy: dict | None = None
        self._host_profile: dict | None = None
        self.compiles = TritonCompiles()
        self.by_log: list[dict] = []  # each log's step, seconds and tokens since the previous log
        self.totals: dict = {}

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return  # evaluation batches are not training throughput
        counts = _batch_counts(args, kwargs)
        if counts is not None:
            self._tokens = self._tokens + counts[0]
            self._squares = self._squares + counts[1]

    def _mark(self, args: TrainingArguments) -> _Mark:
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        return _Mark(time.perf_counter(), int(self._tokens), int(self._squares))

    def on_train_begin(self, args: TrainingArguments, state, control, model=None, **kwargs):
        config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
        self.flops_model = FlopsModel.of(model, config, checkpointing=bool(args.gradient_checkpointing))
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(args.device) if (args.bf16 or args.fp16) else None
        if self.gpu_busy_steps is None:
            self.gpu_busy_steps = GPU_BUSY_STEPS if args.device.type == "cuda" else 0
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.compiles.install()
        self._start = self._last_log = self._mark(args)

    def _figures(self, seconds: float, tokens: int, squares: int) -> dict[str, float]:
        figures = {"tokens_per_second": round(tokens / seconds, 1)}
        if self.peak_tflops:
            flops = self.flops_model.flops(tokens, squares)
            recompute = self.flops_model.recompute_flops(tokens, squares)
            figures["mfu"] = round(flops / seconds / (self.peak_tflops * 1e12), 4)
            figures["hfu"] = round((flops + recompute) / seconds / (self.peak_tflops * 1e12), 4)
        return figures

    def _next_window(self) -> str | None:
        """The profiled window to open next, once the warm-up is over: the GPU-busy steps, then the host's."""
        if self.gpu_busy_steps and self._gpu_busy is None:
            return "gpu"
        if self.host_profile_steps and self._host_profile is None:
            return "host"
        return None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.compiles.step = state.global_step + 1
        kind = None if self._steady is None or self._window is not None else self._next_window()
        if kind is None:
            return
        mark = self._mark(args)
        if kind == "gpu":
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.start()
            torch.cuda.synchronize(args.device)
        else:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        self._window = (kind, mark, time.perf_counter(), state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._window is None:
            return
        kind, _, _, first_step = self._window
        steps = self.gpu_busy_steps if kind == "gpu" else self.host_profile_steps
        if state.global_step - first_step >= steps:
            self._close_window(args, state.global_step)

    def _close_window(self, args: TrainingArguments, step: int) -> None:
        kind, before, started, first_step = self._window
        if kind == "gpu":
            self._gpu_busy = self._stop_gpu_profiler(args, started, (first_step + 1, step))
        else:
            self._profiler.disable()
            wall = time.perf_counter() - started
            self._host_profile = {
                "wall_seconds": wall,
                "steps": [first_step + 1, step],
                "functions": host_table(self._profiler, wall),
            }
        self._profiler = self._window = None
        self._profiled = tuple(
            a + b for a, b in zip(self._profiled, before.until(self._mark(args)), strict=True)
        )

    def _profiled_steps(self) -> set[int]:
        """The steps of the profiled windows (from each window's record)."""
        windows = (w["steps"] for w in (self._gpu_busy, self._host_profile) if w is not None)
        return {step for first, last in windows for step in range(first, last + 1)}

    def _stop_gpu_profiler(self, args: TrainingArguments, started: float, steps: tuple[int, int]) -> dict:
        from torch.autograd import DeviceType

        torch.cuda.synchronize(args.device)
        wall = time.perf_counter() - started
        self._profiler.stop()
        index = args.device.index if args.device.index is not None else torch.cuda.current_device()
        kernels = [
            (e.name, e.time_range.start, e.time_range.end)
            for e in self._profiler.events()
            if e.device_type == DeviceType.CUDA and e.device_index == index
        ]
        intervals = [(start, end) for _, start, end in kernels]
        busy = busy_seconds(intervals) / 1e6  # the profiler's clock is in microseconds
        return {
            "fraction": round(busy / wall, 4),
            "busy_seconds": busy,
            "wall_seconds": wall,
            "steps": list(steps),
            "kernels": kernel_table(kernels, busy) if busy else [],
        }

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if logs is None or "loss" not in logs or self._start is None:
            return
        mark = self._mark(args)
        seconds, tokens, squares = self._last_log.until(mark)
        if tokens == 0:
            return
        figures = self._figures(seconds, tokens, squares)
        logs.update(figures)
        # Trainer.log appended a copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        self._last_log = mark
        self.by_log.append(
            {"step": state.global_step, "seconds": round(seconds, 4), "tokens": tokens, **figures}
        )
        if self._steady is None and state.global_step >= (self.warmup_steps or 0):
            self._steady = mark
            if args.device.type == "cuda":
                self._steady_device_calls = _device_memory_calls(torch.cuda.memory_stats(args.device))

    def on_train_end(self, args: TrainingArguments, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.compiles.remove()
        if self._window is not None:  # the run ended inside profiled steps
            self._close_window(args, state.global_step)
        end = self._mark(args)
        seconds, tokens, squares = self._start.until(end)
        if tokens:
            self.totals = {"tokens": tokens, "seconds": seconds, **self._figures(seconds, tokens, squares)}
        self.totals["flops_per_token"] = {
            "model": self.flops_model.per_token,
            "recompute": self.flops_model.recompute_per_token,
            "attention_per_squared_length": 12 * self.flops_model.attention_width,
        }
        if self._steady is not None:
            seconds, tokens, squares = self._steady.until(end)
            seconds, tokens, squares = (
                a - b for a, b in zip((seconds, tokens, squares), self._profiled, strict=True)
            )
            if tokens > 0:
                from_step = self._steady_step(state)
                self.totals["after_warmup"] = {
                    "from_step": from_step,
                    "tokens": tokens,
                    "seconds": seconds,
                    **self._figures(seconds, tokens, squares),
                    # A compile in the window (a new batch shape tuned) is part of its seconds; shown apart.
                    "triton_compile_seconds": round(
                        self.compiles.seconds_within((from_step or 0) + 1, self._profiled_steps()), 3
                    ),
                }
        self.totals["gpu_busy"] = self._gpu_busy or {"not_measured": self._why_no_gpu_busy(args)}
        if self.host_profile_steps:
            self.totals["host_profile"] = self._host_profile or {
                "not_measured": "the run ended before the warm-up and the GPU-busy steps were over"
            }
        if args.device.type == "cuda":
            stats = torch.cuda.memory_stats(args.device)
            self.totals["memory"] = {
                "peak_allocated_gib": torch.cuda.max_memory_allocated(args.device) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(args.device) / GIB,
                # Allocations that failed, freed the cache and retried: a process near its cap pays device syncs
                "alloc_retries": stats.get("num_alloc_retries", 0),
            }
            if self._steady_device_calls is not None:
                # A warm cache serves every allocation; cudaFree waits for the device, so a run at its memory
                # cap that keeps returning cached blocks to the driver shows here, not in alloc_retries.
                now = _device_memory_calls(stats)
                self.totals["memory"]["after_warmup"] = {
                    "cuda_mallocs": now[0] - self._steady_device_calls[0],
                    "cuda_frees": now[1] - self._steady_device_calls[1],
                }
        else:
            self.totals["memory"] = {"not_measured": "a CPU run: PyTorch tracks peak memory on GPUs"}
        self.totals["triton_compiles"] = self.compiles.record()
        self.totals["by_log"] = self.by_log

    def _steady_step(self, state: TrainerState) -> int | None:
        logged = [log["step"] for log in state.log_history if "loss" in log]
        return next((s for s in logged if s >= (self.warmup_steps or 0)), None)

    def _why_no_gpu_busy(self, args: TrainingArguments) -> str:
        if args.device.type != "cuda":
            return CPU_NO_GPU_BUSY
        if not self.gpu_busy_steps:
            return "turned off (gpu_busy_steps: 0)"
        return "the run ended before the warm-up was over"


def add_throughput_callback(
    trainer,
    peak_tflops: float | None = None,
    warmup_steps: int | None = None,
    gpu_busy_steps: int | None = None,
    host_profile_steps: int = 0,
) -> ThroughputCallback:
    """Attach a :class:`ThroughputCallback` first in ``trainer``'s callbacks, ahead of the reporting
    integrations and the progress bar, so all of them log its figures."""
    callback = ThroughputCallback(peak_tflops, warmup_steps, gpu_busy_steps, host_profile_steps)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
