"""Stage 1, the study file: a typed schema (:mod:`.schema`), search-space specs (:mod:`.space`) and the digests
that fingerprint a study (:mod:`.digests`). Imports neither torch nor timm."""
from kdbench.config.schema import (
    ConfirmConfig,
    DataConfig,
    LossEntry,
    LossPart,
    Recipe,
    Splits,
    StudentConfig,
    StudyConfig,
    SweepConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
)
from kdbench.config.load import load_study, parse_study
from kdbench.config.space import SearchParam

__all__ = ["ConfirmConfig", "DataConfig", "LossEntry", "LossPart", "Recipe", "SearchParam", "Splits",
           "StudentConfig", "StudyConfig", "SweepConfig", "TeacherConfig", "TrackingConfig", "TrainConfig",
           "load_study", "parse_study"]
