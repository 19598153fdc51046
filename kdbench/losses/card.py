"""Loss cards: one YAML file per registry entry in ``kdbench/losses/cards/`` (package data, so a non-editable
install has them): paper, needs, default parameters, search space.

A card is the one statement of what its loss ``needs`` (registration copies it onto the class) and of its default
parameters (``create_loss`` fills what a call leaves out from ``defaults``, the reference implementation's values).
``alpha`` is the study-level mix (total = ce_weight·CE + alpha·weight·loss, ce_weight = 1 − alpha unless a study
sets it) and ``weight`` a fixed multiplier on the loss. ``search`` may name the loss's own parameters and
``alpha``/``weight``.

Imports neither torch nor timm: listing and reading cards is cheap.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError

from kdbench.config.space import SearchParam, StrictModel
from kdbench.errors import KdbenchError

#: study-level knobs every entry has besides its own parameters: the CE/KD mix, a multiplier on the loss, the
#: per-sample weighting (kdbench.losses.weighting) and the temperature schedule (kdbench.engine.schedules). A loss's
#: own parameter with one of these names (DKD's and USKD's ``alpha``) is addressed as ``<loss>.<param>`` in studies
#: and search spaces; any own parameter may be.
MIX_PARAMS = ("alpha", "weight", "weighting", "threshold", "ramp_start", "ramp_epochs",
              "t_schedule", "t_start", "t_end", "t_steps", "ce_weight")
#: ce_weight has no default here: unset, it is 1 − alpha (trial params of older studies stay as they were)
MIX_DEFAULTS = {"weighting": "none", "threshold": 0.95, "ramp_start": 0.0, "ramp_epochs": 0.0,
                "t_schedule": "constant", "t_start": 2.0, "t_end": 8.0, "t_steps": 4}


def knob_name(loss: str, param: str) -> str:
    """The study-level name of a loss's own parameter: plain, unless it collides with a study-level knob."""
    return f"{loss}.{param}" if param in MIX_PARAMS else param


NEEDS = ("logits", "features", "embedding", "labels", "indices", "views", "class_maps", "preact")
FAMILIES = ("logit", "feature", "embedding", "relation", "self")
#: the cards, next to the losses (package data: see [tool.setuptools.package-data] in pyproject.toml)
CARDS_DIR = Path(__file__).resolve().parent / "cards"


class Paper(StrictModel):
    title: str
    authors: str
    venue: str
    year: int
    arxiv: Optional[str] = None


class LossCard(StrictModel):
    name: str
    family: Literal[FAMILIES]
    summary: str
    paper: Optional[Paper] = None
    reference: str
    needs: list[Literal[NEEDS]]
    defaults: dict[str, Any] = {}
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    weight: float = Field(1.0, gt=0.0)
    #: which feature stages / embeddings it reads, in words (for feature losses)
    stages: Optional[str] = None
    search: dict[str, SearchParam] = {}
    notes: str = ""

    def default_values(self) -> dict[str, Any]:
        """The paper defaults of every knob: own parameters (namespaced where they collide with a study-level
        knob) plus alpha, weight and the weighting defaults."""
        own = {knob_name(self.name, k): v for k, v in self.defaults.items()}
        return {**own, **MIX_DEFAULTS, "alpha": self.alpha, "weight": self.weight}


@lru_cache(maxsize=None)
def _load(path: str) -> LossCard:
    p = Path(path)
    try:
        return LossCard.model_validate(yaml.safe_load(p.read_text(encoding="utf-8")))
    except (ValidationError, yaml.YAMLError) as e:
        first = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
        loc = ".".join(map(str, first["loc"]))
        raise KdbenchError(f"{p}: {loc}: {first['msg']}") from None


def card_path(name: str) -> Path:
    return CARDS_DIR / f"{name}.yaml"


def load_card(name: str) -> LossCard:
    p = card_path(name)
    if not p.is_file():
        raise KdbenchError(f"loss {name!r} has no card: expected {p}")
    card = _load(str(p))
    if card.name != name:
        raise KdbenchError(f"{p}: name: card says {card.name!r}, file is for {name!r}")
    return card


def card_names() -> list[str]:
    """The names of every card, sorted (one per registered loss)."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))
