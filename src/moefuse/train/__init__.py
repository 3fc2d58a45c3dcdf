"""``moefuse train``: supervised fine-tuning of MoE models with moefuse experts on TRL's ``SFTTrainer``.

``run_train(config_file, overrides)`` is the command as a function; :class:`ThroughputCallback` (tokens/s and
MFU in the Trainer's logs) works in any Trainer. The names load on first use, so that ``moefuse`` commands
other than ``train`` do not import TRL and datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ThroughputCallback": "callbacks",
    "add_throughput_callback": "callbacks",
    "MoefuseTrainArguments": "config",
    "TrainConfigError": "config",
    "parse_train_args": "config",
    "TrainResult": "run",
    "run_train": "run",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
