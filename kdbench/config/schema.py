"""The study file's typed schema (pydantic), one model per section, each field documented where it is declared;
kept in one module (over 300 lines) so the whole file format reads in one place. Reading a file is
:mod:`kdbench.config.load`; checks that need the loss registry or timm are :func:`kdbench.study.checks.check_study`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from kdbench.config.bounds import (MAX_NAME, Epochs, ImageSize, NonNegativeFinite, PositiveFinite, Seed,
                                   TeacherEpochs)
from kdbench.config.digests import spec_digest
from kdbench.config.inputs import PretrainedFields, check_kwargs
from kdbench.config.space import SearchParam, StrictModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Splits(StrictModel):
    train: PositiveFloat = 0.6
    val: PositiveFloat = 0.2
    test: PositiveFloat = 0.2

    @model_validator(mode="after")
    def _sum_to_one(self) -> "Splits":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class DataConfig(StrictModel):
    dataset: str = "digits"
    image_size: ImageSize = 32
    splits: Splits = Splits()
    augment: bool = False
    seed: Seed = 0
    #: fraction of the training split whose labels the student sees (stratified subset); the teacher sees all
    student_fraction: float = Field(1.0, gt=0.0, le=1.0)
    #: fraction of the student's labels flipped to another class (symmetric label noise)
    student_label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    #: the folder holding a file-based data set's files (cifar10, cifar100, mnist, fashion_mnist, imagefolder),
    #: relative to the working directory. Left out of dumps when unset, so older studies keep their fingerprints.
    root: Optional[str] = Field(None, exclude_if=lambda v: v is None)
    #: fetch missing files with torchvision's downloaders (needs a network); never the default
    download: bool = Field(False, exclude_if=lambda v: not v)
    #: with augment: draw each sample's crop and flip in epoch e from (augment_seed, e) alone, the same in every
    #: run of the study, so the teacher's outputs on them are computed once per epoch and cached. Unset: drawn
    #: afresh in every run (the teacher then runs live).
    augment_seed: Optional[Seed] = Field(None, exclude_if=lambda v: v is None)
    #: an image folder too large for memory: decode its images from the files batch by batch, in DataLoader
    #: workers (pinned memory, persistent workers), instead of holding the data set on the device
    stream: bool = Field(False, exclude_if=lambda v: not v)
    #: DataLoader worker processes for a streamed data set
    workers: int = Field(4, ge=0, exclude_if=lambda v: v == 4)
    #: tensor: images held resized to image_size, normalised by the data's statistics, augmented on the device;
    #: timm: each model fed through timm's transforms at its own data config (size, crop, mean/std); auto: timm
    #: when a model is pretrained or states an input, or the data set is a timm source ('torch/…', 'hfds/…')
    transforms: Literal["auto", "tensor", "timm"] = Field("auto", exclude_if=lambda v: v == "auto")

    @model_validator(mode="after")
    def _augment_seed(self) -> "DataConfig":
        if self.augment_seed is not None and not self.augment:
            raise ValueError("augment_seed needs augment: true")
        if self.stream and self.dataset != "imagefolder":
            raise ValueError(f"stream: only image folders are streamed; {self.dataset!r} is held in memory")
        return self


class Recipe(StrictModel):
    """How one network is trained."""

    epochs: Epochs = 10
    batch_size: PositiveInt = 64  # at most the smallest training set: checked against the data
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFinite = 0.05
    weight_decay: NonNegativeFinite = 5e-4
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[PositiveInt] = []  # epochs at which the 'step' schedule multiplies lr by gamma
    gamma: PositiveFinite = 0.1
    #: epochs of linear warm-up before the schedule (fine-tuning a pretrained model); left out of dumps at 0
    warmup_epochs: NonNegativeInt = Field(0, exclude_if=lambda v: v == 0)

    @model_validator(mode="after")
    def _milestones(self) -> "Recipe":
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs 'milestones' (epochs at which lr is multiplied by gamma)")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be fewer than epochs {self.epochs}")
        return self


class TrainConfig(Recipe):
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: NHWC memory layout for models and batches (faster convolutions on recent GPUs); off unless asked
    channels_last: bool = False
    #: TF32 matmuls/convolutions on CUDA (no effect on CPU)
    tf32: bool = True
    #: deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN autotuning): reproducible, slower
    deterministic: bool = False
    #: torch.compile the student's forward passes: a one-off compile per run (tens of seconds), faster steps after
    #: (on GPU; on CPU it needs a C++ compiler). Options below left out of dumps at their defaults, so studies
    #: written before they existed keep their fingerprints.
    compile: bool = Field(False, exclude_if=lambda v: not v)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", exclude_if=lambda v: v == "default")
    compile_backend: str = Field("inductor", exclude_if=lambda v: v == "inductor")
    #: where teacher outputs are cached when inputs are deterministic (no augmentation, or data.augment_seed):
    #: memory, disk ($KDBENCH_CACHE_DIR/teacher_outputs, shared with workers and later studies), or off (live)
    teacher_cache: Literal["memory", "disk", "off"] = Field("memory", exclude_if=lambda v: v == "memory")
    #: the largest cache allowed (GiB); a larger one is not built and the teacher runs live (the reason is logged)
    teacher_cache_gb: PositiveFloat = Field(4.0, exclude_if=lambda v: v == 4.0)
    #: DOT (Zhao et al., ICCV 2023): separate SGD momenta for the CE (momentum − dot_delta) and KD (momentum +
    #: dot_delta) gradients of distillation runs (kdbench.engine.dot); SGD only
    dot: bool = Field(False, exclude_if=lambda v: not v)
    dot_delta: float = Field(0.075, ge=0.0, lt=1.0, exclude_if=lambda v: v == 0.075)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"must be auto, cpu, cuda, cuda:<index> or mps, got {v!r}")


class ModelSpec(PretrainedFields):
    model: str
    kwargs: dict[str, Any] = {}

    _kwargs = field_validator("kwargs")(check_kwargs)


class TeacherConfig(Recipe, ModelSpec):
    #: 0: use a pretrained teacher as it is (its classes must be the data's, or ImageNet's covering them)
    epochs: TeacherEpochs = 15
    seed: Seed = 0
    #: a state dict (safetensors or torch.save) to load instead of training
    checkpoint: Optional[str] = None
    #: where trained teachers are cached (default $KDBENCH_CACHE_DIR/teachers or ~/.cache/kdbench/teachers)
    cache_dir: Optional[str] = None
    #: with several teachers: this one's share in the weighted average of their logits
    weight: PositiveFinite = 1.0
    #: label smoothing of the teacher's cross-entropy (fine-tuning recipes); students' CE is never smoothed, so
    #: the CE baseline and the distilled students stay comparable
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, exclude_if=lambda v: v == 0.0)

    @model_validator(mode="after")
    def _untrained(self) -> "TeacherConfig":
        if self.epochs == 0 and not (self.pretrained or self.checkpoint):
            raise ValueError("epochs: 0 uses the teacher as it is: it needs 'pretrained' weights or a 'checkpoint'")
        return self


class StudentConfig(ModelSpec):
    #: with several students: the name of this one's Optuna studies and leaderboard section (default: model)
    label: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=MAX_NAME)

    @property
    def key(self) -> str:
        return self.label or self.model


class LossPart(StrictModel):
    """One part of a combined loss: ``weight · loss`` with its own fixed parameters."""

    name: str
    label: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=MAX_NAME)
    weight: NonNegativeFinite = 1.0
    params: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return self.label or self.name.replace(":", "_").replace(".", "_")


class LossEntry(StrictModel):
    """One swept loss: a registry name (or ``a+b``, or parts with weights, or a user's ``module:attr``), fixed
    parameters, and overrides of the card's search space."""

    name: Optional[str] = None
    #: a combination: parts with weights and their own parameters (instead of ``name: a+b``)
    parts: list[LossPart] = []
    #: fixed values of the loss's own parameters (and of alpha/weight/weighting ...); fixed ones are not searched
    params: dict[str, Any] = {}
    #: search-space overrides or additions; ``null`` removes a parameter from the card's search space
    search: dict[str, Optional[SearchParam]] = {}
    #: label used for this entry's Optuna study and leaderboard row (default: the name)
    label: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=MAX_NAME)

    #: per-class multipliers of the KD term's per-sample weights (length = number of classes)
    class_weights: Optional[list[NonNegativeFinite]] = None
    #: distil only on samples of these classes (by the student's label): a domain mask
    kd_classes: Optional[list[NonNegativeInt]] = None

    @model_validator(mode="after")
    def _name_or_parts(self) -> "LossEntry":
        if bool(self.name) == bool(self.parts):
            raise ValueError("give either 'name' or 'parts'")
        if self.name and "+" in self.name:
            self.parts = [LossPart(name=n.strip()) for n in self.name.split("+")]
        keys = [p.key for p in self.parts]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"part {dup[0]!r} appears twice; give each a distinct 'label'")
        return self

    @property
    def key(self) -> str:
        return self.label or self.name or "+".join(p.key for p in self.parts)


