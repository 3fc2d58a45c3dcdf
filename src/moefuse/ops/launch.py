"""Launch an autotuned Triton kernel with less host work per call.

Through ``kernel[grid](...)``, every call of an autotuned kernel passes Triton's ``Autotuner`` (a key built from
dicts of all arguments, configs looked up, hooks) and ``Heuristics`` before the compiled kernel's own launcher: on
an H100 that is ~140 us of CPU per launch against ~47 us for the JIT function alone, and a training step of a
MoE model issues dozens of launches per layer, so the host, not the GPU, sets the pace of short steps.
:func:`launch` asks the autotuner once per key (it tunes, or takes its cached choice) and from then on calls the
JIT function with the chosen config directly. Set ``MOEFUSE_FAST_LAUNCH=0`` to go through the autotuner on
every call (for comparison).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from triton.runtime.autotuner import Autotuner, Heuristics

FAST_LAUNCH = os.environ.get("MOEFUSE_FAST_LAUNCH", "1") not in ("", "0")

Grid = Callable[[dict], tuple[int, ...]]


class _Launcher:
    """One autotuned kernel: its key's positions, its heuristics, and the config chosen for each key seen."""

    def __init__(self, autotuner: Autotuner):
        self.autotuner = autotuner
        self.arg_names: list[str] = list(autotuner.arg_names)
        keys = set(autotuner.keys)
        self.key_positions = [i for i, name in enumerate(self.arg_names) if name in keys]
        self.heuristics: list[tuple[str, Callable[[dict], object]]] = []
        fn = autotuner.fn
        while isinstance(fn, Heuristics):  # outermost first, as they run
            self.heuristics.extend(fn.values.items())
            fn = fn.fn
        self.jit = fn
        self.chosen: dict[tuple, dict] = {}

    def key(self, args: tuple, constexprs: dict) -> tuple:
        """What the autotuner keys on (key arguments, every tensor's dtype), plus the device: its shared memory
        decides which configs are kept."""
        positional = [args[i] for i in self.key_positions if i < len(args)]
        named = [constexprs[name] for name in self.autotuner.keys if name in constexprs]
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return (args[0].device, *positional, *named, *dtypes)

    def __call__(self, grid: Grid, args: tuple, constexprs: dict) -> None:
        key = self.key(args, constexprs)
        chosen = self.chosen.get(key)
        if chosen is None:
            self.autotuner[grid](*args, **constexprs)  # tunes on the first call of this key
            self.chosen[key] = self.autotuner.best_config.all_kwargs()
            return
        meta = {**constexprs, **chosen}
        if self.heuristics:
            named = dict(zip(self.arg_names, args, strict=False), **meta)  # arg_names also lists constexprs
            for name, heuristic in self.heuristics:
                meta[name] = named[name] = heuristic(named)
        self.jit[grid(meta)](*args, **meta)


_launchers: dict[int, _Launcher] = {}


def launch(kernel: Autotuner, grid: Grid, *args: object, **constexprs: object) -> None:
    """``kernel[grid](*args, **constexprs)`` for an autotuned kernel, skipping the autotuner once its choice for
    this key is known. ``args`` are the kernel's non-constexpr arguments, in order; ``grid`` maps the launch's
    meta-parameters (``BLOCK_M``, ...) to the grid."""
    if not FAST_LAUNCH:
        kernel[grid](*args, **constexprs)
        return
    launcher = _launchers.get(id(kernel))
    if launcher is None or launcher.autotuner is not kernel:
        launcher = _launchers[id(kernel)] = _Launcher(kernel)
    launcher(grid, args, constexprs)
