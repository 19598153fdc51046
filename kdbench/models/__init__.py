"""Stage 3, models: they come from timm's registry, so any name ``timm.create_model`` knows works as teacher or
student. Importing this package registers the ``cifar_*`` families (:mod:`.cifar`) in timm's registry, after which
``timm.create_model("cifar_resnet8x4")`` works like any timm name."""
from __future__ import annotations

import difflib
from functools import lru_cache

import timm
import torch
from timm.models import get_pretrained_cfg

from kdbench.errors import KdbenchError
from kdbench.models import cifar  # noqa: F401  registers the cifar_* models in timm's registry
from kdbench.models import pretrained as pretrained_weights


@lru_cache(maxsize=1)
def _all_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_model_name(name: str, field: str) -> None:
    if timm.is_model(name):
        if "." in name:  # a pretrained tag: timm.is_model ignores it
            try:
                get_pretrained_cfg(name)
            except RuntimeError:
                arch, tag = name.split(".", 1)
                tags = [m.split(".", 1)[1] for m in timm.list_pretrained(arch) if m.split(".", 1)[0] == arch]
                known = f"; its tags: {', '.join(tags[:8])}" if tags else "; it has no pretrained tags"
                raise KdbenchError(f"{field}: timm has no tag {tag!r} for {arch!r}{known}") from None
        return
    close = difflib.get_close_matches(name, _all_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KdbenchError(f"{field}: unknown timm model {name!r}{hint}")


def create_model(name: str, num_classes: int, in_chans: int, kwargs: dict | None = None,
                 pretrained: bool | str = False, field: str = "model") -> torch.nn.Module:
    """``timm.create_model``, with random weights unless ``pretrained`` says where its weights are
    (:mod:`.pretrained`); ``model.kdbench_head`` then says whether the classifier was replaced."""
    if pretrained is not False:
        model, note = pretrained_weights.create(name, num_classes, in_chans, kwargs, pretrained, field)
        model.kdbench_head = note
        return model
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))
    except TypeError as e:  # a kwarg the model does not take
        raise KdbenchError(f"model {name!r}: {e}") from None


def data_config(model: torch.nn.Module, overrides: dict | None = None) -> dict:
    """What the model is fed: timm's ``resolve_model_data_config`` (input size, interpolation, mean/std, crop),
    with the study's overrides."""
    from timm.data import resolve_model_data_config

    dc = dict(resolve_model_data_config(model))
    dc.update(overrides or {})
    dc["input_size"] = tuple(dc["input_size"])
    return dc


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
