"""Launch an autotuned Triton kernel with less host work per call.

Through ``kernel[grid](...)``, every call of an autotuned kernel passes Triton's ``Autotuner`` (a key built from
dicts of all arguments, configs looked up, hooks), ``Heuristics`` and the JIT function's binder (each argument's
specialisation, a cache key with the compile options as a string) before the compiled kernel's own launcher,
all of it CPU work on every launch (the JIT function's binder a large share of it; docs/measurements.md). A
training step of a MoE model issues dozens of launches per layer, so the host, not the GPU, sets the pace of
short steps.

:func:`launch` asks the autotuner once per key (it tunes, or takes its cached choice) and the JIT function once
per set of arguments (it compiles, or takes its cached kernel); from then on a call with the same arguments up
to their values (tensors: dtype and 16-byte alignment; integers and floats: exact values; the constexprs) launches the
compiled kernel directly. That key is finer than what Triton specialises on, so a launch never reaches a kernel
compiled for other arguments. Set ``MOEFUSE_FAST_LAUNCH=0`` to go through Triton's path on every call.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:  # Triton is optional: without it nothing launches, and the helpers below serve the PyTorch paths
    from triton import knobs
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:
    knobs = Autotuner = Heuristics = driver = JITFunction = None

FAST_LAUNCH = os.environ.get("MOEFUSE_FAST_LAUNCH", "1") not in ("", "0")
# Under TRITON_INTERPRET=1 the JIT function is Triton's interpreter, which returns no compiled kernel.
_COMPILED = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# Integer arguments are dims and strides (a handful of values per model); a bound keeps a caller that passes
# ever-new values from growing the cache without end.
_MAX_COMPILED = 4096
# Keyword arguments a launch takes besides the kernel's constexprs.
_LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"})

Grid = Callable[[dict], tuple[int, ...]]


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python: Triton's helpers are JIT functions, whose every call costs
    host time (docs/measurements.md), and launchers run on every call."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) as the row kernels read it, columns adjacent in memory: itself when they are (or when it has one
    column), else a contiguous copy. Rows may sit at any stride."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _launch_hooks() -> bool:
    """Whether launch hooks are installed (a profiler's): they need Triton's own launch path."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


class _Launcher:
    """One kernel (autotuned or a plain JIT function): its autotuning key's positions, its heuristics, the config
    chosen for each autotuning key and the compiled kernel for each set of arguments seen."""

    def __init__(self, kernel: Autotuner | JITFunction):
        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        fn = kernel.fn if self.autotuner else kernel
        self.arg_names: list[str] = list(kernel.arg_names)
        keys = set(self.autotuner.keys if self.autotuner else ())
        self.key_positions = [i for i, name in enumerate(self.arg_names) if name in keys]
        self.heuristics: list[tuple[str, Callable[[dict], object]]] = []
        while isinstance(fn, Heuristics):  # outermost first, as they run
            self.heuristics.extend(fn.values.items())
            fn = fn.fn
        self.jit = fn
        self.chosen: dict[tuple, dict] = {}
        # arguments' key -> (compiled kernel, meta-parameters, constexpr values in parameter order)
        self.compiled: dict[tuple, tuple[object, dict, list]] = {}

    def autotuning_key(self, args: tuple, constexprs: dict) -> tuple:
        """What the autotuner keys on (key arguments, every tensor's dtype), plus the device: its shared memory
        decides which configs are kept."""
        positional = [args[i] for i in self.key_positions if i < len(args)]
        named = [constexprs[name] for name in self.autotuner.keys if name in constexprs]
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return (args[0].device, *positional, *named, *dtypes)

    def meta(self, grid: Grid, args: tuple, constexprs: dict) -> dict | None:
        """The launch's meta-parameters (constexprs, the chosen config, heuristics), or ``None`` when this call
        went to the autotuner (which launched it)."""
        unknown = constexprs.keys() - set(self.arg_names) - _LAUNCH_OPTIONS
        if unknown:  # a compiled launch refuses these; Triton's interpreter would silently ignore them
            raise TypeError(f"{self.jit.fn.__name__} has no parameter {', '.join(sorted(unknown))}")
        if self.autotuner is None:
            return dict(constexprs)
        key = self.autotuning_key(args, constexprs)
        chosen = self.chosen.get(key)
        if chosen is None:
            self.autotuner[grid](*args, **constexprs)  # tunes on the first call of this key
            self.chosen[key] = self.autotuner.best_config.all_kwargs()
            return None
        meta = {**constexprs, **chosen}
        if self.heuristics:
            named = dict(zip(self.arg_names, args, strict=False), **meta)  # arg_names also lists constexprs
            for name, heuristic in self.heuristics:
                meta[name] = named[name] = heuristic(named)
        return meta

    def __call__(self, grid: Grid, args: tuple, constexprs: dict) -> None:
        if not _COMPILED or _launch_hooks():
            meta = self.meta(grid, args, constexprs)
            if meta is not None:
                self.jit[grid(meta)](*args, **meta)
            return
        device = driver.active.get_current_device()
        key = (
            device,
            *constexprs.values(),
            *[a if type(a) is int or type(a) is float else (a.dtype, a.data_ptr() % 16 == 0) for a in args],
        )
        entry = self.compiled.get(key)
        if entry is None:  # Triton's own path: compiles, or finds its kernel for these arguments
            meta = self.meta(grid, args, constexprs)
            if meta is not None:
                compiled = self.jit[grid(meta)](*args, **meta)
                if len(self.compiled) >= _MAX_COMPILED:
                    self.compiled.clear()
                self.compiled[key] = (compiled, meta, [meta[n] for n in self.arg_names[len(args) :]])
            return
        compiled, meta, constants = entry
        grid_size = grid(meta)
        # The compiled kernel takes every parameter in order, constexprs included (its launcher skips them).
        compiled.run(
            grid_size[0],
            grid_size[1] if len(grid_size) > 1 else 1,
            grid_size[2] if len(grid_size) > 2 else 1,
            driver.active.get_current_stream(device),
            compiled.function,
            compiled.packed_metadata,
            None,  # launch metadata: only for launch hooks, and there are none
            None,
            None,
            *args,
            *constants,
        )


_launchers: dict[int, _Launcher] = {}


def launch(kernel: Autotuner | JITFunction, grid: Grid, *args: object, **constexprs: object) -> None:
    """``kernel[grid](*args, **constexprs)`` for an autotuned kernel or a JIT function, skipping the autotuner and
    the JIT function's binder once their choices for these arguments are known. ``args`` are the kernel's
    non-constexpr arguments, in order (tensors, integers, floats); ``grid`` maps the launch's meta-parameters
    (``BLOCK_M``, ...) to the grid."""
    if not FAST_LAUNCH:
        kernel[grid](*args, **constexprs)
        return
    launcher = _launchers.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _launchers[id(kernel)] = _Launcher(kernel)
    launcher(grid, args, constexprs)
