"""What a pipeline provides, and the procedure every pipeline shares, so the API, the CLI, the
servers and the benchmarks drive every pipeline the same way.

A pipeline module defines one `PipelineDefinition` (registered by name in
`runtime.pipelines.PIPELINES`) and a runner. A definition checks a request without touching a
model (`prepare` -> `Prepared`), opens its runner over components (`create`), runs prepared
requests as one batch (`run_batch`, shared: one schedule per batch, one report layout), and says
which component runs how often (`call_plan`). A latent-diffusion runner is a `LatentPipeline`:
it supplies only its own conditioning (`condition`) and finishing (`finish`); the denoising loop,
decoding, compositing and timing are shared.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.boxes import time_pairs
from runtime.diffusion.loop import Denoiser, Guidance, StepCallback, denoise
from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.inputs.images import MAX_IMAGE_PIXELS, PlacedProduct, from_model_image, placed_product
from runtime.inputs.latents import load_latents
from runtime.inputs.tokenizer import Tokenizer
from runtime.pipelines.checks import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    check_batch,
    require_components,
    schedule_settings,
)
from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, Precision, SpecBuilder, build_specs
from runtime.specs.guided import with_guided_step
from runtime.timing import StageTimer

__all__ = ["Call", "Conditioning", "GenerateResult", "LatentPipeline", "PipelineDefinition", "PipelineOutput",
           "Prepared", "Schedule", "StepCallback"]


# The options `PipelineDefinition.prepared` reads for every pipeline (each only if the pipeline has it).
COMMON_OPTIONS = ("product", "mask", "width", "height", "steps", "scheduler", "layout_steps", "latents", "max_pixels")


@dataclass(frozen=True)
class Call:
    """How one component runs for a pipeline call: under which report stage, at which network
    batch, how many times. The benchmark harness multiplies this by per-call FLOPs; tests check
    it against the calls a run really makes."""

    stage: str
    batch: int
    calls: int


@dataclass
class GenerateResult:
    image: np.ndarray  # (H, W, 3) uint8
    report: dict = field(default_factory=dict)  # pipeline-specific fields and "timings_s"


@dataclass(frozen=True)
class Schedule:
    """The loop settings of a request; every request of a batch shares them. A pipeline sets the
    ones it has (the layout pipeline has layout steps only)."""

    steps: int | None = None
    scheduler: str | None = None
    layout_steps: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Prepared:
    """A validated request: the pipeline's request object, its product's source and placement,
    its loop settings, the other input files it read (by option name, for the report) and the
    seconds loading and checking took."""

    request: Any
    product: PlacedProduct
    schedule: Schedule
    seconds: float
    files: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Conditioning:
    """What a latent pipeline computes once per request: the loop's per-step work, and whatever
    its finishing needs of it (`carry`: the poster's planned layouts; for the default finishing,
    report fields per request)."""

    denoiser: Denoiser
    carry: Any = None


@dataclass
class PipelineOutput:
    images: list[np.ndarray]  # (H, W, 3) uint8: what the user gets
    generated: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8: the decoder's output
    timings: dict[str, object] = field(default_factory=dict)
    reported: list[dict] = field(default_factory=list)  # per request, report fields the runner found out


class LatentPipeline(ABC):
    """The runner of a latent-diffusion pipeline. `__call__` reads top to bottom: the pipeline's
    own per-request conditioning (`condition`, once per request), the one denoising loop
    (runtime/diffusion/loop.py), the VAE decoder, the product composited through its mask (its
    pixels exact), and the pipeline's own finishing (`finish`). Requests in one call share the
    canvas size and step count but keep their own prompt, seed and scales; a request's result
    does not depend on what else is in the batch."""

    name: str
    needs: tuple[str, ...]  # the components it runs

    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        require_components(components, self.required_components(components), self.name)
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer

    def required_components(self, components: Mapping[str, Component]) -> Sequence[str]:
        return self.needs

    @property
    def fused(self) -> bool:
        """Whether the per-step component is a fused guided-step graph (guidance inside)."""
        return False

    def __call__(
        self,
        requests: Sequence[Any],
        steps: int = DEFAULT_STEPS,
        scheduler: str = DEFAULT_SCHEDULER,
        on_step: StepCallback | None = None,
    ) -> PipelineOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        guidance = Guidance.of([r.guidance for r in requests], fused=self.fused)
        with timer.stage("total"):
            conditioning = self.condition(requests, guidance, timer)
            canvas, s = requests[0].product, self.preset.vae_scale
            shape = (self.preset.latent_channels, canvas.height // s, canvas.width // s)
            seeds, given = [r.seed for r in requests], [r.latents for r in requests]
            latents = denoise(conditioning.denoiser, seeds, shape, steps, scheduler, guidance, timer, on_step, given)
            with timer.stage("vae_decode"):
                decoded = run_cast(self.components["vae_decoder"], {"latent": latents})["image"]
                generated = from_model_image(decoded.astype(np.float32, copy=False))
            with timer.stage("compose"):
                images = [self.compose(g, r) for g, r in zip(generated, requests)]
            output = self.finish(requests, images, generated, conditioning.carry, timer)
        output.timings = timer.summary()
        return output

    def compose(self, generated: np.ndarray, request: Any) -> np.ndarray:
        """The request's product pasted back over its generated image (its pixels exact)."""
        return compose(generated, request.product)

    @abstractmethod
    def condition(self, requests: Sequence[Any], guidance: Guidance, timer: StageTimer) -> Conditioning:
        """Everything computed once per request, timed by stage, and the loop's per-step work."""

    def finish(
        self, requests: Sequence[Any], images: list[np.ndarray], generated: list[np.ndarray], carry: Any,
        timer: StageTimer,
    ) -> PipelineOutput:
        """What follows compositing: nothing, unless the pipeline draws on the image."""
        return PipelineOutput(images, generated, reported=list(carry or []))


