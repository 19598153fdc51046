"""The timm-style interface shared by the CIFAR networks of the KD literature (``kdbench.models.cifar``).

A network is a list of stages, ``stages[0]`` being the stem, each producing one of the feature maps that
RepDistiller/mdistiller expose (``feat[0..k]``: stem output, then each stage, shallow → deep), so feature losses
index stages as in those papers (FitNet's ``hint_layer: 2`` is the second stage's output, AT and ReviewKD read
``features[1:]``). ``final`` runs after the last stage (WRN's closing BN-ReLU, the 1×1 convs of MobileNetV2 and
ShuffleNetV2), then global average pooling and the linear classifier ``fc``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.models._features import feature_take_indices
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) → BN (→ ReLU): the unit every family here is built from."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class CifarNet(nn.Module):
    """Base class: subclasses fill ``self.stages`` (stem first) and ``self.final``, then call :meth:`_finish`."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList()
        self.final: nn.Module = nn.Identity()

    def _finish(self, num_classes: int, in_chans: int, num_features: int, chs: list[int], reductions: list[int],
                linear_init: str = "default") -> None:
        self.num_classes, self.num_features = num_classes, num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)  # = the reference's fixed-size average pool at 32×32
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                             for i, (c, r) in enumerate(zip(chs, reductions))]
        self.pretrained_cfg = dict(input_size=(in_chans, 32, 32), num_classes=num_classes, classifier="fc")
        self._init_weights(linear_init)

    def _init_weights(self, linear: str) -> None:
        # the references' schemes: He-normal (fan-out) convs, BN γ=1 β=0; the classifier per family
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear != "default":
                if linear == "small":
                    nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    # -- timm's model interface ------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global average pooling is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """(final feature map, [stage maps shallow → deep]) as timm's CNNs return them; ``indices``: None = all,
        n = the last n, or a list. ``norm`` is accepted and ignored: like timm's ResNet these nets have no final
        norm to apply to intermediates."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        # 'final' fits only the last stage's output; stopped early, x is returned as the last stage ran
        return (self.final(x) if len(stages) == len(self.stages) else x), intermediates
