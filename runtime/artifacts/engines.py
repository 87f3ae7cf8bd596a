"""TensorRT engine identity, kept free of tensorrt and torch so it is tested on any machine.

An engine serves one component on one GPU model with one TensorRT version, for the shapes of
its optimization profiles, with the weights and graph it was built from. `EngineKey` holds all
of that; the engine's path is derived from it and a manifest beside the engine records it.
The runtime recomputes the key for the GPU it is on and refuses an engine whose manifest
differs in any field, naming the field.

Optimization profiles come from the spec: `profiles(spec, canvases)` gives one dynamic profile
(the spec's min/opt/max) or, for fixed ad sizes, one profile per canvas with every spatial dim
pinned and only the batch free (1..max: the 2B of classifier-free guidance).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from runtime.artifacts.manifest import check_key, key_mismatches
from runtime.artifacts.manifest import read_manifest as read_manifest_file
from runtime.errors import BackendError, InputError
from runtime.specs.core import ComponentSpec, Dim, Precision

if TYPE_CHECKING:
    from runtime.artifacts.graphs import GraphKey

ENGINE_SUFFIX = ".plan"
ENGINE_MANIFEST_SUFFIX = ".json"
REBUILD = "rebuild with `adgen engines`"
BATCH_DIM = "B"

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass(frozen=True)
class GpuIdentity:
    """What a TensorRT engine and timing cache are specific to."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]
    cuda: str  # CUDA runtime version, e.g. "12.8"

    @property
    def slug(self) -> str:
        return _slug(self.name) + f"-sm{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two builds with equal keys are interchangeable."""

    component: str
    spec_hash: str
    precision: Precision
    graphs: str  # GraphKey.dirname of the ONNX folder: pipeline, preset, attention, opset, specs, weights
    weights: str  # weights fingerprint (also inside `graphs`; kept apart so a refusal can name it)
    profile_hash: str
    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt: str

    @classmethod
    def of(
        cls,
        spec: ComponentSpec,
        precision: Precision,
        graphs: str,
        weights: str,
        profile_set: Sequence[Profile],
        gpu: GpuIdentity,
        tensorrt: str,
    ) -> "EngineKey":
        cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
        return cls(spec.name, spec.spec_hash(), precision, graphs, weights, profile_hash(profile_set), gpu.name, cc, tensorrt)

    @property
    def filename(self) -> str:
        """Component, GPU, compute capability, TensorRT, precision, profile and weights hashes,
        then a digest of every field (spec and source graphs too), so no two keys share a file."""
        cc = self.compute_capability.replace(".", "")
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return (
            f"{self.component}-{_slug(self.gpu_name)}-sm{cc}-trt{self.tensorrt}-{self.precision.value}"
            f"-p{self.profile_hash}-w{self.weights}-{digest}{ENGINE_SUFFIX}"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"precision": self.precision.value}


def engine_path(root: Path, key: EngineKey) -> Path:
    return Path(root) / key.filename


def manifest_path(engine: Path) -> Path:
    return engine.with_suffix(ENGINE_MANIFEST_SUFFIX)


def timing_cache_path(root: Path, gpu: GpuIdentity, tensorrt: str) -> Path:
    """Timing caches are valid for one GPU, CUDA and TensorRT version: the name says which."""
    return Path(root) / f"timing-{gpu.slug}-cuda{gpu.cuda}-trt{tensorrt}.cache"


def canvas_dims(spec: ComponentSpec, canvas: Mapping[str, int]) -> dict[str, int]:
    """The base dims of `spec` that `canvas` pins (by dim name), checked against their bounds."""
    pinned = {}
    for d in spec.dims:
        if isinstance(d, Dim) and d.name != BATCH_DIM and d.name in canvas:
            problem = d.check(canvas[d.name])
            if problem:
                raise InputError("sizes", f"{spec.name}: canvas needs {problem}", f"{d.name}={canvas[d.name]}")
            pinned[d.name] = canvas[d.name]
    return pinned


def profiles(spec: ComponentSpec, canvases: Sequence[Mapping[str, int]] = ()) -> list[Profile]:
    """Optimization profiles of `spec`.

    No canvases: one profile, the spec's own (min, opt, max) for every input. With canvases
    (each a dim-name -> value map, see `runtime.specs.shared.canvas_env`): one profile per canvas,
    its spatial dims pinned, the batch dim over the spec's full range. A component with no
    spatial dims (text encoder) gets the single dynamic profile whatever the canvases.
    """
    if not canvases:
        return [spec.profile()]
    result: list[Profile] = []
    for canvas in canvases:
        pinned = canvas_dims(spec, canvas)
        if not pinned:
            return [spec.profile()]
        envs = [spec.env_at(point, **pinned) for point in ("min", "opt", "max")]
        profile = {t.name: tuple(spec.shape(t, e) for e in envs) for t in spec.inputs}
        if profile not in result:
            result.append(profile)  # type: ignore[arg-type]
    return result