class SweepConfig(StrictModel):
    trials: PositiveInt = 8
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    #: trials that run to completion before the median pruner may stop one
    pruner_startup_trials: NonNegativeInt = 2
    #: epochs before the pruner looks at a trial; unset: a third of train.epochs (benchmarks/bench_sweep.py: with 2
    #: of 15 epochs the median pruner stopped the sweep's eventual best trial in both seeds, with 5 it kept it)
    pruner_warmup_epochs: Optional[NonNegativeInt] = None
    #: epochs between the pruner's looks after its warm-up (Optuna's interval_steps); a trial evaluates validation
    #: only there and at its last epoch. Unset: ⌈(train.epochs − warm-up) / 4⌉, about 4 looks (benchmark 7:
    #: looking every epoch made validation 16% of a quickstart trial)
    pruner_interval_epochs: Optional[PositiveInt] = None
    seed: Seed = 0
    metric: Literal["val_acc"] = "val_acc"
    #: which epoch's score counts: the last, or the one with the best validation accuracy
    select: Literal["last", "best"] = "last"
    #: seconds between heartbeats of running trials (RDB storages); a trial silent for 3 intervals is failed and
    #: retried, and a coordinator silent that long loses its role
    heartbeat: PositiveInt = 10


class ConfirmConfig(StrictModel):
    #: a count n (seeds 0..n-1) or an explicit list
    seeds: Union[PositiveInt, list[Seed]] = 3
    #: export each loss's final student (its confirm run with the best val accuracy) as a file + MLflow artifact
    export: bool = True
    #: also log those final students with mlflow.pytorch.log_model (never done per trial)
    log_model: bool = True

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct seeds")
        return v


