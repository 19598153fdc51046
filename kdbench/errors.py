"""One error type for everything a user can get wrong: the CLI prints its message as one line and exits non-zero;
and :func:`mask_secrets`, which every message, tag and log line that may hold a URL goes through."""
from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+):(?P<pw>[^@/\s]+)@")


class KdbenchError(Exception):
    """A user-facing error whose message names the field, file or name at fault."""


def mask_secrets(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` URL in ``text``."""
    return _PASSWORD.sub(lambda m: f"{m.group('scheme')}:***@", str(text))
