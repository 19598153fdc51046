"""Stage 3, models: they come from timm's registry, so any name ``timm.create_model`` knows works as teacher or
student. Importing this package registers the ``cifar_*`` families (:mod:`.cifar`) in timm's registry, after which
``timm.create_model("cifar_resnet8x4")`` works like any timm name."""
from __future__ import annotations

import difflib
from functools import lru_cache

import timm
import torch

from kdbench.errors import KdbenchError
from kdbench.models import cifar  # noqa: F401  registers the cifar_* models in timm's registry


@lru_cache(maxsize=1)
def _all_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_model_name(name: str, field: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, _all_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KdbenchError(f"{field}: unknown timm model {name!r}{hint}")


def create_model(name: str, num_classes: int, in_chans: int, kwargs: dict | None = None) -> torch.nn.Module:
    """``timm.create_model`` without pretrained weights (nothing is downloaded)."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))
    except TypeError as e:  # a kwarg the model does not take
        raise KdbenchError(f"model {name!r}: {e}") from None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