class PipelineDefinition(ABC):
    """One pipeline: its components' specs, its inputs, and how to run it."""

    name: str
    options: tuple[str, ...]  # keys of runtime.pipelines.options.OPTIONS this pipeline reads
    required: tuple[str, ...] = ()  # of those, the ones without a default
    # Components called every denoising step: a server batches their calls across requests.
    step_components: tuple[str, ...] = ()
    # The option that sets the main loop's step count, and the report stage each step is timed under.
    steps_option: str = "steps"
    step_stage: str = "denoise_step"
    # The per-step component and the inputs both guidance halves share, for the fused
    # guided-step graph (runtime/specs/guided.py); None: this pipeline has no such option.
    guided_step: tuple[str, tuple[str, ...]] | None = None
    default_layout_steps: int | None = None  # pipelines that plan a layout: box-diffusion steps

    spec_builders: tuple[SpecBuilder, ...]  # one per exported component (runtime/specs/<pipeline>.py)

    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        """One spec per exported component, by name."""
        return build_specs(self.spec_builders, preset, precision)

    def fused_specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        """`specs` with the per-step component replaced by its guided-step graph."""
        if self.guided_step is None:
            raise InputError("fused_step", f"pipeline {self.name} has no fused guided-step graph")
        step, shared = self.guided_step
        return with_guided_step(self.specs(preset, precision), step, shared)

    @abstractmethod
    def prepare(self, preset: Preset, **options: Any) -> Prepared:
        """Load and validate a request's inputs without touching a model (bad input fails fast)."""

    @abstractmethod
    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> Any:
        """The runner over opened components."""

    @abstractmethod
    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        """Per component: stage, network batch and calls for `requests` requests of `steps` steps
        of the main loop (`steps_option`), with this pipeline's `example_options` otherwise."""

    @abstractmethod
    def request_report(self, prepared: Prepared, output: Any, index: int) -> dict:
        """The report fields of request `index` of a batch that only this pipeline has."""

    def loop_arguments(self, schedule: Schedule) -> dict[str, Any]:
        """The runner's loop keywords for a batch's schedule."""
        return {"steps": schedule.steps, "scheduler": schedule.scheduler}

    def run(self, runner: Any, prepared: Prepared, on_step: StepCallback | None = None) -> GenerateResult:
        """One request through the runner."""
        return self.run_batch(runner, [prepared], on_step)[0]

    def run_batch(self, runner: Any, prepared: list[Prepared], on_step: StepCallback | None = None) -> list[GenerateResult]:
        """Requests that share a canvas size and schedule, as one batch through the runner."""
        schedules = {p.schedule for p in prepared}
        if len(schedules) != 1:
            raise InputError("requests", "expected one schedule (steps, scheduler, layout steps) per batch",
                             sorted(str(s.to_dict()) for s in schedules))
        output = runner([p.request for p in prepared], **self.loop_arguments(schedules.pop()), on_step=on_step)
        return [GenerateResult(output.images[i], self.report(p, output, i, len(prepared))) for i, p in enumerate(prepared)]

    def report(self, prepared: Prepared, output: Any, index: int, batch: int) -> dict:
        r = prepared.request
        return {
            "seed": r.seed,
            **self.request_report(prepared, output, index),
            "width": r.product.width,
            "height": r.product.height,
            **prepared.schedule.to_dict(),
            "product": prepared.product.to_dict(),
            **({"latents": prepared.files.get("latents", "given")} if getattr(r, "latents", None) is not None else {}),
            "batch": batch,
            "timings_s": {"load_inputs": round(prepared.seconds, 6), **output.timings},
        }

    def prepared(
        self,
        preset: Preset,
        common: Mapping[str, Any],
        build: Callable[[PlacedProduct, Schedule], Any],
        stretch: bool = False,
        **files: str | Path | None,
    ) -> Prepared:
        """The part of `prepare` every pipeline shares: the options in `common` (the product and
        its mask, the canvas size, the schedule, initial latents, `max_pixels`) checked and
        loaded, then the pipeline's request built by `build(placed product, schedule)` and
        validated. `stretch`: the photo stretched onto the canvas (`placed_product`). `files`
        are the other input files, named in the report."""
        started = time.perf_counter()
        unknown = sorted(k for k in common if k != "max_pixels" and (k not in COMMON_OPTIONS or k not in self.options))
        if unknown:
            raise InputError(unknown[0], f"is not an option of pipeline {self.name}")
        missing = [k for k in self.required if k in COMMON_OPTIONS and k not in common]
        if missing:
            raise InputError(missing[0], f"is required by pipeline {self.name}")
        schedule = self.schedule(common)
        placed = placed_product(preset, common["product"], common.get("mask"), common.get("width"),
                                common.get("height"), common.get("max_pixels", MAX_IMAGE_PIXELS), stretch)
        request = build(placed, schedule)
        if common.get("latents") is not None:
            canvas, s = placed.product, preset.vae_scale
            shape = (preset.latent_channels, canvas.height // s, canvas.width // s)
            request = replace(request, latents=load_latents(common["latents"], shape))
            if not isinstance(common["latents"], np.ndarray):
                files = {**files, "latents": common["latents"]}
        request.validate()
        named = {k: str(v) for k, v in files.items() if v is not None}
        return Prepared(request, placed, schedule, time.perf_counter() - started, named)

    def schedule(self, common: Mapping[str, Any]) -> Schedule:
        """The request's loop settings with this pipeline's defaults, checked."""
        steps = scheduler = layout_steps = None
        if "steps" in self.options:
            steps, scheduler = schedule_settings(common.get("steps"), common.get("scheduler"))
        if "layout_steps" in self.options:
            layout_steps = common.get("layout_steps")
            layout_steps = self.default_layout_steps if layout_steps is None else layout_steps
            time_pairs(layout_steps)
        return Schedule(steps, scheduler, layout_steps)

    def example_options(self, folder: Path, preset: Preset) -> dict[str, Any]:
        """Request options for demos and benchmarks, writing any input images they need into `folder`."""
        from runtime.inputs.examples import draw_product

        product = folder / "product.png"
        draw_product(preset.default_width, preset.default_height).save(product)
        return {"product": product}

