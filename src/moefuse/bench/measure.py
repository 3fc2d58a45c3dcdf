"""Timing, memory, the GPU's dense matmul rate, the environment, and the agreement check between implementations."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import torch

from .provenance import commit_label, source_provenance

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest relative error ||x - ref|| / ||ref|| accepted per tensor: a few units of the dtype's rounding, which
# different but correct summation orders reach; a wrong kernel lands far above.
TOLERANCES = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}


def script_command(argv: list[str] | None) -> str:
    """The command line a benchmark script ran with (its file name, then ``argv`` or its own arguments), for its
    JSON."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])


def kept_path(path: Path, environment: dict) -> Path:
    """``path`` named for one run: ``<stem>_<commit7>[-dirty]_<UTC time><suffix>``, so runs are kept side by side
    (letters, digits, ``_`` and ``-`` only: the names the GPU machines' output folder hands back)."""
    commit = environment.get("moefuse_commit", "unknown")
    label = commit[:7] + ("-dirty" if commit.endswith("+dirty") else "")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return path.with_name(f"{path.stem}_{label}_{stamp}{path.suffix}")


def write_report(report: dict, path: Path) -> None:
    """``report`` as indented JSON at ``path`` (its folder made if missing), and a line saying where. An
    existing file is never overwritten: every run is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x") as file:
            file.write(json.dumps(report, indent=2) + "\n")
    except FileExistsError:
        raise SystemExit(f"{path} exists: runs are kept, not overwritten; give another path") from None
    print(f"wrote {path}")


@dataclass
class Timing:
    """Median and all per-iteration times of one measured callable, with its peak memory."""

    times_ms: list[float]
    peak_bytes: int | None = None
    start_bytes: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Frame(NamedTuple):
    """One frame of a call stack, hashable (``traceback.FrameSummary`` is not on Python 3.12)."""

    filename: str
    lineno: int | None
    name: str
    line: str | None


AUTOGRAD_ENGINE = "<autograd engine>"  # the frame naming the autograd node of a sync in the backward
_FRAME_LINE = re.compile(r'File "(?P<file>.*)", line (?P<line>\d+), in (?P<name>.*)')


def _forward_frames(node: object) -> list[Frame]:
    """The forward call that built an autograd ``node``, innermost last, as anomaly mode records it
    (``torch.autograd.set_detect_anomaly(True)`` while the forward ran); empty otherwise."""
    frames = []
    for text in node.metadata.get("traceback_", ()):
        if match := _FRAME_LINE.search(text):
            code = text.split("\n", 1)[1].strip() if "\n" in text.strip() else None
            frames.append(Frame(match["file"], int(match["line"]), match["name"].strip(), code))
    return frames


@contextmanager
def recorded_syncs(depth: int = 40) -> Iterator[Counter[tuple[Frame, ...]]]:
    """Each host synchronisation on CUDA while open (``torch.cuda.set_sync_debug_mode("warn")``): its call stack,
    innermost frame last, ``depth`` frames at most, with how often it ran. A sync inside the backward pass, where
    the Python stack ends at the autograd engine, gets one more frame naming the autograd node that ran it,
    followed, under anomaly mode, by the forward call that built the node."""
    sites: Counter[tuple[Frame, ...]] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" in str(message):  # not the note that the debug mode is a prototype
            # Leave out this function and the warnings module's frame that called it.
            stack = [
                Frame(f.filename, f.lineno, f.name, f.line) for f in traceback.extract_stack(limit=depth + 2)
            ]
            stack = stack[:-2]
            node = torch._C._current_autograd_node()
            if node is not None:
                stack.append(Frame(AUTOGRAD_ENGINE, None, node.name(), None))
                stack.extend(_forward_frames(node))
            sites[tuple(stack)] += 1

    # The mode is set before the warnings are taken over: setting it is not a sync of the code under watch.
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield sites
    finally:
        torch.cuda.set_sync_debug_mode(0)


def sync_owner(stack: tuple[Frame, ...]) -> str:
    """The file of the innermost frame of a sync's stack outside PyTorch and Transformers: the code that asked for
    the sync (Transformers' helpers are called by their users, e.g. TRL's loss calls its load-balancing loss). For
    a sync in the backward, the forward call that built its autograd node where it was recorded, else the engine."""
    for frame in reversed(stack):
        if frame.filename == AUTOGRAD_ENGINE:
            return AUTOGRAD_ENGINE  # the backward's own Python frames did not ask for it
        parts = frame.filename.split(os.sep)
        if "torch" not in parts and "transformers" not in parts:
            return frame.filename
    return stack[-1].filename if stack else ""


def format_sync_site(stack: tuple[Frame, ...]) -> str:
    return "".join(traceback.format_list(traceback.StackSummary.from_list(stack)))


def free_memory(device: torch.device) -> None:
    """Drop what the previous run left on the GPU, so each run's peak memory is its own (a no-op on the CPU,
    where no peak is measured)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def time_call(
    fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int, max_seconds: float
) -> Timing:
    """Run ``fn`` ``warmup`` times, then time up to ``iters`` calls: CUDA events on a GPU, ``perf_counter`` on the
    CPU. ``max_seconds`` caps the whole (warm-up included) once 1 warm-up and 3 timed calls are in, so a slow
    baseline costs a few calls, not minutes. Peak memory covers the warm-up and the timed calls.

    On a GPU the timed calls are queued back to back, with no sync between them, as a training loop runs them:
    where the GPU work of a call outlasts the host's work of launching the next, each figure is the GPU's time
    for one call; where it does not, the launch overhead shows."""
    free_memory(device)
    start_bytes = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    deadline = time.perf_counter() + max_seconds
    for _ in range(max(warmup, 1)):
        fn()
        synchronize(device)
        if time.perf_counter() > deadline:
            break
    times: list[float] = []
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    for _ in range(max(iters, 3)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) + len(events) >= 3 and time.perf_counter() > deadline:
            break
    synchronize(device)
    times += [start.elapsed_time(end) for start, end in events]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Timing(times, peak, start_bytes)


