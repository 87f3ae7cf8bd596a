"""Reading the files users hold: safetensors, and pickles read with `weights_only`.

This module is the one place adgen unpickles anything. `torch.load(weights_only=True)` rebuilds
only tensors, containers and primitives; `ALLOWED_GLOBALS` adds a short named list of classes
that real training loops store beside the weights (numpy scalars: step counts, losses). A pickle
that names anything else, `os.system` or a class whose unpickling runs code, is refused before
that code can run, with the names it asked for. Sources are recorded with their sha256.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from runtime.artifacts.weights import PICKLE_SUFFIXES, file_sha256
from runtime.errors import WeightsError

try:
    from numpy._core.multiarray import scalar as numpy_scalar  # numpy 2
except ImportError:
    from numpy.core.multiarray import scalar as numpy_scalar

# What real checkpoints store beside their tensors, and nothing that runs code when rebuilt.
ALLOWED_GLOBALS = (
    numpy_scalar,  # a numpy scalar from its dtype and bytes (step counts, losses)
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
    type(np.dtype(np.int64)),
    type(np.dtype(np.int32)),
)
SAFETENSORS = ".safetensors"


def allowed_names() -> list[str]:
    return sorted(f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS)


def load_pickle(path: Path) -> Any:
    """A pickled checkpoint (torch.save's zip format or a plain pickle), with weights_only and
    the allowlist; a zip-format file is memory-mapped, so tensors are read as they are used."""
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        asked = _unsafe_globals(path, str(e)) if is_zip else _named_globals(str(e))
        raise WeightsError(
            f"refusing {path}: unpickling it needs {', '.join(asked) or 'a global'}, which adgen does not allow "
            f"(only tensors, containers and {', '.join(allowed_names())}): a pickle can run code when it is loaded. "
            "If this is a checkpoint you trust, convert it to safetensors yourself and import that"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None


def _unsafe_globals(path: Path, message: str) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged archive: fall back to what the error said
        return _named_globals(message)
    allowed = set(allowed_names())
    return sorted(g for g in found if g not in allowed) or _named_globals(message)


def _named_globals(message: str) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def load_state_file(path: Path) -> dict[str, torch.Tensor] | Any:
    """A safetensors file as a state dict, or a pickled checkpoint as whatever it holds."""
    if not path.is_file():
        raise WeightsError(f"missing checkpoint {path}")
    if path.suffix == SAFETENSORS:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    return load_pickle(path)


@dataclass
class Sources:
    """The files an import read, each with its sha256 (the manifest's `sources`)."""

    files: dict[str, dict] = field(default_factory=dict)

    def add(self, path: Path, role: str, name: str | None = None) -> str:
        """Record `path` under `name` (default: its file name); returns the name the manifest uses."""
        path = Path(path).resolve()
        name = name or path.name
        name = name if name not in self.files else str(path)
        self.files[name] = {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path), "role": role}
        return name


@dataclass(frozen=True)
class FolderWeights:
    """The tensors of a diffusers/transformers model folder and the files they came from."""

    state: dict[str, torch.Tensor]
    files: tuple[Path, ...]
    ignored: tuple[Path, ...]  # other weight files beside them (a .bin next to the .safetensors)


def read_model_folder(folder: Path) -> FolderWeights:
    """The weights of a diffusers/transformers folder: its safetensors when it has them (sharded
    or not; not a variant such as `.fp16.safetensors` when the plain file is there), else its
    pickled `.bin` (read as `load_pickle` does)."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: expected a diffusers/transformers model folder")
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == SAFETENSORS or p.suffix in PICKLE_SUFFIXES))
    index = sorted(folder.glob(f"*{SAFETENSORS}.index.json"))
    if index:
        files = tuple(folder / name for name in sorted(set(json.loads(index[0].read_text())["weight_map"].values())))
    else:
        safetensors = [p for p in candidates if p.suffix == SAFETENSORS]
        plain = [p for p in safetensors if len(p.suffixes) == 1]
        files = tuple((plain or safetensors or candidates)[:1])
    if not files:
        raise WeightsError(f"{folder}: no weights file (.safetensors or .bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_state_file(file)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise WeightsError(f"{file}: expected a flat state dict of tensors")
        state.update(part)
    return FolderWeights(state, files, tuple(p for p in candidates if p not in files))
