"""`adgen import`: trained checkpoints, in the formats their authors released, into adgen's
weights folder (runtime/artifacts/weights.py). The only code that reads pickles
(checkpoints.py); one module per family; what every import shares is in writer.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.importers.radm import import_radm
from export.importers.refadgen import import_refadgen
from export.importers.stable_diffusion import import_controlnet, import_sd
from export.importers.writer import ImportSummary, Progress

FAMILIES = {"refadgen": import_refadgen, "radm": import_radm, "sd": import_sd, "controlnet": import_controlnet}


def import_family(family: str, out: Path, progress: Progress = lambda m: None, **options: Any) -> ImportSummary:
    """Import `family` into the weights folder `out`; `options` are that family's sources."""
    return FAMILIES[family](out=Path(out), progress=progress, **options)
