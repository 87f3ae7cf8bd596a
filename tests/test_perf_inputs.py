"""`adgen perf-inputs`: perf_analyzer input data for every served model, decoded here the way
Triton decodes it and handed to the checks the server runs (the spec's for a component, the
request decoder and `prepare` for a pipeline), so a file perf_analyzer sends is one the server
accepts. tests/test_triton_server.py runs the perf_analyzer binary on one where it is installed."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from runtime.cli import main
from runtime.errors import InputError
from runtime.presets import get_preset
from runtime.serving.perf_inputs import deserialize_bytes, perf_input_data, serialize_bytes, served_models
from runtime.serving.protocol import batch_dim, decode_request, from_wire, request_tensors
from runtime.specs.core import DType

TINY = get_preset("tiny")
NUMPY = {DType.FLOAT32: np.float32, DType.FLOAT16: np.float16, DType.INT64: np.int64, DType.INT32: np.int32}


@pytest.mark.parametrize("model", sorted(m for m, (_, spec) in served_models(TINY).items() if spec is not None))
def test_component_input_data_passes_the_spec_checks_at_any_batch(model):
    _, spec = served_models(TINY)[model]
    (entry,) = perf_input_data(model, TINY)["data"]
    assert set(entry) == set(spec.input_names)
    batched = batch_dim(spec) is not None
    for batch in (1, 3) if batched else (1,):  # perf_analyzer -b repeats the one item
        feed = {}
        for t in spec.inputs:
            item = np.frombuffer(base64.b64decode(entry[t.name]["b64"]), dtype=NUMPY[t.dtype])
            item = item.reshape(entry[t.name]["shape"])
            feed[t.name] = np.stack([item] * batch) if batched else item
        spec.validate_inputs(from_wire(spec, feed), check_values=True)


@pytest.mark.parametrize("pipeline", ["refadgen", "background", "layout", "poster"])
def test_pipeline_input_data_is_a_request_the_pipeline_accepts(pipeline, tmp_path):
    definition, spec = served_models(TINY)[pipeline]
    assert spec is None
    steps = None if definition.steps_option == "layout_steps" else 2
    (entry,) = perf_input_data(pipeline, TINY, steps=steps)["data"]
    kinds = {t.name: t.kind for t in request_tensors(definition)}
    arrays = {}
    for name, value in entry.items():
        raw = base64.b64decode(value["b64"])
        kind = kinds[name]
        if kind.triton_dtype == "BYTES":
            arrays[name] = np.array(deserialize_bytes(raw), dtype=np.object_).reshape(value["shape"])
        else:
            arrays[name] = np.frombuffer(raw, dtype=np.int64 if kind.triton_dtype == "INT64" else np.float64)
    options = decode_request(definition, arrays, tmp_path)
    if steps is not None:
        assert options[definition.steps_option] == 2
    definition.prepare(TINY, **options)  # the server's own validation of the request


def test_cli_writes_the_file_and_refuses_unknown_models(tmp_path, capsys):
    out = tmp_path / "unet.json"
    assert main(["perf-inputs", "refadgen_unet", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text()) == perf_input_data("refadgen_unet", TINY)
    assert main(["perf-inputs", "refadgen_nothing", "--out", str(tmp_path / "x.json")]) == 2
    assert "expected a model served at preset" in capsys.readouterr().err
    with pytest.raises(InputError, match="applies to pipeline models only"):
        perf_input_data("refadgen_unet", TINY, steps=3)


def test_bytes_serialization_round_trips_and_refuses_a_cut_tensor():
    elements = np.array([b"", b"\x00\xffpng", "40% off".encode()], dtype=np.object_)
    raw = serialize_bytes(elements)
    assert raw[:4] == b"\x00\x00\x00\x00" and deserialize_bytes(raw) == list(elements)
    with pytest.raises(ValueError, match="element at byte 13 claims 7 bytes, 6 left"):
        deserialize_bytes(raw[:-1])
