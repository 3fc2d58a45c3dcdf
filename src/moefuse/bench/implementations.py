"""The implementations a bench compares, by name: Transformers' experts implementations (``eager``,
``grouped_mm``, ``batched_mm``, ...) and ``moefuse``, optionally with its kernel backend forced
(``moefuse:torch``, ``moefuse:triton``). Suffixes (model level only) swap in moefuse's kernels for parts of the
model outside the experts, as ``moefuse train`` and ``moefuse.Qwen3MoeFusedForCausalLM`` do: ``+loss`` computes
the causal-LM loss with :func:`~moefuse.ops.causal_lm_loss` instead of Transformers' ``ForCausalLMLoss``, ``+norm``
runs the RMSNorm modules through :func:`~moefuse.ops.rms_norm`, ``+rope`` the rotary embeddings through
:func:`~moefuse.ops.apply_rotary_pos_emb` (``moefuse+loss+norm+rope``; on ``grouped_mm`` they show what those
kernels alone give Transformers' experts). ``+compile`` (any level) runs the block or model under
``torch.compile`` with its default options, as the Trainer's ``torch_compile=True`` does."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from ..experts import EXPERTS_IMPLEMENTATION

DEFAULT_IMPLEMENTATIONS = f"{EXPERTS_IMPLEMENTATION},grouped_mm,eager"
# Model-level suffixes: the loss, the norms and the rotary embeddings from moefuse; then torch.compile, at any level.
MODEL_LEVEL_MODIFIERS = ("loss", "norm", "rope")
MODIFIERS = (*MODEL_LEVEL_MODIFIERS, "compile")
# The baseline a ratio is taken against: Transformers' grouped_mm experts given the same suffixes.
BASELINE_EXPERTS = "grouped_mm"
# The module of moefuse that selects the grouped-GEMM backend (use_backend / BACKENDS).
_BACKEND_MODULE = "moefuse.ops.backend"


@dataclass(frozen=True)
class Implementation:
    """One column of the comparison: ``experts`` is the name Transformers dispatches the experts to;
    ``backend`` (moefuse only) forces moefuse's grouped-GEMM backend, ``None`` leaves moefuse's own choice;
    ``moefuse_loss``: the model level's loss is moefuse's ``causal_lm_loss`` (else Transformers');
    ``moefuse_norm``: the model's RMSNorm modules run moefuse's ``rms_norm`` (else their own forward);
    ``moefuse_rope``: the model's rotary embeddings run moefuse's ``apply_rotary_pos_emb`` (else its family's);
    ``compiled``: the block or model runs under ``torch.compile``."""

    name: str
    experts: str
    backend: str | None = None
    moefuse_loss: bool = False
    moefuse_norm: bool = False
    moefuse_rope: bool = False
    compiled: bool = False

    @property
    def model_level_only(self) -> str | None:
        """The suffixes that only a whole model can take (``"'+loss'"``, ...), ``None`` when there are none."""
        suffixes = [
            f"'+{m}'"
            for m, on in zip(
                MODEL_LEVEL_MODIFIERS, (self.moefuse_loss, self.moefuse_norm, self.moefuse_rope), strict=True
            )
            if on
        ]
        return " and ".join(suffixes) or None

    def compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as this implementation runs it: under ``torch.compile`` for ``+compile``, else as is."""
        return torch.compile(module) if self.compiled else module

    @property
    def is_moefuse(self) -> bool:
        return self.experts == EXPERTS_IMPLEMENTATION

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Everything this implementation runs inside (the forced backend, if any)."""
        if self.backend is None:
            yield
            return
        with _backend_module().use_backend(self.backend):
            yield

    def backend_in_use(self, device: torch.device) -> str | None:
        """Which grouped-GEMM backend moefuse runs on ``device`` here (``None`` for Transformers' own)."""
        if not self.is_moefuse:
            return None
        try:
            module = importlib.import_module(_BACKEND_MODULE)
        except ImportError:  # a moefuse without backend selection has only the PyTorch path
            return "torch"
        with self.active():
            return "triton" if module.use_triton(torch.empty(0, device=device)) else "torch"


def _backend_module() -> ModuleType:
    try:
        return importlib.import_module(_BACKEND_MODULE)
    except ImportError:
        raise SystemExit(
            f"moefuse bench: this moefuse cannot force a kernel backend ({_BACKEND_MODULE} is missing); "
            f"use '{EXPERTS_IMPLEMENTATION}' without ':backend'"
        ) from None


def _transformers_names() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def parse_implementations(spec: str) -> list[Implementation]:
    """``"moefuse,moefuse:torch,grouped_mm,eager"`` → implementations, each name checked (clear error otherwise)."""
    known = _transformers_names()
    result: list[Implementation] = []
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        base, *modifiers = name.split("+")
        unknown = [m for m in modifiers if m not in MODIFIERS]
        if unknown or len(set(modifiers)) != len(modifiers):
            raise SystemExit(
                f"moefuse bench: '{name}': suffixes are {', '.join('+' + m for m in MODIFIERS)}, each at most once"
            )
        experts, _, backend = base.partition(":")
        if experts not in known:
            raise SystemExit(
                f"moefuse bench: unknown implementation '{experts}' in --implementations; "
                f"choose from {', '.join(known)} (moefuse may take ':backend', e.g. moefuse:torch; any may take "
                "'+loss', '+norm' and '+rope' for moefuse's loss, norms and rotary embeddings at the model level, and "
                "'+compile')"
            )
        if backend and experts != EXPERTS_IMPLEMENTATION:
            raise SystemExit(
                f"moefuse bench: '{name}': only {EXPERTS_IMPLEMENTATION} takes a ':backend' suffix"
            )
        if backend:
            choices = _backend_module().BACKENDS
            if backend not in choices:
                raise SystemExit(
                    f"moefuse bench: '{name}': unknown moefuse backend '{backend}'; choose from {', '.join(choices)}"
                )
        if any(impl.name == name for impl in result):
            raise SystemExit(f"moefuse bench: '{name}' is listed twice in --implementations")
        result.append(
            Implementation(
                name,
                experts,
                backend or None,
                "loss" in modifiers,
                "norm" in modifiers,
                "rope" in modifiers,
                "compile" in modifiers,
            )
        )
    if not result:
        raise SystemExit(
            "moefuse bench: --implementations is empty; e.g. --implementations moefuse,grouped_mm"
        )
    return result


def baseline_name(name: str, *, compiled: bool | None = None) -> str:
    """The baseline that ``name`` is compared with like for like: ``grouped_mm`` with the same suffixes (with
    ``+compile`` set or dropped when ``compiled`` says so), in canonical order."""
    _, *modifiers = name.split("+")
    if compiled is not None:
        modifiers = [m for m in modifiers if m != "compile"] + (["compile"] if compiled else [])
    return canonical_name("+".join([BASELINE_EXPERTS, *modifiers]))


def canonical_name(name: str) -> str:
    """``name`` with its suffixes in canonical order (``a+norm+loss`` and ``a+loss+norm`` are one setup)."""
    base, *modifiers = name.split("+")
    return "+".join([base, *(m for m in MODIFIERS if m in modifiers)])


def set_experts_implementation(module: torch.nn.Module, implementation: Implementation) -> None:
    """Route every experts module under ``module`` (a model or a bare MoE block) to ``implementation``."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = implementation.experts
