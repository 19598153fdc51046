"""The loss registry. ``create_loss("kd", temperature=4)`` builds a registered loss; ``list_losses()`` names them all.

Importing this package registers the built-in losses (one module each).
"""
from kdbench.losses.base import (
    DistillLoss,
    Outputs,
    create_loss,
    get_loss_class,
    list_losses,
    loss_parameters,
    register_loss,
)
from kdbench.losses.cards import LossCard, card_names, load_card


def _import_loss_modules() -> None:
    """Import every module of this package so its ``@register_loss`` runs: adding a loss is adding one file."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "cards"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_loss_modules()

__all__ = [
    "DistillLoss",
    "LossCard",
    "Outputs",
    "card_names",
    "create_loss",
    "get_loss_class",
    "list_losses",
    "load_card",
    "loss_parameters",
    "register_loss",
]
