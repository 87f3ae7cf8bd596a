"""The torch modules of every pipeline, by pipeline name: what export and the torch backend build.

`build_modules(pipeline, preset, weights)` builds every component at once; `LazyModules` builds
one network at a time for exporting full-size graphs in bounded memory.
"""

from __future__ import annotations

import gc
from typing import Callable, Mapping

from torch import nn

from networks.background import build_background
from networks.layout import build_layout
from networks.poster import build_poster
from networks.refadgen import REFADGEN_COMPONENTS, build_refadgen, refadgen_part
from runtime.artifacts.weights import WeightsSource
from runtime.errors import WeightsError
from runtime.presets import Preset

Builder = Callable[[Preset, WeightsSource], dict[str, nn.Module]]
BUILDERS: dict[str, Builder] = {
    "refadgen": build_refadgen,
    "background": build_background,
    "layout": build_layout,
    "poster": build_poster,
}
# Pipelines whose networks can be built one at a time: component -> (network, wrapper), and the
# network builder. The others build every module at once (fine at the sizes they export).
LAZY = {"refadgen": (REFADGEN_COMPONENTS, refadgen_part)}


def build_modules(pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The torch modules of `pipeline`, keyed by component spec name."""
    if pipeline not in BUILDERS:
        raise WeightsError(f"no networks for pipeline {pipeline!r}; have {sorted(BUILDERS)}")
    return BUILDERS[pipeline](preset, weights)


class LazyModules(Mapping[str, nn.Module]):
    """The modules of a pipeline built one network at a time, for exporting full-size graphs in
    bounded memory: only the network behind the last requested component is kept (the VAE
    serves both VAE components and the generation U-Net both `afm_kv` and `unet`)."""

    def __init__(self, pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()):
        self.preset = preset
        self.weights = weights
        self._held: tuple[str, nn.Module] | None = None
        self._eager: dict[str, nn.Module] | None = None
        if pipeline in LAZY:
            self._components, self._build_part = LAZY[pipeline]
        else:  # no per-network table: every module at once (fine at the sizes such pipelines export)
            self._eager = build_modules(pipeline, preset, weights)
            self._components = {name: (name, lambda m: m) for name in self._eager}
            self._build_part = lambda preset, weights, part: self._eager[part]

    def __getitem__(self, name: str) -> nn.Module:
        part, wrap = self._components[name]
        if self._held is None or self._held[0] != part:
            self._held = None  # drop the previous network before building the next one
            gc.collect()
            self._held = (part, self._build_part(self.preset, self.weights, part))
        return wrap(self._held[1]).eval().requires_grad_(False)

    def __iter__(self):
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def release(self) -> None:
        self._held = None  # eagerly built pipelines keep their modules: they are built only once
        gc.collect()