def dense_matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> dict:
    """The rate of one ``[n, n] @ [n, n]`` matmul in ``dtype`` on this device: the yardstick the kernels aim at."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device, warmup=3, iters=20, max_seconds=5.0)
    flops = 2 * n**3
    return {
        "shape": [n, n, n],
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": timing.median_ms,
        "tflops": flops / (timing.median_ms * 1e-3) / 1e12,
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Where the figures were measured: device, driver and library versions."""
    import moefuse

    source = source_provenance()
    env = {
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "moefuse": moefuse.__version__,
        "moefuse_commit": commit_label(source),
        "moefuse_commit_source": source["source"],
        **{pkg: _version(pkg) for pkg in ("torch", "triton", "transformers", "peft")},
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            driver=_nvidia_driver(),
            cuda=torch.version.cuda,
        )
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in fp32 (``inf`` for non-finite values, 0 when both are zero)."""
    value, reference = value.float(), reference.to(value.device).float()
    if not torch.isfinite(value).all():
        return float("inf")
    diff = (value - reference).norm().item()
    scale = reference.norm().item()
    return diff / scale if scale > 0 else diff


# Where a level measures a noise floor (the reference against itself with its experts' outputs perturbed by one
# rounding unit), a tensor may differ by this many times its floor: correct kernels round differently, and
# through several layers that moves a few routing decisions (measured: eager vs grouped_mm gradients differ by
# up to 1.4x the floor); a wrong kernel lands far above.
NOISE_FLOOR_MARGIN = 3.0


@dataclass
class Check:
    """One implementation's outputs and gradients against the reference implementation's: each tensor may
    differ by ``tolerance``, or by ``NOISE_FLOOR_MARGIN`` times its noise floor where that is larger."""

    reference: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)
    allowed: dict[str, float] = field(default_factory=dict)
    not_compared: list[str] = field(default_factory=list)

    @property
    def worst(self) -> str | None:
        """The tensor closest to (or furthest past) what it is allowed."""
        return max(self.errors, key=lambda n: self.errors[n] / self.allowed[n], default=None)

    @property
    def ok(self) -> bool:
        return all(self.errors[name] <= self.allowed[name] for name in self.errors)

    def as_dict(self) -> dict:
        worst = self.worst
        return {
            "reference": self.reference,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "max_relative_error": max(self.errors.values(), default=0.0),
            "worst_tensor": worst,
            "worst_error": self.errors[worst] if worst else None,
            "worst_allowed": self.allowed[worst] if worst else None,
            "errors": self.errors,
            "allowed": {n: a for n, a in self.allowed.items() if a != self.tolerance},
            "not_compared": self.not_compared,
        }


def compare(
    tensors: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    reference_name: str,
    tolerance: float,
    noise_floor: dict[str, float] | None = None,
) -> Check:
    """Relative error of every tensor of the reference; one this implementation lacks or shapes differently
    counts as infinitely wrong (a gradient that never arrives is a bug, not a skip)."""
    check = Check(reference_name, tolerance)
    for name, ref in reference.items():
        value = tensors.get(name)
        if value is None or value.shape != ref.shape:
            check.errors[name] = float("inf")
        else:
            check.errors[name] = relative_error(value, ref)
        floor = (noise_floor or {}).get(name, 0.0)
        check.allowed[name] = max(tolerance, NOISE_FLOOR_MARGIN * floor)
    check.not_compared = [name for name in tensors if name not in reference]
    return check


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (the reference is kept off the GPU so it does not count in later peaks)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
