"""The CIFAR networks of the KD literature's CIFAR-100 tables, registered in timm as ``cifar_<name>``.

``import kdbench.models`` registers them, after which ``timm.create_model('cifar_resnet32x4', num_classes=100)``
works like any timm name (no pretrained weights exist: ``pretrained=True`` is an error). Names and architectures
follow CRD (Tian et al., ICLR 2020) and its code base, HobbitLong/RepDistiller ``models/``, which mdistiller
(DKD, Zhao et al., CVPR 2022) reuses; the published numbers kdbench users compare against come from them.

Parameter counts at num_classes=100 (exact, equal to RepDistiller's models/ at commit eedab9d, which the tests
check to within 1%; the rounded values are those quoted in CRD-based papers' model tables):

    resnet8 0.08M · resnet14 0.18M · resnet20 0.28M · resnet32 0.47M · resnet44 0.67M · resnet56 0.86M ·
    resnet110 1.74M · resnet8x4 1.23M · resnet32x4 7.43M · wrn_16_1 0.18M · wrn_16_2 0.70M · wrn_40_1 0.57M ·
    wrn_40_2 2.26M · vgg8 3.97M · vgg11 9.28M · vgg13 9.46M · vgg16 14.77M · vgg19 20.09M ·
    mobilenetv2 (RepDistiller's mobile_half: width 0.5, t=6) 0.81M · shufflenetv1 0.95M · shufflenetv2 1.36M
"""
from __future__ import annotations

from timm.models import register_model

from kdbench.errors import KdbenchError
from kdbench.models.cifar_base import CifarNet
from kdbench.models.cifar_mobile import CifarMobileNetV2, CifarShuffleNetV1, CifarShuffleNetV2
from kdbench.models.cifar_resnet import CifarResNet, CifarVGG, CifarWRN

# timm passes these to every entrypoint; they concern pretrained weights, which these models do not have
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)  # ResNet widths (stem, stages); "x4" is the wide one


def _build(name: str, cls, args: tuple, pretrained: bool, kwargs: dict) -> CifarNet:
    if pretrained:
        raise KdbenchError(f"model {name!r} has no pretrained weights; train it, or load a state dict "
                           "(teacher.checkpoint)")
    for k in _TIMM_ARGS:
        kwargs.pop(k, None)
    return cls(*args, **kwargs)


@register_model
def cifar_resnet8(pretrained=False, **kwargs):
    return _build("cifar_resnet8", CifarResNet, (8, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet14(pretrained=False, **kwargs):
    return _build("cifar_resnet14", CifarResNet, (14, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet20(pretrained=False, **kwargs):
    return _build("cifar_resnet20", CifarResNet, (20, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet32(pretrained=False, **kwargs):
    return _build("cifar_resnet32", CifarResNet, (32, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet44(pretrained=False, **kwargs):
    return _build("cifar_resnet44", CifarResNet, (44, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained=False, **kwargs):
    return _build("cifar_resnet56", CifarResNet, (56, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet110(pretrained=False, **kwargs):
    return _build("cifar_resnet110", CifarResNet, (110, _NARROW), pretrained, kwargs)


@register_model
def cifar_resnet8x4(pretrained=False, **kwargs):
    return _build("cifar_resnet8x4", CifarResNet, (8, _WIDE), pretrained, kwargs)


@register_model
def cifar_resnet32x4(pretrained=False, **kwargs):
    return _build("cifar_resnet32x4", CifarResNet, (32, _WIDE), pretrained, kwargs)


@register_model
def cifar_wrn_16_1(pretrained=False, **kwargs):
    return _build("cifar_wrn_16_1", CifarWRN, (16, 1), pretrained, kwargs)


@register_model
def cifar_wrn_16_2(pretrained=False, **kwargs):
    return _build("cifar_wrn_16_2", CifarWRN, (16, 2), pretrained, kwargs)


@register_model
def cifar_wrn_40_1(pretrained=False, **kwargs):
    return _build("cifar_wrn_40_1", CifarWRN, (40, 1), pretrained, kwargs)


@register_model
def cifar_wrn_40_2(pretrained=False, **kwargs):
    return _build("cifar_wrn_40_2", CifarWRN, (40, 2), pretrained, kwargs)


@register_model
def cifar_vgg8(pretrained=False, **kwargs):
    return _build("cifar_vgg8", CifarVGG, (8,), pretrained, kwargs)


@register_model
def cifar_vgg11(pretrained=False, **kwargs):
    return _build("cifar_vgg11", CifarVGG, (11,), pretrained, kwargs)


@register_model
def cifar_vgg13(pretrained=False, **kwargs):
    return _build("cifar_vgg13", CifarVGG, (13,), pretrained, kwargs)


@register_model
def cifar_vgg16(pretrained=False, **kwargs):
    return _build("cifar_vgg16", CifarVGG, (16,), pretrained, kwargs)


@register_model
def cifar_vgg19(pretrained=False, **kwargs):
    return _build("cifar_vgg19", CifarVGG, (19,), pretrained, kwargs)


@register_model
def cifar_mobilenetv2(pretrained=False, **kwargs):
    """RepDistiller's ``mobile_half``, the MobileNetV2 of the CRD/DKD tables: width 0.5, expansion 6."""
    return _build("cifar_mobilenetv2", CifarMobileNetV2, (0.5, 6), pretrained, kwargs)


@register_model
def cifar_shufflenetv1(pretrained=False, **kwargs):
    return _build("cifar_shufflenetv1", CifarShuffleNetV1, (), pretrained, kwargs)


@register_model
def cifar_shufflenetv2(pretrained=False, **kwargs):
    return _build("cifar_shufflenetv2", CifarShuffleNetV2, (), pretrained, kwargs)
