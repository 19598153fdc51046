"""Schema pieces for pretrained timm models: where a model's weights come from (``pretrained``) and overrides of
its own data config (``input``). Kept beside :mod:`.schema` so the study file's main schema stays readable."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from kdbench.config.space import StrictModel

#: timm.create_model arguments that the study file states with its own fields: passing them in ``kwargs`` too gave
#: "got multiple values for keyword argument" deep inside a run
RESERVED_KWARGS = {
    "pretrained": "write 'pretrained: true' (timm's hub weights), a weights file or 'hf-hub:org/name' on the model",
    "pretrained_cfg": "write the weights in 'pretrained' and input overrides in 'input'",
    "pretrained_cfg_overlay": "write a weights file in 'pretrained' and input overrides in 'input'",
    "checkpoint_path": "write a weights file in 'pretrained' (or a teacher's trained weights in 'checkpoint')",
    "num_classes": "the class count comes from the data set",
    "in_chans": "the channel count comes from the data set",
}


class ModelInput(StrictModel):
    """Overrides of a model's own data config (timm's ``resolve_model_data_config``): what it is fed."""

    #: square side, or [height, width]
    size: Optional[Union[PositiveInt, tuple[PositiveInt, PositiveInt]]] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest", "lanczos"]] = None
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[PositiveFloat, PositiveFloat, PositiveFloat]] = None
    #: evaluation crop: resize to size / crop_pct, then center-crop to size
    crop_pct: Optional[float] = Field(None, gt=0.0, le=1.0)

    def overrides(self) -> dict:
        out = self.model_dump(exclude_none=True)
        if "size" in out:
            s = out.pop("size")
            out["input_size"] = (3, s, s) if isinstance(s, int) else (3, *s)
        return out


def check_kwargs(v: dict[str, Any]) -> dict[str, Any]:
    for key, why in RESERVED_KWARGS.items():
        if key in v:
            raise ValueError(f"{key!r} is not a kwarg here: {why}")
    return v


class PretrainedFields(StrictModel):
    """Mixed into a teacher's and a student's spec."""

    #: false: random init; true: timm's weights for the model's tag (from the Hugging Face hub, cached);
    #: a path to a .safetensors/.pth/.bin state dict; or 'hf-hub:org/name'. A class count different from the
    #: weights' replaces the classifier (a fresh one, as timm does). Left out of dumps when false.
    pretrained: Union[bool, str] = Field(False, exclude_if=lambda v: v is False)
    #: overrides of the model's own data config; with pretrained weights or an input, the study feeds this model
    #: through timm's transforms at its own size and normalisation
    input: Optional[ModelInput] = Field(None, exclude_if=lambda v: v is None)

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v):
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be true, false, a weights file or 'hf-hub:org/name'")
        if isinstance(v, str) and v.startswith("hf-hub:") and "/" not in v[7:]:
            raise ValueError("a hub id is 'hf-hub:org/name'")
        return v
