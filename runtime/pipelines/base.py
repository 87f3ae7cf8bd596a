"""What a pipeline provides, so the API, the CLI and (later) the servers drive every pipeline
the same way. A pipeline module defines one `PipelineDefinition` and is registered by name in
`runtime.pipelines.PIPELINES`.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.backends.base import Component
from runtime.errors import InputError
from runtime.guided import with_guided_step
from runtime.presets import Preset
from runtime.specs import ComponentSpec, Precision
from runtime.weights import WeightsSource

StepCallback = Callable[[int, int], None]

# Every `adgen generate` option a pipeline may use, defined once: (flags, argparse keywords).
# A pipeline names the ones it reads in `PipelineDefinition.options`.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "product": (("--product",), dict(type=Path, help="RGBA product image (alpha = mask), or RGB with --mask")),
    "mask": (("--mask",), dict(type=Path, help="product mask (white = product) for an RGB product image")),
    "prompt": (("--prompt",), dict(help="what the background should show")),
    "negative_prompt": (("--negative-prompt",), dict(help="what it should not show")),
    "width": (("--width",), dict(type=int, help="canvas width, multiple of 8 (default: the product's, else the preset's)")),
    "height": (("--height",), dict(type=int, help="canvas height, multiple of 8")),
    "steps": (("--steps",), dict(type=int, help="denoising steps (default: the pipeline's)")),
    "guidance": (("--guidance",), dict(type=float, help="classifier-free guidance scale (default 7.5)")),
    "afm_scale": (("--afm-scale",), dict(type=float, help="RefAdGen: weight of the reference attention (default 1.0)")),
    "seed": (("--seed",), dict(type=int, help="noise seed (default 0); same seed, same image")),
    "scheduler": (("--scheduler",), dict(choices=("ddim", "dpm++"), help="sampler (default ddim)")),
    "category": (("--category",), dict(help="background: product category (runtime/data/categories.json, or --categories)")),
    "categories": (("--categories",), dict(type=Path, help="background: JSON file of more categories {name: {noun, identifier}}")),
    "reference": (("--reference",), dict(type=Path, help="background: reference ad whose layout, colour and style to follow")),
    "reference_mask": (("--reference-mask",), dict(type=Path, help="background: the reference's product mask (white = product)")),
    "style_scale": (("--style-scale",), dict(type=float, help="background: weight of the reference's style (default 1.0)")),
    "text": (("--text",), dict(action="append", help="layout/poster: a selling point to place (repeat, up to 20)")),
    "layout_fixed": (("--layout-fixed",), dict(type=Path, help="layout/poster: JSON boxes kept exactly; the rest is planned around them")),
    "layout_steps": (("--layout-steps",), dict(type=int, help="layout/poster: box-diffusion steps (default: RADM 1, PlanNet 20)")),
    "control_scale": (("--control-scale",), dict(type=float, help="poster: weight of the RenderNet/ControlNet conditioning (default 1.0)")),
}


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
    # guided-step graph (runtime/guided.py); None: this pipeline has no such option.
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
        from runtime.example_product import draw_product

        product = folder / "product.png"
        draw_product(preset.default_width, preset.default_height).save(product)
        return {"product": product}


def add_option_arguments(parser: argparse.ArgumentParser, names: set[str]) -> None:
    for name in sorted(names, key=list(OPTIONS).index):
        flags, kwargs = OPTIONS[name]
        parser.add_argument(*flags, dest=name, **kwargs)
