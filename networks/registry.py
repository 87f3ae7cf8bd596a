"""The torch modules of every pipeline, by pipeline name: what export and the torch backend build.

A pipeline's components come from its specs; each runs one part (runtime.artifacts.weights.part_of),
built by networks/parts.py from a weights folder (its config, its tensors loaded strictly) or
randomly initialised from the preset. `build_modules(pipeline, preset, weights)` builds every
component at once; `LazyModules` builds one part at a time for exporting full-size graphs in
bounded memory. With a weights folder, `preset` is the one its configs define
(runtime.artifacts.architecture.resolve_preset).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from networks.layout import backbone_parity_feed
from networks.parts import PARTS
from networks.refadgen import AFMKeyValue
from networks.sd import TextEncoder, VAEDecoder, VAEEncoder, for_inference
from networks.weights import load_part, mismatches, seeded, shapes, write_part
from runtime.artifacts.weights import (
    WeightsSource,
    part_of,
    parts_of,
    read_part_config,
    weight_files,
    write_weights_manifest,
)
from runtime.errors import WeightsError
from runtime.presets import Preset
from runtime.specs.pipelines import PIPELINE_SPECS, pipeline_specs

# Components that wrap their part's network (the others are the network itself).
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "text_encoder": TextEncoder,
    "vae_encoder": VAEEncoder,
    "vae_decoder": VAEDecoder,
    "afm_kv": AFMKeyValue,
}
# A component whose parity inputs are another part's outputs: component -> (that part, feed maker).
PARITY_FEEDS = {"layout_head": ("layout_backbone", backbone_parity_feed)}


def pipeline_components(pipeline: str, preset: Preset) -> dict[str, str]:
    """component -> part, for every component of `pipeline`."""
    if pipeline not in PIPELINE_SPECS:
        raise WeightsError(f"no networks for pipeline {pipeline!r}; have {sorted(PIPELINE_SPECS)}")
    return {name: part_of(name) for name in pipeline_specs(pipeline, preset)}


def pipeline_parts(pipeline: str, preset: Preset) -> tuple[str, ...]:
    return parts_of(pipeline_specs(pipeline, preset))


def build_part(part: str, preset: Preset, weights: WeightsSource = WeightsSource()) -> nn.Module:
    """Part `part`: from the weights folder when it holds it, else randomly initialised (which a
    folder allows only for the parts in `weights.allow_random`)."""
    kind = PARTS[part]
    if weights.path is not None and weights.is_trained(part):
        module = kind.build(read_part_config(weights.path, part), preset)
        load_part(module, Path(weights.path), part)
        return module
    if weights.path is not None and part not in weights.allow_random:
        raise WeightsError(f"{weights.path} holds no trained {part}: import it, or allow it random (--allow-random {part})")
    return seeded(weights.seed, kind.seed, lambda: kind.build(kind.config(preset), preset))


def _component(name: str, part: nn.Module) -> nn.Module:
    return WRAPPERS.get(name, lambda m: m)(part)


def build_modules(pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The torch modules of `pipeline`, keyed by component spec name, eval mode, float32."""
    components = pipeline_components(pipeline, preset)
    if weights.path is not None:
        weight_files(weights.path)  # refuses pickles and folders that are not weights folders, before reading
    parts = {part: build_part(part, preset, weights) for part in dict.fromkeys(components.values())}
    modules = for_inference({name: _component(name, parts[part]) for name, part in components.items()})
    for name, (other, feed) in PARITY_FEEDS.items():
        if name in modules:
            modules[name].parity_feed = feed(parts[other])
    return modules


class LazyModules(Mapping[str, nn.Module]):
    """The modules of a pipeline built one part at a time, for exporting full-size graphs in
    bounded memory: only the part behind the last requested component is kept (the VAE serves
    both VAE components and the generation U-Net both `afm_kv` and `unet`)."""

    def __init__(self, pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()):
        self.preset = preset
        self.weights = weights
        self._components = pipeline_components(pipeline, preset)
        if weights.path is not None:
            weight_files(weights.path)
        self._held: tuple[str, nn.Module] | None = None

    def __getitem__(self, name: str) -> nn.Module:
        part = self._components[name]
        if self._held is None or self._held[0] != part:
            self._held = None  # drop the previous network before building the next one
            gc.collect()
            self._held = (part, build_part(part, self.preset, self.weights))
        module = _component(name, self._held[1]).eval().requires_grad_(False)
        if name in PARITY_FEEDS:
            other, feed = PARITY_FEEDS[name]
            module.parity_feed = feed(build_part(other, self.preset, self.weights).eval().requires_grad_(False))
        return module

    def __iter__(self):
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def release(self) -> None:
        self._held = None
        gc.collect()


def check_part_state(part: str, config: dict, preset: Preset, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse `state` unless it has exactly the keys and shapes of part `part` built from
    `config`; the network is built on the meta device, so a full-size check allocates nothing."""
    with torch.device("meta"):
        module = PARTS[part].build(config, preset)
    differs = mismatches(shapes(module.state_dict()), shapes(state))
    if differs:
        raise WeightsError(f"{where}: keys do not match adgen's {part} built from its config: {differs}")


def save_random_weights(pipeline: str, preset: Preset, seed: int, root: Path) -> Path:
    """Every part of `pipeline`, randomly initialised from `seed`, written as a weights folder
    (for tests and demos: the folder layout `adgen import` writes)."""
    parts = {}
    for part in pipeline_parts(pipeline, preset):
        module = build_part(part, preset, WeightsSource(seed=seed))
        write_part(root, part, PARTS[part].config(preset), module.state_dict())
        parts[part] = {"source": f"random init (seed {seed}, preset {preset.name})", "what": PARTS[part].doc}
    write_weights_manifest(root, {"parts": parts})
    return root
