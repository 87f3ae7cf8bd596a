"""Each pipeline's component specs by pipeline name, for code below the pipelines layer (the
networks, the weights checks) that needs a pipeline's components without its runner."""

from __future__ import annotations

from runtime.presets import Preset
from runtime.specs.background import BACKGROUND_COMPONENTS
from runtime.specs.core import ComponentSpec, Precision, SpecBuilder, build_specs
from runtime.specs.layout import LAYOUT_COMPONENTS
from runtime.specs.poster import POSTER_COMPONENTS
from runtime.specs.refadgen import REFADGEN_COMPONENTS

PIPELINE_SPECS: dict[str, tuple[SpecBuilder, ...]] = {
    "refadgen": REFADGEN_COMPONENTS,
    "background": BACKGROUND_COMPONENTS,
    "layout": LAYOUT_COMPONENTS,
    "poster": POSTER_COMPONENTS,
}


def pipeline_specs(pipeline: str, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return build_specs(PIPELINE_SPECS[pipeline], preset, precision)
