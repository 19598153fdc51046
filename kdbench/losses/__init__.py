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
from kdbench.losses import kd, mse_logits, soft_ce  # noqa: F401  (registration side effect)

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
