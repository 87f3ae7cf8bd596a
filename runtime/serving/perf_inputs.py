"""Input data for Triton's perf_analyzer (`--input-data FILE`) for any model adgen serves, made
from what defines that model: a component model's spec (shapes at the spec's `opt` canvas, values
inside each input's declared range, so the server's checks accept them), or a pipeline model's
request as `adgen generate` would send it (the example product, a prompt, selling points).

    adgen perf-inputs refadgen_unet --preset tiny --out unet.json
    perf_analyzer -m refadgen_unet -b 2 --input-data unet.json -u localhost:8001 -i grpc

A component model with a batch dimension gets one batch item (perf_analyzer's `-b` repeats it);
tensors travel base64-encoded (`b64`), BYTES tensors (pipeline requests) in Triton's serialized
form: each element's 4-byte little-endian length, then its bytes. docs/serving.md has how to get
the perf_analyzer binary on these machines and `benchmarks/perf_analyzer.py` runs it side by side
with adgen's own client.
"""

from __future__ import annotations

import base64
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.pipelines import PIPELINES, get_pipeline
from runtime.pipelines.base import PipelineDefinition
from runtime.presets import Preset
from runtime.serving.protocol import batch_dim, encode_request, model_name, to_wire
from runtime.specs.core import ComponentSpec

PROMPT = "a sneaker on a wooden table, studio light"
TEXTS = ["40% off", "Breathable mesh"]


def served_models(preset: Preset) -> dict[str, tuple[PipelineDefinition, ComponentSpec | None]]:
    """Every model name of the repository for `preset`: pipeline models (spec None) and their
    components."""
    models: dict[str, tuple[PipelineDefinition, ComponentSpec | None]] = {}
    for name in PIPELINES:
        definition = get_pipeline(name)
        models[name] = (definition, None)
        for spec in definition.specs(preset).values():
            models[model_name(name, spec.name)] = (definition, spec)
    return models


def component_data(spec: ComponentSpec, seed: int = 0) -> dict[str, Any]:
    """One perf_analyzer data entry for a component model: every input at the spec's `opt` dims."""
    batched = batch_dim(spec) is not None
    env = spec.env_at("opt", **({batch_dim(spec).name: 1} if batched else {}))
    feed = to_wire(spec, spec.sample_inputs(np.random.default_rng(seed), env))
    entry = {}
    for name, array in feed.items():
        item = np.ascontiguousarray(array[0] if batched else array)  # Triton's batch dim comes from -b
        entry[name] = {"b64": base64.b64encode(item.tobytes()).decode("ascii"), "shape": list(item.shape) or [1]}
    return entry


def serialize_bytes(elements: np.ndarray) -> bytes:
    """A BYTES tensor as Triton serializes it: per element, its length (uint32 LE) then its bytes."""
    out = bytearray()
    for element in elements.reshape(-1):
        data = element if isinstance(element, bytes) else str(element).encode("utf-8")
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """serialize_bytes read back (what Triton does with a BYTES tensor's raw contents)."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ValueError(f"BYTES tensor: a length prefix cut off at byte {at} of {len(raw)}")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise ValueError(f"BYTES tensor: element at byte {at} claims {length} bytes, {len(raw) - at - 4} left")
        out.append(raw[at + 4:at + 4 + length])
        at += 4 + length
    return out


def pipeline_data(definition: PipelineDefinition, preset: Preset, steps: int | None) -> dict[str, Any]:
    """One perf_analyzer data entry for a pipeline model: the example request of `definition`."""
    with tempfile.TemporaryDirectory() as folder:
        options = definition.example_options(Path(folder), preset)
        if "prompt" in definition.options:
            options.setdefault("prompt", PROMPT)
        if "text" in definition.options:
            options.setdefault("text", TEXTS)
        if steps is not None:
            options[definition.steps_option] = steps
        feed = encode_request(definition, options)
    entry = {}
    for name, array in feed.items():
        raw = serialize_bytes(array) if array.dtype == np.object_ else np.ascontiguousarray(array).tobytes()
        entry[name] = {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(array.shape)}
    return entry


def perf_input_data(model: str, preset: Preset, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """perf_analyzer's input-data JSON for `model` as served at `preset`."""
    models = served_models(preset)
    if model not in models:
        raise InputError("model", f"expected a model served at preset {preset.name}: {', '.join(sorted(models))}",
                         repr(model))
    definition, spec = models[model]
    if spec is None:
        return {"data": [pipeline_data(definition, preset, steps)]}
    if steps is not None:
        raise InputError("steps", "applies to pipeline models only", model)
    return {"data": [component_data(spec, seed)]}


def write_perf_input_data(model: str, preset: Preset, out: Path, steps: int | None = None, seed: int = 0) -> Path:
    out = Path(out)
    out.write_text(json.dumps(perf_input_data(model, preset, steps, seed)))
    return out
