"""kdbench: a knowledge-distillation benchmark suite.

Public API: :func:`create_loss`, :func:`list_losses`, :class:`Outputs` (the loss registry), :func:`run_study`
(a whole study from a study file), :func:`results` (a study's leaderboard as a DataFrame).

Importing ``kdbench`` is cheap: each name is imported on first use (as Optuna's ``_LazyImport`` does), so neither
torch nor timm is loaded until a loss, a model or a study needs them.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Outputs": "kdbench.losses",
    "create_loss": "kdbench.losses",
    "list_losses": "kdbench.losses",
    "run_study": "kdbench.api",
    "results": "kdbench.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Outputs", "create_loss", "list_losses", "run_study", "results", "__version__"]
