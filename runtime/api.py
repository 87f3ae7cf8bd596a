"""The Python API behind `adgen generate`: open a pipeline once, then run requests through it.

    pipe = load_pipeline("refadgen", preset="tiny", backend="onnxruntime")
    result = generate(pipe, product="shoe.png", prompt="a sneaker on a wooden table")
    save_result(result, "ad.png")      # ad.png + ad.json
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

from runtime.artifacts.architecture import resolve_preset
from runtime.artifacts.weights import WeightsSource, parts_of
from runtime.backends import load_components
from runtime.backends.base import ModelSource
from runtime.backends.devices import Device
from runtime.errors import InputError
from runtime.inputs.images import save_png
from runtime.inputs.tokenizer import describe_tokenizer
from runtime.pipelines import get_pipeline
from runtime.pipelines.base import GenerateResult, PipelineDefinition, StepCallback
from runtime.pipelines.processing import with_weights_default
from runtime.specs.core import Precision, specs_hash
from runtime.timing import Progress


@dataclass
class LoadedPipeline:
    definition: PipelineDefinition
    backend: str
    runner: Any
    source: ModelSource
    specs_hash: str
    load_seconds: float
    components: dict = field(default_factory=dict)  # name -> Component, for close()

    @property
    def name(self) -> str:
        return self.definition.name

    def close(self) -> None:
        """Release what the backend holds (a server backend's connection and shared memory)."""
        for component in self.components.values():
            component.close()


def load_pipeline(
    pipeline: str = "refadgen",
    preset: str = "tiny",
    backend: str = "onnxruntime",
    weights: str | Path | None = None,
    init_seed: int = 0,
    cache_dir: str | Path | None = None,
    graphs_dir: str | Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    server_url: str | None = None,
    precision: str | Precision = Precision.FP32,
    device: str | Device = Device.CPU,
    engines_dir: str | Path | None = None,
    cuda_graphs: bool = False,
    fused_step: bool = False,
    allow_random: Iterable[str] = (),
) -> LoadedPipeline:
    """Open every component of `pipeline` on `backend` (exporting ONNX graphs on a cache miss).

    With `weights` (a folder from `adgen import`) the networks have the folder's architecture
    and `preset` gives only the canvas bounds; parts the folder lacks run randomly initialised
    only when named in `allow_random`. `precision` fp16 runs float16 graphs (inputs are cast to
    the spec's dtypes); `device` cuda or tensorrt picks ONNX Runtime's GPU providers (torch: cuda)."""
    definition = get_pipeline(pipeline)
    started = time.perf_counter()
    if isinstance(allow_random, str):
        raise InputError("allow_random", "expected a list of part names", repr(allow_random))
    source_weights = WeightsSource(seed=init_seed, path=Path(weights) if weights else None, allow_random=frozenset(allow_random))
    size = resolve_preset(preset, source_weights)
    source_weights.check(pipeline, parts_of(definition.specs(size)))
    source = ModelSource(
        pipeline=pipeline,
        preset=size,
        weights=source_weights,
        cache_root=Path(cache_dir) if cache_dir else None,
        graphs_dir=Path(graphs_dir) if graphs_dir else None,
        threads=threads,
        server_url=server_url,
        precision=_enum(Precision, precision, "precision"),
        device=_enum(Device, device, "device"),
        engines_dir=Path(engines_dir) if engines_dir else None,
        cuda_graphs=cuda_graphs,
    )
    # fused_step: the per-step component as one guided-step graph (runtime/specs/guided.py)
    specs = definition.fused_specs(size, source.precision) if fused_step else definition.specs(size, source.precision)
    components = load_components(backend, specs, source, progress)
    runner = definition.create(components, size, source.weights)
    return LoadedPipeline(definition, backend, runner, source, specs_hash(specs), time.perf_counter() - started, components)


def prepare(loaded: LoadedPipeline, **options: Any) -> Any:
    """Validate a request for `loaded` (see the pipeline's `prepare` for its options)."""
    definition = loaded.definition
    options = with_weights_default(definition.name, definition.options, loaded.source.weights, options)
    return definition.prepare(loaded.source.preset, **options)


def run(loaded: LoadedPipeline, prepared: Any, on_step: StepCallback | None = None, debug: bool = False) -> GenerateResult:
    """One prepared request; the report gains the fields common to every pipeline (with `debug`,
    also this machine's Python, processor and library versions)."""
    result = loaded.definition.run(loaded.runner, prepared, on_step)
    source = loaded.source
    result.report = {
        "pipeline": loaded.name,
        "preset": source.preset.name,
        "architecture": source.preset.architecture or f"preset {source.preset.name}",
        "backend": loaded.backend,
        "precision": source.precision.value,
        "device": source.device.value,
        "weights": source.weights.describe(),
        "weights_parts": source.weights.status(parts_of(loaded.definition.specs(source.preset))),
        "tokenizer": describe_tokenizer(loaded.runner.tokenizer),
        **result.report,
        "pipeline_load_s": round(loaded.load_seconds, 6),
        "specs_hash": loaded.specs_hash,
    }
    if debug:
        result.report["machine"] = machine_report()
    return result


def machine_report() -> dict:
    """This machine's Python, processor and library versions: for a `--debug` report only."""
    return {"python": platform.python_version(), "processor": platform.machine(), "versions": _versions()}


def generate(loaded: LoadedPipeline, on_step: StepCallback | None = None, **options: Any) -> GenerateResult:
    """prepare + run in one call."""
    return run(loaded, prepare(loaded, **options), on_step)


def save_result(result: GenerateResult, out: str | Path) -> tuple[Path, Path]:
    """Write the image to `out` and the report beside it (same name, .json)."""
    image_path = Path(out)
    report_path = image_path.with_suffix(".json")
    save_png(image_path, result.image)
    report_path.write_text(json.dumps(result.report, indent=2) + "\n")
    return image_path, report_path


def _enum(kind, value, field: str):
    try:
        return kind(value)
    except ValueError:
        raise InputError(field, f"expected one of {', '.join(k.value for k in kind)}", repr(value)) from None


def _versions() -> dict[str, str]:
    found = {}
    for lib in ("numpy", "onnxruntime", "torch"):
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            found[lib] = "absent"
    return found
