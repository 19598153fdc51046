"""Reading a study file: YAML through ``yaml.safe_load``, validated into :class:`~kdbench.config.schema.StudyConfig`,
with every problem as one line ``<file>: <field>: <problem>``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ValidationError

from kdbench.config.bounds import MAX_STUDY_BYTES, expansion_error
from kdbench.config.schema import StudyConfig
from kdbench.errors import KdbenchError


def _branch(seg) -> bool:
    """A union branch tag in an error location ('TeacherConfig', 'list[function-after[...]]'); field names are
    lowercase identifiers."""
    return isinstance(seg, str) and (seg[:1].isupper() or "[" in seg or seg.startswith("constrained-"))


def _format_error(source: str, err: ValidationError, single: frozenset = frozenset()) -> str:
    errors = err.errors()
    # a lone teacher/student was wrapped in a list: name its fields as the file does (teacher.model, not teacher[0])
    for e in errors:
        loc = e["loc"]
        if len(loc) > 1 and loc[0] in single and loc[1] == 0:
            e["loc"] = (loc[0],) + tuple(loc[2:])
    # for 'one or a list' fields, drop the branch that only says "this is not my type"
    wrong_type = ("model_type", "list_type", "dict_type", "model_attributes_type", "int_type")
    errors = [e for e in errors if not (any(map(_branch, e["loc"])) and e["type"] in wrong_type)] or errors
    e = errors[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"] if not _branch(p))
    loc = loc.replace(".[", "[")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "missing":
        msg = "missing required field"
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "…"  # a 300-character name is not repeated in full
    got = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(e.get("input"), dict) else f" (got {shown})"
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{source}: {where}{msg}{got}{more}"


def parse_study(data: Any, source: str = "study") -> StudyConfig:
    if not isinstance(data, dict):
        raise KdbenchError(f"{source}: a study file must be a YAML mapping, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        single = frozenset(k for k in ("teacher", "student") if isinstance(data.get(k), dict))
        raise KdbenchError(_format_error(source, err, single)) from None


def load_study(path: Union[str, Path]) -> StudyConfig:
    p = Path(path)
    if not p.is_file():
        raise KdbenchError(f"{p}: study file not found")
    size = p.stat().st_size
    if size > MAX_STUDY_BYTES:  # before reading: PyYAML takes minutes over tens of MB
        raise KdbenchError(f"{p}: file size: {size:,} bytes, over the {MAX_STUDY_BYTES:,} a study file may have")
    try:
        data = yaml.safe_load(p.read_text())
        bomb = expansion_error(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise KdbenchError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    except (RecursionError, UnicodeDecodeError) as e:
        raise KdbenchError(f"{p}: unreadable YAML: {type(e).__name__}") from None
    if bomb:  # validating or hashing a bomb expands it: hours and all memory
        raise KdbenchError(f"{p}: {bomb}")
    return parse_study(data, str(p))
