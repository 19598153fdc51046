"""The losses. ``create_loss("kd", temperature=4)`` builds a registered loss; ``list_losses()`` names them all.

One module per loss, registered with ``@register_loss`` (:mod:`._registry`); its card, ``cards/<name>.yaml``
(:mod:`.card`), states its paper, needs, default parameters and search space. Shared numerics are in
:mod:`.functional`, shared base classes in :mod:`._shared`: no loss module imports another.

Names are imported on first use (as ``kdbench`` does), so importing this package or reading cards loads no torch;
the registry imports every loss module the first time a class is looked up.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_LAZY = {
    "DistillLoss": "base",
    "LossContext": "base",
    "Outputs": "outputs",
    "LossCard": "card",
    "card_names": "card",
    "load_card": "card",
    "create_loss": "_registry",
    "get_loss_class": "_registry",
    "list_losses": "_registry",
    "loss_parameters": "_registry",
    "register_loss": "_registry",
    "unknown_loss_message": "_registry",
}

if TYPE_CHECKING:
    from kdbench.losses._registry import (create_loss, get_loss_class, list_losses, loss_parameters, register_loss,
                                          unknown_loss_message)
    from kdbench.losses.base import DistillLoss, LossContext
    from kdbench.losses.card import LossCard, card_names, load_card
    from kdbench.losses.outputs import Outputs


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
