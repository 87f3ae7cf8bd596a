"""What a pipeline provides, so the API, the CLI and (later) the servers drive every pipeline
the same way. A pipeline module defines one `PipelineDefinition` and is registered by name in
`runtime.pipelines.PIPELINES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component
from runtime.errors import InputError
from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, Precision
from runtime.specs.guided import with_guided_step

StepCallback = Callable[[int, int], None]

@dataclass(frozen=True)
class Call:
    """How one component runs for a pipeline call: under which report stage, at which network
    batch, how many times. The benchmark harness multiplies this by per-call FLOPs."""

    stage: str
    batch: int
    calls: int


@dataclass
class GenerateResult:
    image: np.ndarray  # (H, W, 3) uint8
    report: dict = field(default_factory=dict)  # pipeline-specific fields and "timings_s"


class PipelineDefinition(ABC):
    """One pipeline: its components' specs, its inputs, and how to run it."""

    name: str
    options: tuple[str, ...]  # keys of OPTIONS this pipeline reads
    required: tuple[str, ...] = ()  # of those, the ones without a default
    # Components called every denoising step: a server batches their calls across requests.
    step_components: tuple[str, ...] = ()
    # The option that sets the main loop's step count, and the report stage each step is timed under.
    steps_option: str = "steps"
    step_stage: str = "denoise_step"
    # The per-step component and the inputs both guidance halves share, for the fused
    # guided-step graph (runtime/specs/guided.py); None: this pipeline has no such option.
    guided_step: tuple[str, tuple[str, ...]] | None = None

    @abstractmethod
    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        """One spec per exported component."""

    def fused_specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        """`specs` with the per-step component replaced by its guided-step graph."""
        if self.guided_step is None:
            raise InputError("fused_step", f"pipeline {self.name} has no fused guided-step graph")
        step, shared = self.guided_step
        return with_guided_step(self.specs(preset, precision), step, shared)

    @abstractmethod
    def prepare(self, preset: Preset, **options: Any) -> Any:
        """Load and validate a request's inputs without touching a model (bad input fails fast)."""

    @abstractmethod
    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> Any:
        """The runner over opened components."""

    def run(self, runner: Any, prepared: Any, on_step: StepCallback | None = None) -> GenerateResult:
        """One request through the runner."""
        return self.run_batch(runner, [prepared], on_step)[0]

    @abstractmethod
    def run_batch(self, runner: Any, prepared: list[Any], on_step: StepCallback | None = None) -> list[GenerateResult]:
        """Requests that share a canvas size and step count, as one batch through the runner."""

    @abstractmethod
    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        """Per component: stage, network batch and calls for `requests` requests of `steps` steps."""

    def example_options(self, folder: Path, preset: Preset) -> dict[str, Any]:
        """Request options for demos and benchmarks, writing any input images they need into `folder`."""
        from runtime.inputs.examples import draw_product

        product = folder / "product.png"
        draw_product(preset.default_width, preset.default_height).save(product)
        return {"product": product}
