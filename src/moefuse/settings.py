"""moefuse's settings, read once from the ``MOEFUSE_*`` environment variables, when moefuse is imported.

Nothing else in moefuse reads the environment. Tests and benchmarks change settings for a block of code with
``with override_settings(backend="torch"): ...``; the experts' plan (:mod:`moefuse.ops.plan`) reads them once per
call and passes its decisions down.

============================================  ======================  ==============================================
variable                                      setting                 meaning
============================================  ======================  ==============================================
``MOEFUSE_BACKEND=auto|triton|torch``         ``backend``             who runs the grouped GEMMs; ``auto``: Triton
                                                                      on CUDA sm80+ when installed, else PyTorch
``MOEFUSE_FAST_LAUNCH=1|0``                   ``fast_launch``         launch compiled kernels directly once known
                                                                      (:mod:`moefuse.ops.launch`)
``MOEFUSE_AUTOTUNE=1|0``                      ``autotune``            time the tile configs, or take the first that
                                                                      fits (tests over many shapes)
``MOEFUSE_GROUPED_MM_COMBINE_ROWS=N``         ``grouped_mm_combine_   rows per expert from which a combine with
                                              rows``                  nothing in its epilogue runs on ``grouped_mm``
``MOEFUSE_GROUPED_MM_WEIGHT_GRAD_ROWS=N``     ``grouped_mm_weight_    rows per expert from which the base weights'
                                              grad_rows``             gradients run on ``grouped_mm``
============================================  ======================  ==============================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    fast_launch: bool = True
    autotune: bool = True
    # On Hopper in bf16, CUTLASS's grouped_mm measured ahead of the Triton kernels from these batch sizes on, for
    # the products with nothing of moefuse's in their epilogue (docs/measurements.md).
    grouped_mm_combine_rows: int = 1024
    grouped_mm_weight_grad_rows: int = 256

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown moefuse backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"moefuse setting {field.name} takes True or False, got {value!r}")
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TypeError(f"moefuse setting {field.name} takes an integer >= 0, got {value!r}")


def _env_name(field: str) -> str:
    return f"MOEFUSE_{field.upper()}"


def _parse(field: dataclasses.Field, text: str) -> object:
    """A setting's value from its environment variable or a ``name=value`` override string."""
    text = text.strip().lower()
    if field.type == "bool":
        if text not in ("0", "1", "true", "false"):
            raise ValueError(f"{_env_name(field.name)}={text!r}: expected 1 or 0")
        return text in ("1", "true")
    if field.type == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{_env_name(field.name)}={text!r}: expected an integer") from None
    return text or field.default


def _from_environment() -> Settings:
    values = {}
    for field in dataclasses.fields(Settings):
        text = os.environ.get(_env_name(field.name))
        if text is not None and text.strip():
            values[field.name] = _parse(field, text)
    try:
        return Settings(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"moefuse's environment variables: {error}") from None


# The environment's settings, kept in a plain global: torch.compile traces settings() in every compiled experts
# call, and a functools.cache there is what Dynamo warns about and traces through.
_environment: Settings | None = None
_overrides: list[Settings] = []


def reload_settings() -> Settings:
    """Read the environment variables again (they are read once, at the first :func:`settings`)."""
    global _environment
    _environment = None
    return settings()


def settings() -> Settings:
    """The settings in force: the innermost :func:`override_settings`, else the environment's (read once)."""
    global _environment
    if _overrides:
        return _overrides[-1]
    if _environment is None:
        _environment = _from_environment()
    return _environment


# Read now, not at the first settings(): that may come inside a graph torch.compile traces, which cannot trace the
# reading and would break the graph there. A value that does not parse raises at the first settings() instead.
with contextlib.suppress(ValueError):
    _environment = _from_environment()


@contextlib.contextmanager
def override_settings(**changes: object) -> Iterator[Settings]:
    """``with override_settings(backend="torch", autotune=False): ...`` runs the block with those settings."""
    unknown = changes.keys() - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown moefuse setting(s): {', '.join(sorted(unknown))}")
    _overrides.append(dataclasses.replace(settings(), **changes))
    try:
        yield _overrides[-1]
    finally:
        _overrides.pop()


def parse_overrides(spec: str) -> dict[str, object]:
    """``"backend=torch,autotune=0"`` as keyword arguments of :func:`override_settings` (benchmarks' variants)."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    changes: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in fields:
            raise ValueError(f"{item!r} is not NAME=VALUE with NAME one of {', '.join(fields)}")
        changes[name.strip()] = _parse(fields[name.strip()], value)
    return changes
