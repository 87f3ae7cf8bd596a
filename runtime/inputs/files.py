"""Reading a small input file a request names (a `--layout-fixed` JSON, a categories JSON,
initial latents): refused, naming the field, when it is missing or larger than its cap, before
anything is read."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import InputError


def read_capped(path: str | os.PathLike[str], field: str, max_bytes: int, kind: str) -> bytes:
    """The file's bytes; `kind` names what it should be in the error ("a JSON file")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(field, "file not found", str(path))
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(field, f"expected {kind} of at most {max_bytes} bytes", size)
    return path.read_bytes()
