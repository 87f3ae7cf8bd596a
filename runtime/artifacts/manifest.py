"""The JSON records that say what a built artifact was built from: an exported graph folder's
`manifest.json`, each TensorRT engine's `.json`, an engines folder's `engines.json`. One reader
and one key comparison, so every artifact is refused the same way: naming the file, the field
that differs, and how to rebuild it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from runtime.errors import BackendError


def read_manifest(path: Path, missing: str, remedy: str) -> dict:
    """The JSON object at `path`. BackendError `<path>: <missing>` when there is no such file,
    `<path>: unreadable (...); <remedy>` when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"{path}: {missing}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: unreadable ({e}); {remedy}") from e
    if not isinstance(record, dict):
        raise BackendError(f"{path}: unreadable (expected a JSON object, got {type(record).__name__}); {remedy}")
    return record


def key_mismatches(recorded: Mapping[str, object], wanted: Mapping[str, object]) -> list[str]:
    """`field=recorded (need wanted)` for every field of `wanted` the recorded key differs in."""
    return [f"{k}={recorded.get(k)!r} (need {v!r})" for k, v in wanted.items() if recorded.get(k) != v]


def check_key(what: str, recorded: Mapping[str, object], wanted: Mapping[str, object], remedy: str) -> None:
    """BackendError naming the first field in which `recorded` differs from `wanted`."""
    for k, v in wanted.items():
        if recorded.get(k) != v:
            raise BackendError(f"{what}: built for {k}={recorded.get(k)!r}, need {v!r}; {remedy}")
