"""The Python API behind `adgen generate`: open a pipeline once, then generate ads with it.

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

import numpy as np

from .backends import load_components
from .backends.base import ModelSource, Progress
from .components import pipeline_specs
from .errors import InputError
from .images import MAX_IMAGE_PIXELS, Placement, check_canvas_size, load_product, place_on_canvas, save_png
from .pipelines.refadgen import RefAdGenPipeline, RefAdGenRequest, StepCallback, check_steps
from .presets import Preset, get_preset
from .schedulers import make_scheduler
from .specs import specs_hash
from .tokenizer import load_tokenizer
from .weights import WeightsSource

PIPELINES = ("refadgen",)


@dataclass
class LoadedPipeline:
    name: str
    backend: str
    runner: RefAdGenPipeline
    source: ModelSource
    specs_hash: str
    load_seconds: float


@dataclass
class GenerateResult:
    image: np.ndarray  # (H, W, 3) uint8
    report: dict = field(default_factory=dict)


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
) -> LoadedPipeline:
    """Open every component of `pipeline` on `backend` (exporting ONNX graphs on a cache miss)."""
    if pipeline not in PIPELINES:
        raise InputError("pipeline", f"expected one of {', '.join(PIPELINES)}", repr(pipeline))
    started = time.perf_counter()
    size = get_preset(preset)
    source = ModelSource(
        pipeline=pipeline,
        preset=size,
        weights=WeightsSource(seed=init_seed, path=Path(weights) if weights else None),
        cache_root=Path(cache_dir) if cache_dir else None,
        graphs_dir=Path(graphs_dir) if graphs_dir else None,
        threads=threads,
    )
    specs = pipeline_specs(pipeline, size, source.precision)
    components = load_components(backend, specs, source, progress)
    runner = RefAdGenPipeline(components, size, load_tokenizer(size, source.weights))
    return LoadedPipeline(pipeline, backend, runner, source, specs_hash(specs), time.perf_counter() - started)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: the product loaded and placed on its canvas."""

    request: RefAdGenRequest
    product_path: str
    product_size: tuple[int, int]
    placement: Placement
    steps: int
    scheduler: str
    seconds: float  # loading and checking the inputs


def prepare(
    preset: Preset | str,
    product: str | Path,
    prompt: str,
    mask: str | Path | None = None,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    afm_scale: float = 1.0,
    seed: int = 0,
    scheduler: str = "ddim",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> PreparedRequest:
    """Load and check every input without touching a model, so bad input fails fast."""
    started = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    check_steps(steps)
    make_scheduler(scheduler)
    item = load_product(product, mask, max_pixels=max_pixels)
    width, height = _canvas(item.width, item.height, width, height, preset)
    placed, placement = place_on_canvas(item, width, height)
    request = RefAdGenRequest(placed, prompt, negative_prompt, seed, guidance, afm_scale)
    request.validate()
    return PreparedRequest(
        request, str(product), (item.width, item.height), placement, steps, scheduler, time.perf_counter() - started
    )


def generate(loaded: LoadedPipeline, product: str | Path, prompt: str, on_step: StepCallback | None = None, **options) -> GenerateResult:
    """One ad image from a product photo (RGBA, or RGB + mask) and a prompt; `options` as `prepare`."""
    return run(loaded, prepare(loaded.source.preset, product, prompt, **options), on_step)


def run(loaded: LoadedPipeline, prepared: PreparedRequest, on_step: StepCallback | None = None) -> GenerateResult:
    r = prepared.request
    output = loaded.runner([r], steps=prepared.steps, scheduler=prepared.scheduler, on_step=on_step)
    report = {
        "pipeline": loaded.name,
        "preset": loaded.source.preset.name,
        "backend": loaded.backend,
        "weights": loaded.source.weights.describe(),
        "seed": r.seed,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "width": r.product.width,
        "height": r.product.height,
        "steps": prepared.steps,
        "scheduler": prepared.scheduler,
        "guidance": r.guidance,
        "afm_scale": r.afm_scale,
        "product": {
            "path": prepared.product_path,
            "size": list(prepared.product_size),
            "placement": _placement(prepared.placement),
        },
        "timings_s": {"load_inputs": round(prepared.seconds, 6), **output.timings},
        "pipeline_load_s": round(loaded.load_seconds, 6),
        "specs_hash": loaded.specs_hash,
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "versions": _versions()},
    }
    return GenerateResult(output.images[0], report)


def save_result(result: GenerateResult, out: str | Path) -> tuple[Path, Path]:
    """Write the image to `out` and the report beside it (same name, .json)."""
    image_path = Path(out)
    report_path = image_path.with_suffix(".json")
    save_png(image_path, result.image)
    report_path.write_text(json.dumps(result.report, indent=2) + "\n")
    return image_path, report_path


def _canvas(product_w: int, product_h: int, width: int | None, height: int | None, preset: Preset) -> tuple[int, int]:
    """The requested size; else the product's own size when the preset allows it; else the preset default."""
    if width is None and height is None:
        try:
            check_canvas_size(product_w, product_h, preset.min_side, preset.max_side)
            return product_w, product_h
        except InputError:
            return preset.default_width, preset.default_height
    width = preset.default_width if width is None else width
    height = preset.default_height if height is None else height
    check_canvas_size(width, height, preset.min_side, preset.max_side)
    return width, height


def _placement(p: Placement) -> dict:
    return {"scale": round(p.scale, 6), "offset": list(p.offset), "size": list(p.size)}


def _versions() -> dict[str, str]:
    found = {}
    for lib in ("numpy", "onnxruntime", "torch"):
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            found[lib] = "absent"
    return found
