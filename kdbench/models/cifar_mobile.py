"""The mobile students of the CRD / RepDistiller tables at CIFAR resolution: MobileNetV2 (Sandler et al., CVPR
2018) at width 0.5 and expansion 6, ShuffleNetV1 (Zhang et al., CVPR 2018) with 3 groups, ShuffleNetV2 (Ma et al.,
ECCV 2018) at 1×.

Written from the papers with the CIFAR adaptations RepDistiller's ``models/`` describe (stride-1 1×1 stems, no
max-pool, a 1280-channel MobileNetV2 head even at width 0.5), reproducing its parameter counts exactly. Where the
reference departs from the paper, the reference is followed because its counts and accuracies are the ones quoted:
noted in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.cifar_base import CifarNet, conv_bn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 linear projection; identity residual when shape is kept. The expansion
    conv is present even at expansion 1 (the reference keeps it; the paper drops it)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, relu=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """Stem 3×3 stride 2 (32 → 16), seven inverted-residual groups (t, c, n, s) as in the paper, a 1×1 conv to 1280.
    Stages (the reference's feature taps): stem, groups 0-1, group 2, groups 3-4, groups 5-6."""

    # (expansion t, channels c, blocks n, first stride s) per group, the paper's Table 2 with CIFAR strides
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))
    TAPS = ((0, 1), (2,), (3, 4), (5, 6))

    def __init__(self, width: float = 0.5, expand: int = 6, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = int(32 * width)
        self.stages.append(conv_bn(in_chans, cin, 3, stride=2))
        groups = []
        for t, c, n, s in self.SETTING:
            cout = int(c * width)
            t = expand if t != 1 else 1
            groups.append([InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t) for i in range(n)])
            cin = cout
        for tap in self.TAPS:
            self.stages.append(nn.Sequential(*[block for g in tap for block in groups[g]]))
        last = int(1280 * width) if width > 1.0 else 1280
        self.final = conv_bn(cin, last, 1)
        chs = [int(32 * width)] + [int(self.SETTING[tap[-1]][1] * width) for tap in self.TAPS]
        self._finish(num_classes, in_chans, last, chs, [2, 2, 4, 8, 16], linear_init="small")


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1 → shuffle → 3×3 depthwise → grouped 1×1; stride 2 concatenates a 3×3 average-pooled shortcut
    (so the branch makes cout − cin channels), stride 1 adds the input. The first unit's 1×1 is ungrouped (its input
    has only 24 channels), as in the paper."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first: bool):
        super().__init__()
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.g1 = 1 if first else groups
        self.conv1 = conv_bn(cin, mid, 1, groups=self.g1)
        # ReLU after the depthwise conv as in the reference (the paper has none there; no parameters involved)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, branch, 1, groups=groups, relu=False)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.g1)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class CifarShuffleNetV1(CifarNet):
    """A 1×1 stem to 24 channels at 32×32 (no stride, no max-pool), then stages of 4, 8, 4 units at widths 240,
    480, 960 (g = 3), each starting with a stride-2 unit."""

    def __init__(self, widths=(240, 480, 960), units=(4, 8, 4), groups: int = 3, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__()
        self.stages.append(conv_bn(in_chans, 24, 1))
        cin = 24
        for s, (w, n) in enumerate(zip(widths, units)):
            self.stages.append(nn.Sequential(*[
                ShuffleV1Unit(cin if i == 0 else w, w, 2 if i == 0 else 1, groups, first=(s == 0 and i == 0))
                for i in range(n)]))
            cin = w
        self._finish(num_classes, in_chans, widths[-1], [24, *widths], [1, 2, 4, 8])


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches see the whole input (depthwise-3×3/2 → 1×1; 1×1 → depthwise-3×3/2 → 1×1),
    each making cout/2 channels; concatenated and shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, mid, 1))
        self.right = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid, relu=False),
                                   conv_bn(mid, mid, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleV2Unit(nn.Module):
    """Stride-1 unit: channel split in halves, one half through 1×1 → depthwise 3×3 → 1×1, concatenated, shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(conv_bn(c, c, 1), conv_bn(c, c, 3, groups=c, relu=False), conv_bn(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class CifarShuffleNetV2(CifarNet):
    """A 1×1 stem to 24 channels at 32×32, three stages of widths 116, 232, 464, a 1×1 conv to 1024. Each stage is
    a stride-2 unit followed by 3, 7, 3 stride-1 units: one unit more per stage than the paper's 4, 8, 4 in all,
    as in the reference, whose parameter count (1.36M) is the one quoted."""

    def __init__(self, widths=(116, 232, 464), units=(3, 7, 3), last: int = 1024, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__()
        self.stages.append(conv_bn(in_chans, 24, 1))
        cin = 24
        for w, n in zip(widths, units):
            self.stages.append(nn.Sequential(ShuffleV2Down(cin, w), *[ShuffleV2Unit(w) for _ in range(n)]))
            cin = w
        self.final = conv_bn(cin, last, 1)
        self._finish(num_classes, in_chans, last, [24, *widths], [1, 2, 4, 8])
