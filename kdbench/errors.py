"""One error type for everything a user can get wrong: the CLI prints its message as one line and exits non-zero;
and :func:`mask_secrets`, which every message, tag and log line that may hold a URL goes through."""
from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+):(?P<pw>[^@/\s]+)@")


class KdbenchError(Exception):
    """A user-facing error whose message names the field, file or name at fault."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the current MLflow run ends KILLED and the Optuna trial FAIL (and re-offered)."""


def stop_reason(e: BaseException) -> str:
    """Why a run was stopped from outside (Ctrl-C, SIGTERM), as its error tag and the trial's reason say it."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C, SIGINT)"


def mask_secrets(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` URL in ``text``."""
    return _PASSWORD.sub(lambda m: f"{m.group('scheme')}:***@", str(text))
