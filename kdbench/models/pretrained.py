"""Pretrained weights, in timm's own terms: ``pretrained: true`` (the hub weights of the model's tag, e.g.
``resnet50.a1_in1k``), a local file (timm's ``pretrained_cfg_overlay=dict(file=...)``) or ``hf-hub:org/name``.

timm loads them: a file by its suffix (safetensors, else ``torch.load(weights_only=True)``, which refuses pickles
that would run code), and it drops the classifier when the class count differs, leaving a fresh head. Everything
that can be known without downloading is checked up front (:func:`check_pretrained`, run by ``kdbench validate``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from timm.models import get_pretrained_cfg

from kdbench.errors import KdbenchError

HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Weights:
    kind: str  # none | hub | file | hf-hub
    where: str = ""  # the hub id or the file

    def describe(self) -> str:
        return {"none": "random init", "hub": f"hub {self.where}", "hf-hub": f"hub {self.where}",
                "file": f"file {self.where}"}[self.kind]


def weights_of(name: str, pretrained: Union[bool, str]) -> Weights:
    if pretrained is False:
        return Weights("none")
    if pretrained is True:
        cfg = pretrained_cfg(name)
        return Weights("hub", (cfg.hf_hub_id or cfg.url or "") if cfg is not None else "")
    if pretrained.startswith("hf-hub:"):
        return Weights("hf-hub", pretrained[len("hf-hub:"):])
    return Weights("file", str(Path(pretrained).expanduser()))


def pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (with its tag), or None for an unknown tag."""
    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: check_model_name says so
        return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in HUB_FILES)


def check_pretrained(name: str, pretrained: Union[bool, str], field: str) -> Weights:
    """Refuse what cannot load, without downloading: a tag without weights, a missing or unreadable file, hub
    weights absent from the local cache while ``HF_HUB_OFFLINE`` is set."""
    w = weights_of(name, pretrained)
    if w.kind == "file":
        path = Path(w.where)
        if not path.is_file():
            raise KdbenchError(f"{field}: weights file not found: {w.where}")
        from timm.models import load_state_dict

        try:  # weights_only: a pickle that would run code is refused here, before anything is written
            load_state_dict(str(path), weights_only=True)
        except Exception as e:  # noqa: BLE001  any failure to read is the file's fault
            raise KdbenchError(f"{field}: cannot read weights from {w.where}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    elif w.kind == "hub":
        cfg = pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise KdbenchError(f"{field}: timm has no pretrained weights for {name!r}; give a weights file instead")
        if hub_offline() and not (cfg.hf_hub_id and _hub_cached(cfg.hf_hub_id)):
            raise _offline(name, w.where, field)
    elif w.kind == "hf-hub" and hub_offline() and not _hub_cached(w.where):
        raise _offline(name, w.where, field)
    return w


def _offline(name: str, where: str, field: str) -> KdbenchError:
    return KdbenchError(f"{field}: the weights of {name!r} (hub {where}) are not in the local cache and "
                        f"HF_HUB_OFFLINE is set: run once with the hub reachable, or give a weights file")


def create(name: str, num_classes: int, in_chans: int, kwargs: Optional[dict], pretrained: Union[bool, str],
           field: str) -> tuple[torch.nn.Module, str]:
    """The model with its weights; returns it and a note on the classifier ('' when the weights' head was kept)."""
    w = weights_of(name, pretrained)
    extra: dict = {}
    if w.kind == "file":
        extra["pretrained_cfg_overlay"] = {"file": w.where}
    elif w.kind == "hf-hub":
        extra["pretrained_cfg_overlay"] = {"hf_hub_id": w.where}
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                  **extra, **(kwargs or {}))
    except TypeError as e:  # a kwarg the model does not take
        raise KdbenchError(f"{field}: model {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001  the hub unreachable, a file of another model, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if w.kind in ("hub", "hf-hub") and "cache" in first.lower():
            raise _offline(name, w.where, field) from None
        raise KdbenchError(f"{field}: cannot load the {w.describe()} weights into {name!r}: {first}") from None
    had = model.pretrained_cfg.get("num_classes")
    note = "" if had in (None, num_classes) else f"classifier replaced: {had} classes in the weights, {num_classes} here"
    return model, note


def keep_classes(model: torch.nn.Module, columns: list[int]) -> None:
    """Keep only the classifier rows ``columns`` (a pretrained head used as it is on a subset of its classes):
    the logits are exactly the pretrained model's logits of those classes."""
    old = model.get_classifier()
    if not isinstance(old, (torch.nn.Linear, torch.nn.Conv2d)):
        raise KdbenchError(f"cannot select classes from the head of {type(model).__name__} ({type(old).__name__})")
    weight = old.weight.detach()[columns].clone()
    bias = old.bias.detach()[columns].clone() if old.bias is not None else None
    model.reset_classifier(len(columns))
    new = model.get_classifier()
    with torch.no_grad():
        new.weight.copy_(weight.reshape(new.weight.shape))
        if bias is not None:
            new.bias.copy_(bias)


def imagenet_columns(classes: list[str]) -> Optional[list[int]]:
    """ImageNet-1k indices of class folders named by WordNet id (n01440764, ...), or None if any is not one."""
    from timm.data import ImageNetInfo

    index = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
    cols = [index.get(c) for c in classes]
    return None if any(c is None for c in cols) else cols
