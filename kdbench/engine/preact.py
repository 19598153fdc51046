"""Pre-ReLU stage maps (the need ``preact``, for OFD): each stage map of ``forward_intermediates`` taken before the
ReLU that ends its stage, and the BatchNorm whose affine output that ReLU sees (OFD's margin comes from its γ, β).

timm models return post-activation stage maps, so the values below 0 are gone by then; they are taken with forward
hooks during the same forward pass, per architecture:

- timm ResNet (BasicBlock / Bottleneck, ReLU): the input of the stem's ``act1`` and of each stage's last block's
  ``act2`` / ``act3`` (cloned before the in-place ReLU overwrites it); BN: ``bn1`` / ``bn2`` / ``bn3``.
- kdbench CIFAR ResNet: the stem's BN output; per stage, the last block's ``conv2`` (conv + BN) output plus its
  shortcut output, the sum its F.relu reads; BN: that block's conv2 BN.
- kdbench CIFAR VGG: each stage's last BN output (before its in-place ReLU).
- kdbench CIFAR WRN (pre-activation): the stage maps are already pre-ReLU; BN: the one the next block (or the
  closing BN-ReLU) applies before its ReLU, as the OFD reference takes it.

Any other model (EfficientNet, MobileNet, ShuffleNet, ViT, ...) is refused with one line naming it: its stage maps
are not a ReLU of a BN output, so OFD's margin does not apply.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from kdbench.errors import KdbenchError


@dataclass
class Tap:
    kind: str  # "input" of modules[0], "output" of modules[0], "sum" of the outputs of two modules, or "self"
    modules: tuple
    bn: Optional[nn.BatchNorm2d]


_TAPS: "weakref.WeakKeyDictionary[nn.Module, list[Tap]]" = weakref.WeakKeyDictionary()


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _refuse(model: nn.Module, why: str) -> KdbenchError:
    return KdbenchError(f"model {_name(model)!r} cannot give pre-ReLU feature maps (preact, for OFD): {why}; "
                        "supported: timm ResNets with ReLU, kdbench's CIFAR ResNets, WRNs and VGGs")


def _timm_resnet(model) -> list[Tap]:
    from timm.models.resnet import BasicBlock, Bottleneck

    if not isinstance(model.act1, nn.ReLU):
        raise _refuse(model, f"its activation is {type(model.act1).__name__}, not ReLU")
    taps = [Tap("input", (model.act1,), model.bn1)]
    for i in range(1, 5):
        block = getattr(model, f"layer{i}")[-1]
        if isinstance(block, Bottleneck):
            taps.append(Tap("input", (block.act3,), block.bn3))
        elif isinstance(block, BasicBlock):
            taps.append(Tap("input", (block.act2,), block.bn2))
        else:
            raise _refuse(model, f"unknown block {type(block).__name__}")
    return taps


def _bn_relu_end(model, seq: nn.Module) -> Tap:
    """A stage that ends in BN → ReLU (conv_bn, VGG blocks): the BN's output."""
    layers = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if len(layers) < 2 or not isinstance(layers[-1], nn.ReLU) or not isinstance(layers[-2], nn.BatchNorm2d):
        raise _refuse(model, "a stage does not end in BatchNorm → ReLU")
    return Tap("output", (layers[-2],), layers[-2])


def _cifar(model) -> list[Tap]:
    from kdbench.models.cifar_resnet import BasicBlock, CifarResNet, CifarVGG, CifarWRN

    stages = list(model.stages)
    if isinstance(model, CifarVGG):
        return [_bn_relu_end(model, s) for s in stages]
    if isinstance(model, CifarResNet):
        taps = [_bn_relu_end(model, stages[0])]
        for s in stages[1:]:
            block = s[-1]
            if not isinstance(block, BasicBlock):
                raise _refuse(model, f"unknown block {type(block).__name__}")
            taps.append(Tap("sum", (block.conv2, block.downsample), block.conv2[1]))
        return taps
    if isinstance(model, CifarWRN):
        following = [s[0].bn1 for s in stages[1:]] + [model.final[0]]
        return [Tap("self", (), bn) for bn in following]
    raise _refuse(model, "its stage maps are not a ReLU of a BatchNorm output")


def preact_taps(model: nn.Module) -> list[Tap]:
    """Where each stage's pre-ReLU map is read (one per ``forward_intermediates`` map), found once per model."""
    known = _TAPS.get(model)
    if known is not None:
        return known
    from timm.models.resnet import ResNet

    from kdbench.models.cifar_base import CifarNet

    if isinstance(model, ResNet):
        taps = _timm_resnet(model)
    elif isinstance(model, CifarNet):
        taps = _cifar(model)
    else:
        raise _refuse(model, "its stage maps are not a ReLU of a BatchNorm output (or its architecture is unknown)")
    _TAPS[model] = taps
    return taps


def preact_bn(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(γ, β) of the BN before each stage's ReLU, detached copies: OFD's margin statistics."""
    return [(t.bn.weight.detach().clone(), t.bn.bias.detach().clone()) for t in preact_taps(model)]


class PreactCapture:
    """``with PreactCapture(model) as cap: final, feats = model.forward_intermediates(x)``; then
    ``cap.maps(feats)`` is the list of pre-ReLU maps. Inactive (no hooks) when ``active`` is False."""

    def __init__(self, model: nn.Module, active: bool = True):
        self.taps = preact_taps(model) if active else []
        self.got: dict[tuple[int, int], Tensor] = {}
        self.handles: list = []

    def _keep(self, key, x: Tensor) -> None:
        self.got[key] = x.clone()  # a copy: an in-place ReLU overwrites the tensor right after

    def __enter__(self) -> "PreactCapture":
        for i, tap in enumerate(self.taps):
            for j, m in enumerate(tap.modules):
                key = (i, j)
                if tap.kind == "input":
                    self.handles.append(m.register_forward_pre_hook(lambda _m, a, key=key: self._keep(key, a[0])))
                else:
                    self.handles.append(m.register_forward_hook(lambda _m, a, out, key=key: self._keep(key, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def maps(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.taps):
            raise RuntimeError(f"{len(self.taps)} pre-ReLU taps for {len(feats)} stage maps")
        out = []
        for i, tap in enumerate(self.taps):
            if tap.kind == "self":
                out.append(feats[i])
            elif tap.kind == "sum":
                out.append(self.got[(i, 0)] + self.got[(i, 1)])
            else:
                out.append(self.got[(i, 0)])
        return out
