"""The exported-graph cache: one folder per (pipeline, preset, precision, spec hash, weights).

A folder is reused only when its `manifest.json` matches what the caller needs: the same
spec hash per component, precision, opset and weights fingerprint, and every graph file present
with the recorded size. A folder is written under a temporary name and renamed into place, so
a crashed or concurrent export never leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from runtime.errors import BackendError
from runtime.specs import AttentionKernel, ComponentSpec, Precision, specs_hash

CACHE_ENV = "ADGEN_CACHE"
MANIFEST = "manifest.json"
PARITY = "parity.json"
OPSET = 17


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adgen"


@dataclass(frozen=True)
class GraphKey:
    """What an exported graph set depends on; its folder name is derived from all of it."""

    pipeline: str
    preset: str
    precision: Precision
    specs_hash: str
    weights: str  # WeightsSource.fingerprint
    attention: AttentionKernel = AttentionKernel.ORT
    opset: int = OPSET

    @classmethod
    def of(
        cls,
        pipeline: str,
        preset: str,
        precision: Precision,
        specs: Mapping[str, ComponentSpec],
        weights: str,
        attention: AttentionKernel = AttentionKernel.ORT,
    ) -> "GraphKey":
        return cls(pipeline, preset, precision, specs_hash(specs), weights, attention)

    @property
    def dirname(self) -> str:
        return (
            f"{self.pipeline}-{self.preset}-{self.precision.value}-{self.attention.value}attn-opset{self.opset}"
            f"-{self.specs_hash}-{self.weights}"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"precision": self.precision.value, "attention": self.attention.value}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise BackendError(f"{folder}: no {MANIFEST}; not an exported graph folder")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: unreadable manifest ({e})") from e


def graph_path(folder: Path, component: str) -> Path:
    return folder / f"{component}.onnx"


def check_manifest(folder: Path, key: GraphKey, specs: Mapping[str, ComponentSpec]) -> dict:
    """Return the manifest of `folder` if it serves `key`; raise BackendError naming the mismatch."""
    path = folder / MANIFEST
    manifest = read_manifest(folder)
    recorded = manifest.get("key", {})
    for field_name, wanted in key.to_dict().items():
        if recorded.get(field_name) != wanted:
            raise BackendError(
                f"{path}: built for {field_name}={recorded.get(field_name)!r}, need {wanted!r}; re-export"
            )
    components = manifest.get("components", {})
    for name, spec in specs.items():
        entry = components.get(name)
        if entry is None:
            raise BackendError(f"{path}: component {name} missing; re-export")
        if entry.get("spec_hash") != spec.spec_hash():
            raise BackendError(f"{path}: {name} spec hash {entry.get('spec_hash')} != {spec.spec_hash()}; re-export")
        size = _size(graph_path(folder, name))
        if size != entry.get("bytes"):
            raise BackendError(f"{path}: {name}.onnx is {size} bytes, manifest says {entry.get('bytes')}; re-export")
    return manifest


def find_graphs(root: Path, key: GraphKey, specs: Mapping[str, ComponentSpec]) -> Path | None:
    """The cached folder for `key` if a valid one exists, else None."""
    folder = root / key.dirname
    if not folder.exists():
        return None
    try:
        check_manifest(folder, key, specs)
    except BackendError:
        return None
    return folder


def _size(path: Path) -> int | None:
    try:
        total = path.stat().st_size
    except OSError:
        return None
    data = path.with_name(path.name + ".data")  # external weights of graphs past protobuf's 2 GB
    return total + (data.stat().st_size if data.exists() else 0)


def graph_bytes(path: Path) -> int:
    size = _size(path)
    if size is None:
        raise BackendError(f"missing graph {path}")
    return size
