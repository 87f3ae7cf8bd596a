"""The exported-graph cache: one folder per (pipeline, preset, precision, spec hash, weights).

A folder is reused only when its `manifest.json` matches what the caller needs: the same
spec hash per component, precision, opset and weights fingerprint, and every graph file present
with the recorded size. A folder is written under a temporary name and renamed into place, so
a crashed or concurrent export never leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from runtime.artifacts.manifest import check_key
from runtime.artifacts.manifest import read_manifest as read_manifest_file
from runtime.artifacts.weights import WeightsSource
from runtime.errors import BackendError, ExportError
from runtime.presets import Preset
from runtime.specs.core import AttentionKernel, ComponentSpec, Precision, specs_hash
from runtime.timing import Progress

CACHE_ENV = "ADGEN_CACHE"
MANIFEST = "manifest.json"
PARITY = "parity.json"
REEXPORT = "re-export with `adgen export` (or remove it from the cache)"
OPSET = 17
# Bumped when the exported graphs change while the specs do not (a cached folder of an earlier
# revision is then exported again): 2 = RADM's RoIAlign as ONNX RoiAlign instead of GridSample.
GRAPH_REVISION = 2


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
    revision: int = GRAPH_REVISION

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
            f"{self.pipeline}-{self.preset}-{self.precision.value}-{self.attention.value}attn-opset{self.opset}-r{self.revision}"
            f"-{self.specs_hash}-{self.weights}"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"precision": self.precision.value, "attention": self.attention.value}


def read_manifest(folder: Path) -> dict:
    """The manifest of an exported graph folder."""
    return read_manifest_file(Path(folder) / MANIFEST, "no manifest; not an exported graph folder", REEXPORT)


def graph_path(folder: Path, component: str) -> Path:
    return folder / f"{component}.onnx"


def check_manifest(folder: Path, key: GraphKey, specs: Mapping[str, ComponentSpec]) -> dict:
    """Return the manifest of `folder` if it serves `key`; raise BackendError naming the mismatch."""
    path = folder / MANIFEST
    manifest = read_manifest(folder)
    check_key(str(path), manifest.get("key", {}), key.to_dict(), REEXPORT)
    for spec in specs.values():
        check_component_graph(folder, manifest, spec)
    return manifest


def check_component_graph(folder: Path, manifest: Mapping, spec: ComponentSpec) -> Path:
    """The graph of `spec` in an exported folder, checked against the folder's manifest: listed,
    exported from this spec, and of the recorded size."""
    path, where = graph_path(folder, spec.name), folder / MANIFEST
    entry = manifest.get("components", {}).get(spec.name)
    if entry is None:
        raise BackendError(f"{where}: component {spec.name} missing; {REEXPORT}")
    if entry.get("spec_hash") != spec.spec_hash():
        raise BackendError(f"{where}: {spec.name} spec hash {entry.get('spec_hash')} != {spec.spec_hash()}; {REEXPORT}")
    size = _size(path)
    if size != entry.get("bytes"):
        raise BackendError(f"{where}: {path.name} is {size} bytes, manifest says {entry.get('bytes')}; {REEXPORT}")
    return path


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


@dataclass(frozen=True)
class GraphSource:
    """What a pipeline's graphs are exported from, and where to find them: an explicit folder
    from `adgen export` (checked against its manifest), else the cache."""

    pipeline: str
    preset: Preset
    weights: WeightsSource = WeightsSource()
    precision: Precision = Precision.FP32
    attention: AttentionKernel = AttentionKernel.ORT  # how exported graphs write attention
    cache_root: Path | None = None  # exported-graph cache (default: default_cache_root())
    graphs_dir: Path | None = None  # an explicit exported folder


def graph_key(specs: Mapping[str, ComponentSpec], source: GraphSource, attention: AttentionKernel | None = None) -> GraphKey:
    fingerprint = source.weights.fingerprint(source.preset.name)
    return GraphKey.of(source.pipeline, source.preset.name, source.precision, specs, fingerprint, attention or source.attention)


def ensure_graphs(specs: Mapping[str, ComponentSpec], source: GraphSource, progress: Progress | None = None) -> Path:
    """The folder of exported graphs for `source`, exporting them on a cache miss."""
    if source.graphs_dir is not None:
        folder = Path(source.graphs_dir)
        recorded = read_manifest(folder).get("key", {}).get("attention")
        # ONNX Runtime runs both attention forms, so an explicit folder may hold either.
        attention = AttentionKernel(recorded) if recorded in {k.value for k in AttentionKernel} else None
        check_manifest(folder, graph_key(specs, source, attention), specs)
        return folder
    key = graph_key(specs, source)
    root = source.cache_root or default_cache_root()
    folder = root / key.dirname
    if folder.exists():
        try:
            check_manifest(folder, key, specs)
            return folder
        except BackendError as stale:
            if progress:
                progress(f"replacing unusable cache folder: {stale}")
            shutil.rmtree(folder)
    try:
        from export.onnx_export import export_pipeline
        from networks.common.guided import WithGuidedSteps
        from networks.registry import LazyModules
    except ImportError as e:
        raise BackendError(
            f"no exported graphs for {key.dirname} under {root}, and exporting needs torch "
            f"({e.name} missing): pip install 'adgen[export]', or pass a folder made by `adgen export`"
        ) from e
    if progress:
        progress(f"exporting {source.pipeline} ({source.preset.name}) to ONNX once; cached in {root / key.dirname}")
    modules = WithGuidedSteps(LazyModules(source.pipeline, source.preset, source.weights), specs)
    try:
        return export_pipeline(modules, specs, key, folder, progress)
    except (ExportError, OSError):
        found = find_graphs(root, key, specs)  # another process finished the same export first
        if found is None:
            raise
        return found