def profile_hash(profile_set: Sequence[Profile]) -> str:
    canonical = [{name: [list(s) for s in shapes] for name, shapes in sorted(p.items())} for p in profile_set]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:12]


def select_profile(profile_set: Sequence[Profile], shapes: Mapping[str, Shape]) -> int:
    """Index of the first profile whose bounds hold every input shape; BackendError if none."""
    for index, profile in enumerate(profile_set):
        if all(
            all(lo <= v <= hi for lo, v, hi in zip(bounds[0], shapes[name], bounds[2]))
            for name, bounds in profile.items()
        ):
            return index
    first = next(iter(profile_set[0])) if profile_set and profile_set[0] else "?"
    ranges = [f"{p[first][0]}..{p[first][2]}" for p in profile_set if first in p]
    raise BackendError(
        f"no optimization profile holds these shapes ({first}: {shapes.get(first)}); the engine has {ranges}: "
        f"rebuild with `adgen engines --sizes` covering this size"
    )


def write_manifest(engine: Path, key: EngineKey, profile_set: Sequence[Profile], canvases: Sequence[Mapping[str, int]], extra: dict) -> None:
    record = {
        "key": key.to_dict(),
        "bytes": engine.stat().st_size,
        "canvases": [dict(c) for c in canvases],
        "profiles": [{n: [list(s) for s in shapes] for n, shapes in p.items()} for p in profile_set],
        **extra,
    }
    manifest_path(engine).write_text(json.dumps(record, indent=2))


def read_manifest(engine: Path) -> dict:
    """The manifest beside an engine."""
    return read_manifest_file(manifest_path(engine), "no manifest beside the engine", REBUILD)


def check_engine(engine: Path, key: EngineKey) -> dict:
    """The manifest of `engine` if it was built for `key`; else BackendError naming the field."""
    manifest = read_manifest(engine)
    check_key(engine.name, manifest.get("key", {}), key.to_dict(), REBUILD)
    size = engine.stat().st_size if engine.is_file() else None
    if size != manifest.get("bytes"):
        raise BackendError(f"{engine.name}: {size} bytes, manifest says {manifest.get('bytes')}; {REBUILD}")
    return manifest


def find_engine(root: Path, key: EngineKey) -> Path:
    """The engine for `key` under `root`. When the exact file is absent, the refusal names what
    differs from the closest engine there is for the component (GPU, TensorRT, profile...)."""
    exact = engine_path(root, key)
    if exact.is_file():
        check_engine(exact, key)
        return exact
    candidates = sorted(Path(root).glob(f"{key.component}-*{ENGINE_SUFFIX}"))
    if not candidates:
        raise BackendError(f"no TensorRT engine for {key.component} under {root}; build them with `adgen engines`")
    wanted = key.to_dict()
    best: tuple[int, Path, list[str]] | None = None
    for path in candidates:
        try:
            recorded = read_manifest(path).get("key", {})
        except BackendError:
            continue  # a half-written or foreign file: not a candidate
        if recorded.get("component") != key.component:
            continue
        diff = key_mismatches(recorded, wanted)
        if best is None or len(diff) < best[0]:
            best = (len(diff), path, diff)
    if best is None:
        raise BackendError(f"no engine with a readable manifest for {key.component} under {root}; rebuild with `adgen engines`")
    raise BackendError(f"{best[1].name} was built for {', '.join(best[2])}; rebuild with `adgen engines`")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


INDEX = "engines.json"


def engine_keys(
    specs: Mapping[str, ComponentSpec],
    graphs: "GraphKey",
    gpu: GpuIdentity,
    tensorrt: str,
    canvases: Sequence[Mapping[str, int]] = (),
) -> dict[str, tuple[EngineKey, list[Profile]]]:
    """The key and profiles every component's engine has, built from the graphs of `graphs`
    on `gpu` with TensorRT `tensorrt` for `canvases` (none: the specs' dynamic profiles)."""
    result = {}
    for name, spec in specs.items():
        profile_set = profiles(spec, canvases)
        key = EngineKey.of(spec, graphs.precision, graphs.dirname, graphs.weights, profile_set, gpu, tensorrt)
        result[name] = (key, profile_set)
    return result


def write_index(root: Path, graphs: "GraphKey", canvases: Sequence[Mapping[str, int]], engines: Mapping[str, str]) -> None:
    """`engines.json`: what the folder was built from and for which canvases."""
    record = {"graphs": graphs.to_dict(), "canvases": [dict(c) for c in canvases], "engines": dict(engines)}
    (Path(root) / INDEX).write_text(json.dumps(record, indent=2))


def read_index(root: Path) -> dict:
    return read_manifest_file(Path(root) / INDEX, f"no {INDEX}; not a folder made by `adgen engines`", REBUILD)
