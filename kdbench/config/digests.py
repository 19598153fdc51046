"""Short content hashes: of a JSON-able spec (study fingerprints, data fingerprints, cache keys) and of a file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union


def spec_digest(spec: Any) -> str:
    """16 hex digits of the SHA-256 of ``spec`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Union[str, Path]) -> str:
    """16 hex digits of the SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