class Reference(StrictModel):
    """Published top-1 test accuracies (%) shown beside the measured rows; not part of the experiment."""

    source: str = Field(min_length=1)  # the paper and table (or README) the numbers are from
    #: row → accuracy: ``teacher`` (``teacher[i]`` with several), ``ce`` (the student alone), a loss entry's key
    acc: dict[str, Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)


class TrackingConfig(StrictModel):
    uri: Optional[str] = None  # default sqlite:///<out>/mlflow.db
    experiment: Optional[str] = None  # default: the study name


class StudyConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME)
    description: str = ""
    data: DataConfig = DataConfig()
    #: one teacher, or several whose logits are fused by weighted averaging (always a list once parsed)
    teacher: list[TeacherConfig] = Field(min_length=1)
    #: one student, or several distilled from the same teacher(s) in one study (always a list once parsed)
    student: list[StudentConfig] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    losses: list[LossEntry] = Field(min_length=1)
    sweep: SweepConfig = SweepConfig()
    confirm: ConfirmConfig = ConfirmConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: Optional[str] = None  # Optuna storage URL; default sqlite:///<out>/optuna.db
    reference: Optional[Reference] = Field(None, exclude_if=lambda v: v is None)
    #: which of teacher/student the file gave as lists (error messages then say teacher[i], else teacher)
    _listed: frozenset = PrivateAttr(default=frozenset())

    @property
    def teachers(self) -> list[TeacherConfig]:
        return self.teacher

    @property
    def students(self) -> list[StudentConfig]:
        return self.student

    @property
    def timm_transforms(self) -> bool:
        """Whether the models are fed through timm's transforms at their own data configs (see data.transforms)."""
        if self.data.transforms != "auto":
            return self.data.transforms == "timm"
        models = self.teachers + self.students
        return "/" in self.data.dataset or any(m.pretrained or m.input is not None for m in models)

    def field(self, name: str, i: int) -> str:
        """How the study file names teacher/student ``i``: ``teacher[1]`` in a list, ``teacher`` when given alone."""
        return f"{name}[{i}]" if name in self._listed or len(getattr(self, name)) > 1 else name

    @model_validator(mode="wrap")
    @classmethod
    def _one_or_many(cls, data: Any, handler):
        listed = frozenset(k for k in ("teacher", "student") if isinstance(data, dict) and isinstance(data.get(k), list))
        if isinstance(data, dict):
            data = {**data, **{k: [data[k]] for k in ("teacher", "student") if isinstance(data.get(k), dict)}}
        model = handler(data)
        model._listed = listed
        return model

    @field_validator("student")
    @classmethod
    def _distinct_students(cls, v):
        keys = [s.key for s in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"student {dup[0]!r} appears twice; give each a distinct 'label'")
        return v

    @field_validator("losses", mode="before")
    @classmethod
    def _shorthand(cls, v):
        # "- kd" is shorthand for "- name: kd"
        if isinstance(v, list):
            return [{"name": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("losses")
    @classmethod
    def _unique_keys(cls, losses: list[LossEntry]) -> list[LossEntry]:
        seen = set()
        for e in losses:
            if e.key in seen:
                raise ValueError(f"loss {e.key!r} appears twice; give one a distinct 'label'")
            seen.add(e.key)
        return losses

    def compact_dump(self, **kwargs) -> dict:
        """``model_dump(mode="json")`` with a lone teacher or student written as one object, as before they were
        normalised to lists: fingerprints, MLflow params and snapshots of existing studies stay the same."""
        body = self.model_dump(mode="json", **kwargs)
        for k in ("teacher", "student"):
            if isinstance(body.get(k), list) and len(body[k]) == 1:
                body[k] = body[k][0]
        return body

    def fingerprint(self) -> str:
        """A hash of everything that defines the experiment (not where it is stored)."""
        not_experiment = {"tracking", "storage", "description", "reference"}
        return spec_digest(self.compact_dump(exclude=not_experiment))
