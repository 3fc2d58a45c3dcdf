"""Which implementation runs the grouped GEMMs: the Triton kernels or the PyTorch path.

``auto`` (the default) takes Triton for CUDA tensors on sm80+ when Triton is installed, and the PyTorch path
everywhere else. Force one with the environment variable ``MOEFUSE_BACKEND=triton|torch|auto``, with
:func:`set_backend`, or for a block of code with ``with use_backend("torch"): ...``. Forcing ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1`` set before ``moefuse`` is imported (Triton's interpreter; for tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "MOEFUSE_BACKEND"
_forced: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown moefuse backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend asked for: :func:`set_backend`'s, else ``$MOEFUSE_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r} is not a moefuse backend: choose one of {', '.join(BACKENDS)}")
    return value


def set_backend(name: str | None) -> None:
    """Force ``"triton"`` or ``"torch"`` (or ``"auto"``) for every later call; ``None`` goes back to the env var."""
    global _forced
    _forced = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("torch"): ...`` runs the block on that backend."""
    global _forced
    previous, _forced = _forced, _check(name)
    try:
        yield
    finally:
        _forced = previous


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def device_capability(index: int | None) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(index)``, cached: ops ask on every call, and each ask costs host time
    (docs/measurements.md)."""
    return torch.cuda.get_device_capability(index)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the grouped GEMMs on ``tensor``'s device run on the Triton kernels."""
    backend = get_backend()
    if backend == "torch":
        return False
    on_gpu = tensor.device.type == "cuda" and device_capability(tensor.device.index) >= (8, 0)
    if backend == "auto":
        return on_gpu and triton_available()
    if not triton_available():
        raise RuntimeError(
            "moefuse backend 'triton' was asked for but Triton is not installed (pip install triton)"
        )
    if not on_gpu and not (tensor.device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"moefuse backend 'triton' cannot run on {tensor.device}: it needs a CUDA GPU of compute capability "
            "8.0 or newer (or TRITON_INTERPRET=1 set before importing moefuse, to interpret the kernels on the CPU)"
        )
    return True


def active_backend_description(device: torch.device) -> str:
    """One line for ``moefuse info``: what runs the experts on ``device`` with the current settings."""
    probe = torch.empty(0, device=device)
    try:
        if use_triton(probe):
            mode = " (interpreted on the CPU)" if device.type == "cpu" else ""
            return f"Triton kernels{mode}: gather, SwiGLU and combine fused into grouped GEMMs"
    except RuntimeError as error:
        return f"unavailable: {error}"
    return "PyTorch: torch.nn.functional.grouped_mm where strides allow, per-expert loop otherwise"
