"""Every MLflow tag key kdbench writes or reads, defined once. Reports are rebuilt from these tags alone, so a key
renamed here is renamed everywhere; ``kdbench.*`` literals elsewhere in the package are a bug."""
from __future__ import annotations

import re

# what a run is and where it belongs
ROLE = "kdbench.role"  # study | teacher | baseline | trial | confirm
STUDY = "kdbench.study"
LOSS = "kdbench.loss"  # the entry's key (label or name)
LOSS_NAME = "kdbench.loss_name"  # the registry name behind the key
SEED = "kdbench.seed"
STUDENT = "kdbench.student"
TEACHER_INDEX = "kdbench.teacher_index"
WORKER = "kdbench.worker"
THREADS = "kdbench.threads"  # the trial's compute threads (--workers N share the cores)
PARENT = "mlflow.parentRunId"
OPTUNA_STUDY = "optuna.study_name"
TRIAL = "optuna.trial_number"

#: the ``kdbench.loss`` value (and leaderboard key) of the CE-only student
BASELINE = "ce"

# how a run ended
STATE = "kdbench.trial_state"  # COMPLETE | PRUNED | FAIL
PRUNE_REASON = "kdbench.prune_reason"
ERROR = "kdbench.error"

# the study run: what it is, where it ran
CONFIG_HASH = "kdbench.config_hash"
VERSION = "kdbench.version"
COMMIT = "kdbench.commit"
COMMAND = "kdbench.command"  # the command line that (last) ran the study, when run from the shell
TORCH = "kdbench.torch"
DEVICE = "kdbench.device"
OPTUNA_STORAGE = "kdbench.optuna_storage"
TEACHERS = "kdbench.teachers"
STUDENTS = "kdbench.students"
TEACHER_OUTPUTS = "kdbench.teacher_outputs"
NOTE = "mlflow.note.content"  # shown by the MLflow UI as the run's description
DATA = "kdbench.data"  # JSON: the split sizes and whether test is the data set's official test set
REFERENCE = "kdbench.reference"  # JSON: the study file's published accuracies (a tag: may change on resume)
# what the study plans now (params are write-once; a resumed study may add trials, seeds and losses)
PLAN_TRIALS = "kdbench.plan.trials"
PLAN_SEEDS = "kdbench.plan.seeds"  # as the study file says: a count or a JSON list
PLAN_LOSSES = "kdbench.plan.losses"  # JSON list of the entries' keys

# the experiment (experiment tags; NOTE as an experiment tag is the experiment's description)
EXPERIMENT_KIND = "mlflow.experimentKind"  # the experiment's kind to the MLflow UI (see MlflowTracker.ui_link)
KIND_TRAINING = "custom_model_development"  # the UI's "Machine learning" kind (not "genai_development")

# teachers and final students
TEACHER_SOURCE = "kdbench.teacher_source"
TEACHER_KEY = "kdbench.teacher_key"
INPUTS = "kdbench.inputs"  # under timm's transforms: what each model is fed
TEACHER_ORIGIN = "kdbench.teacher_origin"  # starting weights and what training made of them
HEAD = "kdbench.classifier"  # how a pretrained model's classifier was adapted to the data's classes
CHECKPOINT = "kdbench.checkpoint"
EXPORTED = "kdbench.exported"
BEST_PREFIX = "kdbench.best"  # kdbench.best.<student>.<loss> on the study run: the exported confirm run

#: short names accepted by ``Tracker.find(role=..., loss=...)``
FIND_KEYS = {"role": ROLE, "study": STUDY, "loss": LOSS, "seed": SEED, "parent": PARENT, "student": STUDENT,
             "teacher_index": TEACHER_INDEX}


def safe_key(name: str) -> str:
    """An MLflow param/metric/tag name for ``name`` (MLflow allows alphanumerics and ``_ - . : /`` and space)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def best_key(student: str, loss: str) -> str:
    return f"{BEST_PREFIX}.{safe_key(student)}.{safe_key(loss)}"
