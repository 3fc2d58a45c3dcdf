"""Launch a Triton kernel by keyword, with less host work per call.

Every launch names each argument (``launch(kernel, grid, a_ptr=a, N=n, ..., BLOCK_R=8)``): the kernel's
parameters that its autotuner's configs and heuristics do not set, plus launch options (``num_warps``, ...). The
names are mapped to positions once per kernel, from its signature; a missing or unknown name is a ``TypeError``
naming the kernel, on every backend (Triton's interpreter would silently ignore an unknown keyword).

Through ``kernel[grid](...)``, every call of an autotuned kernel passes Triton's ``Autotuner`` (a key built from
dicts of all arguments, configs looked up, hooks), ``Heuristics`` and the JIT function's binder (each argument's
specialisation, a cache key with the compile options as a string) before the compiled kernel's own launcher,
all of it CPU work on every launch (the JIT function's binder a large share of it; docs/measurements.md). A
training step of a MoE model issues dozens of launches per layer, so the host, not the GPU, sets the pace of
short steps.

:func:`launch` asks the autotuner once per key (it tunes, or takes its cached choice) and the JIT function once
per set of arguments (it compiles, or takes its cached kernel); from then on a call with the same arguments up
to their values (tensors: dtype and 16-byte alignment; integers and floats: exact values; the constexprs and
launch options) launches the compiled kernel directly. That key is finer than what Triton specialises on, so a
launch never reaches a kernel compiled for other arguments. The one exception are the integers a kernel declares
``do_not_specialize`` (the batch's size, which changes from step to step with packed rows): Triton compiles one
kernel for all their values, and the key holds only their width (32 or 64 bits), so a new size launches directly
too. Such an integer must not feed the autotuner's key or a heuristic (checked for the key). The setting
``fast_launch=False`` (``MOEFUSE_FAST_LAUNCH=0``) goes through Triton's path on every call.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from operator import itemgetter

import torch

from ..settings import settings

try:  # Triton is optional: without it nothing launches, and the helpers below serve the PyTorch paths
    from triton import knobs
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:
    knobs = Autotuner = Heuristics = driver = JITFunction = None

# Under TRITON_INTERPRET=1 the JIT function is Triton's interpreter, which returns no compiled kernel.
_COMPILED = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# Integer arguments are dims and strides (a handful of values per model); a bound keeps a caller that passes
# ever-new values from growing the cache without end.
_MAX_COMPILED = 4096
# Keyword arguments a launch takes besides the kernel's parameters.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
_NO_OPTIONS: dict = {}  # shared, never written

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
    """One kernel (autotuned or a plain JIT function): the order of its parameters, its autotuning key's
    positions, its heuristics, the config chosen for each autotuning key and the compiled kernel for each set of
    arguments seen."""

    def __init__(self, kernel: Autotuner | JITFunction):
        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        fn = kernel.fn if self.autotuner else kernel
        self.heuristics: list[tuple[str, Callable[[dict], object]]] = []
        while isinstance(fn, Heuristics):  # outermost first, as they run
            self.heuristics.extend(fn.values.items())
            fn = fn.fn
        self.jit = fn
        self.name: str = fn.fn.__name__
        self.arg_names: list[str] = list(kernel.arg_names)
        # `tl.constexpr`, or its name where the kernel's module postpones annotations (as Triton reads it).
        constexpr = ["constexpr" in str(p.annotation) for p in inspect.signature(fn.fn).parameters.values()]
        runtime = constexpr.index(True) if True in constexpr else len(constexpr)
        if not all(constexpr[runtime:]):  # the fast path passes the runtime arguments, then the constexprs
            raise TypeError(f"{self.name}: launch() takes kernels whose constexpr parameters come last")
        self.runtime, self.runtime_names = runtime, self.arg_names[:runtime]
        tuned = [c.kwargs for c in self.autotuner.configs] if self.autotuner else []
        self.set_by_kernel = {name for names in [*tuned, dict(self.heuristics)] for name in names}
        self.constexpr_names = [n for n in self.arg_names[runtime:] if n not in self.set_by_kernel]
        self.names = self.runtime_names + self.constexpr_names  # what a caller passes, in order
        # One C-level lookup of every name (a single name: itemgetter returns the value, not a 1-tuple).
        self.take = (
            itemgetter(*self.names) if len(self.names) > 1 else lambda d: tuple(d[n] for n in self.names)
        )
        keys = set(self.autotuner.keys if self.autotuner else ())
        self.key_positions = [i for i, name in enumerate(self.runtime_names) if name in keys]
        declared = getattr(fn, "do_not_specialize", None)
        if declared is None:  # Triton's interpreter keeps the decorator's arguments as they were given
            declared = fn.kwargs.get("do_not_specialize") or ()
        self.unspecialized = [
            i for i, name in enumerate(self.runtime_names) if name in declared or i in declared
        ]
        if keys & {self.arg_names[i] for i in self.unspecialized}:
            raise TypeError(f"{self.name}: a do_not_specialize parameter cannot be an autotuning key")
        self.chosen: dict[tuple, dict] = {}
        # arguments' key -> (compiled kernel, meta-parameters, every constexpr's value in parameter order)
        self.compiled: dict[tuple, tuple[object, dict, list]] = {}

    def split(self, arguments: dict) -> tuple[tuple, tuple, dict]:
        """``(runtime arguments, constexprs, launch options)`` from ``arguments``, the first two in parameter order
        (this runs on every launch: no dict built unless there are launch options)."""
        try:
            values = self.take(arguments)
        except KeyError:
            missing = ", ".join(n for n in self.names if n not in arguments)
            raise TypeError(f"{self.name}: missing argument {missing}") from None
        options = _NO_OPTIONS
        if len(arguments) != len(self.names):  # the extras are launch options, or unknown
            options = {name: arguments[name] for name in _LAUNCH_OPTIONS if name in arguments}
            if len(arguments) != len(self.names) + len(options):
                unknown = arguments.keys() - {*self.names, *_LAUNCH_OPTIONS}
                tuned = sorted(unknown & self.set_by_kernel)
                if tuned:
                    raise TypeError(
                        f"{self.name}: {', '.join(tuned)} set by its autotuner configs or heuristics"
                    )
                raise TypeError(f"{self.name} has no parameter {', '.join(sorted(unknown))}")
        return values[: self.runtime], values[self.runtime :], options

    def constexprs(self, constants: tuple, options: dict) -> dict:
        """The constexprs and launch options by name, as Triton's own path takes them."""
        return dict(zip(self.constexpr_names, constants, strict=True), **options)

    def autotuning_key(self, args: tuple, constexprs: dict) -> tuple:
        """What the autotuner keys on (key arguments, every tensor's dtype), plus the device: its shared memory
        decides which configs are kept."""
        positional = [args[i] for i in self.key_positions]
        named = [constexprs[name] for name in self.autotuner.keys if name in constexprs]
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return (args[0].device, *positional, *named, *dtypes)

    def meta(self, grid: Grid, args: tuple, constexprs: dict) -> dict | None:
        """The launch's meta-parameters (constexprs, the chosen config, heuristics), or ``None`` when this call
        went to the autotuner (which launched it)."""
        if self.autotuner is None:
            return constexprs
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

    def __call__(self, grid: Grid, arguments: dict) -> None:
        args, constants, options = self.split(arguments)
        if not settings().fast_launch:
            self.kernel[grid](*args, **self.constexprs(constants, options))
            return
        if not _COMPILED or _launch_hooks():
            meta = self.meta(grid, args, self.constexprs(constants, options))
            if meta is not None:
                self.jit[grid(meta)](*args, **meta)
            return
        device = driver.active.get_current_device()
        values = [
            a if type(a) is int or type(a) is float else (a.dtype, a.data_ptr() % 16 == 0) for a in args
        ]
        for i in self.unspecialized:  # Triton's type for it: i32, or 64 bits past that
            values[i] = -(2**31) <= args[i] < 2**31
        key = (device, *constants, *options.items(), *values)
        entry = self.compiled.get(key)
        if entry is None:  # Triton's own path: compiles, or finds its kernel for these arguments
            meta = self.meta(grid, args, self.constexprs(constants, options))
            if meta is not None:
                compiled = self.jit[grid(meta)](*args, **meta)
                if len(self.compiled) >= _MAX_COMPILED:
                    self.compiled.clear()
                self.compiled[key] = (compiled, meta, [meta[n] for n in self.arg_names[len(args) :]])
            return
        compiled, meta, constexpr_values = entry
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
            *constexpr_values,
        )


_launchers: dict[int, _Launcher] = {}


def launch(kernel: Autotuner | JITFunction, grid: Grid, /, **arguments: object) -> None:
    """``kernel[grid](...)`` for an autotuned kernel or a JIT function, every argument by name, skipping the
    autotuner and the JIT function's binder once their choices for these arguments are known. ``arguments``: each
    parameter the kernel's autotuner configs and heuristics do not set, and launch options (``num_warps``, ...);
    ``grid`` maps the launch's meta-parameters (``BLOCK_M``, ...) to the grid."""
    launcher = _launchers.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _launchers[id(kernel)] = _Launcher(kernel)
    launcher(grid, arguments)
