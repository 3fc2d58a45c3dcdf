"""Runs the implementations of one level side by side: agreement check first, then the timings, as rows."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from .implementations import Implementation, baseline_name, canonical_name
from .measure import compare, free_memory, time_call, to_cpu
from .shapes import MoeShape

# Implementations preferred as the reference the others are checked against: Transformers' own paths.
REFERENCE_ORDER = ("eager", "grouped_mm")
BASELINES = ("grouped_mm", "eager")


class Workload(Protocol):
    """One implementation, ready to run on the level's inputs."""

    def check_tensors(self) -> dict[str, torch.Tensor]:
        """Outputs and gradients of one forward+backward, by name (compared across implementations)."""

    def perturbed_check_tensors(self) -> dict[str, torch.Tensor] | None:
        """``check_tensors`` with every experts output perturbed by one rounding unit of noise, whose distance
        to ``check_tensors`` is the noise floor of the comparison (``None`` where the level needs none)."""

    def run(self, mode: str) -> None:
        """One timed call: ``fwd``, ``fwd+bwd`` or ``step``."""

    def flops(self, mode: str) -> float:
        """Useful FLOPs of one call in ``mode`` (the level's formula)."""

    def details(self) -> dict:
        """Figures of this workload the rows carry besides the timings (e.g. trainable parameters)."""

    def close(self) -> None:
        """Undo what ``make`` did to shared state (e.g. take the LoRA layers out of a shared model)."""


@dataclass
class Case:
    """An implementation within a group; ``make`` builds its workload (the group's inputs and weights are shared)."""

    group: str
    implementation: Implementation
    make: Callable[[], Workload]

    @property
    def label(self) -> str:
        name = self.implementation.name
        return f"{self.group}/{name}" if self.group else name


@dataclass
class BenchContext:
    """Everything a level needs to build its cases."""

    config: PretrainedConfig
    shape: MoeShape
    device: torch.device
    dtype: torch.dtype
    implementations: list[Implementation]
    seed: int
    options: dict = field(default_factory=dict)  # level-specific settings (layers, setups, lora rank, ...)


def reference_first(cases: list[Case]) -> list[Case]:
    """Transformers' ``eager``, then ``grouped_mm``, then the order given: the first that runs is the reference."""

    def rank(case: Case) -> int:
        impl = case.implementation
        if impl.name in REFERENCE_ORDER:
            return REFERENCE_ORDER.index(impl.name)
        return len(REFERENCE_ORDER)

    return sorted(cases, key=rank)


def run_group(
    level: str,
    cases: list[Case],
    tokens: int,
    modes: list[str],
    ctx: BenchContext,
    tolerance: float,
    timing_args: dict,
    progress: tqdm | None = None,
) -> list[dict]:
    """Check every case against the first that runs (Transformers' eager, else grouped_mm), then time each mode.

    Each case is built, checked, timed and closed before the next is built, so only one implementation's state
    (optimizer, LoRA layers, activations) is alive at a time and each peak memory is its own."""
    rows: list[dict] = []
    reference: tuple[str, dict[str, torch.Tensor]] | None = None
    noise_floor: dict[str, float] | None = None
    for case in reference_first(cases):
        impl = case.implementation
        base = {"level": level, "tokens": tokens, "group": case.group, "implementation": impl.name}
        if progress is not None:
            progress.set_postfix_str(f"{level} {tokens} tokens {case.label}")
        workload = None
        try:
            with impl.active():
                workload = case.make()
                tensors = workload.check_tensors()
                if reference is None:
                    reference = (impl.name, to_cpu(tensors))
                    check: dict = {"reference": impl.name, "is_reference": True, "ok": True}
                    perturbed = workload.perturbed_check_tensors()
                    if perturbed is not None:
                        noise_floor = compare(perturbed, reference[1], impl.name, tolerance).errors
                        check["noise_floor"] = noise_floor
                    del perturbed
                else:
                    check = compare(tensors, reference[1], reference[0], tolerance, noise_floor).as_dict()
                del tensors
                extra = {"backend": impl.backend_in_use(ctx.device), **workload.details(), "check": check}
                for mode in modes:
                    timing = time_call(lambda m=mode, w=workload: w.run(m), ctx.device, **timing_args)
                    rows.append(
                        {
                            **base,
                            "mode": mode,
                            "median_ms": timing.median_ms,
                            "times_ms": timing.times_ms,
                            "flops": workload.flops(mode),
                            "peak_bytes": timing.peak_bytes,
                            "start_bytes": timing.start_bytes,
                            **extra,
                        }
                    )
        except torch.OutOfMemoryError as error:
            # Running out of memory is a result (e.g. eager at 32k tokens), not a failure of the bench.
            rows.append(
                {**base, "mode": "-", "error": f"out of memory: {str(error).splitlines()[0]}", "oom": True}
            )
        except Exception as error:  # a crash is reported in the table and fails the run
            (progress.write if progress is not None else print)(traceback.format_exc())
            rows.append({**base, "mode": "-", "error": f"{type(error).__name__}: {error}"})
        finally:
            if workload is not None:
                workload.close()
            workload = None  # before free_memory: this case's state goes before the next is built
            free_memory(ctx.device)
            if progress is not None:
                progress.update()
    return rows


def add_ratios(rows: list[dict], dense_tflops: float | None) -> None:
    """Throughput, fraction of the dense matmul rate, and speed-ups against the baselines of the same group."""
    timed = [r for r in rows if "median_ms" in r]
    for row in timed:
        seconds = row["median_ms"] * 1e-3
        row["tokens_per_s"] = row["tokens"] / seconds
        row["tflops"] = row["flops"] / seconds / 1e12
        row["fraction_of_dense_peak"] = row["tflops"] / dense_tflops if dense_tflops else None
        row["peak_gib"] = row["peak_bytes"] / 2**30 if row["peak_bytes"] is not None else None
        key = (row["level"], row["tokens"], row["group"], row["mode"])
        same_setup = {
            canonical_name(r["implementation"]): r
            for r in timed
            if (r["level"], r["tokens"], r["group"], r["mode"]) == key
        }
        baselines = {
            **{f"speedup_vs_{b}": b for b in BASELINES},
            # grouped_mm given the same loss, norms and compile setting; and compiled, as a user gets it with one flag
            "speedup_like_for_like": baseline_name(row["implementation"]),
            "speedup_vs_compiled_baseline": baseline_name(row["implementation"], compiled=True),
        }
        for field_name, baseline in baselines.items():
            match = same_setup.get(baseline)
            row[field_name] = match["median_ms"] / row["median_ms"] if match else None


def failures(rows: list[dict]) -> list[str]:
    """One line per row that makes the run fail: a crash, or outputs that disagree with the reference."""
    lines = []
    for row in rows:
        where = f"{row['level']} {row['tokens']} tokens {row['group'] + '/' if row['group'] else ''}"
        where += row["implementation"]
        if "error" in row and not row.get("oom"):
            lines.append(f"{where}: {row['error']}")
        check = row.get("check")
        if check and not check["ok"]:
            lines.append(
                f"{where} disagrees with {check['reference']}: {check['worst_tensor']} relative error "
                f"{check['worst_error']:.3g} > allowed {check['worst_allowed']:.3g}"
            )
    return list(dict.fromkeys(lines))  # every mode of a case carries the same check: one line per case
