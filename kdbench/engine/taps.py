"""Feature taps: what the losses read (:class:`~kdbench.losses.Outputs`) from one forward pass of a timm model.
Here, not in :mod:`kdbench.models`, because ``Outputs`` belongs to the losses and models sit below them."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from kdbench.engine.preact import PreactCapture
from kdbench.errors import KdbenchError
from kdbench.losses.outputs import Outputs


class ModelFeed:
    """What a model is fed under timm's transforms: the batch (pixels in [0, 1]) resized to the model's input
    size when the view was made at another model's size, then normalised with the model's own mean/std. Set as
    ``model.kdbench_feed`` (a plain attribute: not in the state dict); models without one get batches as they are."""

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bilinear"):
        self.size, self.interpolation = tuple(size), interpolation
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    @classmethod
    def of(cls, dc: dict) -> "ModelFeed":
        return cls(tuple(dc["input_size"][-2:]), dc["mean"], dc["std"], dc.get("interpolation", "bilinear"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            mode = {"lanczos": "bicubic"}.get(self.interpolation, self.interpolation)
            smooth = mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.size, mode=mode, **({"align_corners": False, "antialias": True}
                                                               if smooth else {}))
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def feed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    f = getattr(model, "kdbench_feed", None)
    return x if f is None else f(x)

#: per model: whether its head is global average pooling then one linear layer (checked once; see class_maps_of)
_AVG_LINEAR_HEAD: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def forward_outputs(model: torch.nn.Module, x: torch.Tensor, features: bool = False,
                    embedding: bool = False, class_maps: bool = False, preact: bool = False) -> Outputs:
    """Logits, and when asked the stage feature maps (``forward_intermediates``, every stage, shallow to deep),
    the pooled pre-logits embedding and the class activation maps (:func:`class_maps_of`), from one forward pass."""
    x = feed(model, x)  # a model's own size and normalisation under timm's transforms (ModelFeed)
    if not (features or embedding or class_maps or preact):
        return Outputs(logits=model(x))
    with PreactCapture(model, preact) as cap:  # pre-ReLU stage maps through hooks (kdbench.engine.preact)
        final, feats = model.forward_intermediates(x)
    return Outputs(
        logits=model.forward_head(final),
        features=list(feats) if features else None,
        embedding=model.forward_head(final, pre_logits=True) if embedding else None,
        class_maps=class_maps_of(model, final) if class_maps else None,
        preact=cap.maps(list(feats)) if preact else None,
    )


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _avg_linear_head(model: torch.nn.Module, final: torch.Tensor) -> bool:
    """Whether ``forward_head`` is global average pooling then ``get_classifier()`` (one nn.Linear): only then is
    the classifier applied per position a class activation map whose spatial mean (+ bias) is the logits. Checked
    on the pre-logits output in eval mode (no dropout), once per model; MobileNetV3's conv head, ConvNeXt's norm
    after pooling or a ViT's token map fail it."""
    known = _AVG_LINEAR_HEAD.get(model)
    if known is not None:
        return known
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    ok = isinstance(clf, torch.nn.Linear) and final.dim() == 4 and clf.in_features == final.shape[1]
    if ok:
        probe = final[:2].detach().float()
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.autocast(final.device.type, enabled=False):
                pre = model.forward_head(probe, pre_logits=True)
        finally:
            model.train(was)
        mean = probe.mean(dim=(2, 3))
        ok = pre.shape == mean.shape and torch.allclose(pre.float(), mean, rtol=1e-4,
                                                        atol=1e-5 * (1.0 + float(mean.abs().max())))
    _AVG_LINEAR_HEAD[model] = ok
    return ok


def class_maps_of(model: torch.nn.Module, final: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) class activation maps: the classifier's weight applied at every position of the final feature
    map (B, D, H, W), without its bias (as CAT-KD's converted networks compute them). A clear error for a model
    whose head is not global average pooling then one linear layer."""
    if not _avg_linear_head(model, final):
        raise KdbenchError(
            f"model {_model_name(model)!r} cannot give class_maps: its head is not global average pooling followed "
            "by one linear classifier applied to a (B, C, H, W) feature map; use another model or another loss")
    w = model.get_classifier().weight
    return F.conv2d(final, w.to(final.dtype)[:, :, None, None])
