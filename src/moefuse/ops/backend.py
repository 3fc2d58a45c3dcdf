"""Which implementation runs the grouped GEMMs: the Triton kernels or the PyTorch path.

``auto`` (the default) takes Triton for CUDA tensors on sm80+ when Triton is installed, and the PyTorch path
everywhere else. The setting is :attr:`moefuse.settings.Settings.backend`: ``MOEFUSE_BACKEND=triton|torch|auto``,
or for a block of code ``with use_backend("torch"): ...``. Forcing ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before ``moefuse`` is imported (Triton's interpreter; for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from ..settings import BACKENDS, override_settings, settings

__all__ = ["BACKENDS", "get_backend", "use_backend", "use_triton"]


def get_backend() -> str:
    """The backend asked for: ``auto``, ``triton`` or ``torch``."""
    return settings().backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("torch"): ...`` runs the block on that backend (``override_settings(backend=name)``)."""
    with override_settings(backend=name):
        yield


# Read once: the plan asks on every call, also while torch.compile traces it.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_capabilities: dict[int | None, tuple[int, int]] = {}


def triton_available() -> bool:
    return TRITON_AVAILABLE


def device_capability(index: int | None) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(index)``, asked once per device: ops ask on every call, and each ask
    costs host time (docs/measurements.md)."""
    capability = _capabilities.get(index)
    if capability is None:
        capability = _capabilities[index] = torch.cuda.get_device_capability(index)
    return capability


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the grouped GEMMs on ``tensor``'s device run on the Triton kernels, under the current settings."""
    backend = settings().backend
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


def launches_triton(tensor: torch.Tensor) -> bool:
    """Whether an op that launches its Triton kernels from Python (RMSNorm, RoPE, cross-entropy; the experts are
    custom operators instead) runs them on ``tensor``: :func:`use_triton`, and not while torch.compile traces.
    A compiled graph takes the op's PyTorch reference, which the compiler fuses itself; tracing into a launch
    would break the graph."""
    return not torch.compiler.is_compiling() and use_triton(tensor)


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
