"""CIFAR ResNets (He et al., CVPR 2016, §4.2), Wide ResNets (Zagoruyko & Komodakis, BMVC 2016) and VGG with BN
(Simonyan & Zisserman, ICLR 2015, without the FC layers), in the variants the CRD / RepDistiller tables use.

Written from the papers and the layer descriptions of RepDistiller's ``models/`` (HobbitLong/RepDistiller), whose
parameter counts they reproduce exactly: stage widths, projection shortcuts and where BN/ReLU sit are what
determine them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.cifar_base import CifarNet, conv_bn


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); a 1×1 conv + BN
    projection when the shape changes (option B, as RepDistiller; the ResNet paper's CIFAR nets used zero-padding)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, relu=False)
        project = stride != 1 or cin != cout
        self.downsample = conv_bn(cin, cout, 1, stride, relu=False) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class CifarResNet(CifarNet):
    """depth = 6n + 2: a 3×3 stem, then three stages of n basic blocks at strides 1, 2, 2 (32 → 16 → 8)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stages.append(conv_bn(in_chans, widths[0], 3))
        cin = widths[0]
        for w, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [BasicBlock(cin, w, stride), *[BasicBlock(w, w, 1) for _ in range(n - 1)]]
            self.stages.append(nn.Sequential(*blocks))
            cin = w
        self._finish(num_classes, in_chans, widths[3], list(widths), [1, 1, 2, 4])


class PreActBlock(nn.Module):
    """Wide-ResNet block, pre-activation: conv(relu(bn(conv(relu(bn(x)))))) + shortcut, where the 1×1 projection
    (no BN) reads the activated input, as in the WRN reference code."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        project = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return y + (self.shortcut(a) if self.shortcut is not None else x)


class CifarWRN(CifarNet):
    """WRN-depth-k, depth = 6n + 4: a plain 3×3 conv to 16 channels, three stages of n blocks of widths
    16k, 32k, 64k at strides 1, 2, 2, a closing BN-ReLU (``final``). Stage outputs are pre-activation sums."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stages.append(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False))
        cin = 16
        for w, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [PreActBlock(cin, w, stride), *[PreActBlock(w, w, 1) for _ in range(n - 1)]]
            self.stages.append(nn.Sequential(*blocks))
            cin = w
        self.final = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self._finish(num_classes, in_chans, widths[3], widths, [1, 1, 2, 4], linear_init="zero_bias")


#: VGG configurations as five blocks of 3×3 conv widths ("S" is RepDistiller's 8-layer VGG)
VGG_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class CifarVGG(CifarNet):
    """Five blocks of (3×3 conv with bias → BN → ReLU); 2×2 max-pooling before blocks 1-3 (32 → 16 → 8 → 4) and
    none before block 4, which also runs at 4×4 as in RepDistiller at 32×32 input; then a single linear layer."""

    def __init__(self, depth: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(VGG_CFGS[depth]):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i in (1, 2, 3) else []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            self.stages.append(nn.Sequential(*layers))
        chs = [b[-1] for b in VGG_CFGS[depth]]
        self._finish(num_classes, in_chans, chs[-1], chs, [1, 2, 4, 8, 8], linear_init="small")
