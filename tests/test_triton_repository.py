"""The model repository is generated from the specs (no server needed): the committed one is
exactly what the generator writes, every config parses back through Triton's schema with the
spec's tensors, and a pipeline model's request round-trips through the protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from runtime.errors import InputError, SpecError  # noqa: E402
from runtime.pipelines import PIPELINES, get_pipeline  # noqa: E402
from runtime.presets import PRESETS, get_preset  # noqa: E402
from runtime.serving.protocol import (  # noqa: E402
    MAX_FILE_BYTES,
    batch_only,
    decode_request,
    encode_request,
    from_wire,
    model_name,
    to_wire,
)
from runtime.serving.repository import CONFIG, NATIVE_FLAVOURS, RepositoryOptions, repository_files, write_repository  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "model_repository"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_committed_repository_is_what_the_generator_writes(preset, tmp_path):
    write_repository(tmp_path, get_preset(preset), PIPELINES)
    fresh, committed = _tree(tmp_path), _tree(COMMITTED / preset)
    assert sorted(fresh) == sorted(committed), "regenerate: python -m runtime.serving.repository"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: python -m runtime.serving.repository"


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_every_config_carries_the_specs_tensors(pipeline, tiny):
    definition = get_pipeline(pipeline)
    files = repository_files(tiny, [pipeline])
    for name, spec in definition.specs(tiny).items():
        model = model_name(pipeline, name)
        for path in [f"{model}/{CONFIG}"] + [f"{model}/configs/{f}.pbtxt" for f in NATIVE_FLAVOURS]:
            config = _parse(files[path])
            assert config.name == model
            assert [i.name for i in config.input] == list(spec.input_names), path
            assert [o.name for o in config.output] == list(spec.output_names), path
            assert config.max_batch_size == spec.dim("B").max
            for tensor, entry in zip(spec.inputs, config.input):
                wire = [1] if tensor.name in batch_only(spec) else [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]
                assert list(entry.dims) == wire, (path, tensor.name)
        python = _parse(files[f"{model}/{CONFIG}"])
        assert python.backend == "python" and python.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert python.parameters["adgen_spec_hash"].string_value == spec.spec_hash()
        assert python.HasField("dynamic_batching")
        expected_delay = 1000 if name in definition.step_components else 0
        assert python.dynamic_batching.max_queue_delay_microseconds == expected_delay
        assert _parse(files[f"{model}/configs/onnxruntime.pbtxt"]).platform == "onnxruntime_onnx"
        assert _parse(files[f"{model}/configs/tensorrt.pbtxt"]).platform == "tensorrt_plan"
        for flavour in NATIVE_FLAVOURS:
            assert _parse(files[f"{model}/configs/{flavour}.pbtxt"]).instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    bls = _parse(files[f"{pipeline}/{CONFIG}"])
    assert {i.name for i in bls.input} == set(definition.options)
    assert {i.name for i in bls.input if not i.optional} == set(definition.required)
    assert [o.name for o in bls.output] == ["image", "report"]


def test_step_batching_can_be_switched_off(tiny):
    definition = get_pipeline("refadgen")
    files = repository_files(tiny, ["refadgen"], RepositoryOptions(step_batching=False))
    for name in definition.specs(tiny):
        batched = _parse(files[f"{model_name('refadgen', name)}/{CONFIG}"]).HasField("dynamic_batching")
        assert batched == (name not in definition.step_components), name


def test_batch_only_tensors_travel_with_one_more_dim(tiny_specs):
    unet = tiny_specs["unet"]
    assert batch_only(unet) == {"timestep", "afm_scale"}
    feed = {"timestep": np.arange(3, dtype=np.float32), "sample": np.zeros((3, 5, 8, 8), np.float32)}
    wire = to_wire(unet, feed)
    assert wire["timestep"].shape == (3, 1) and wire["sample"].shape == (3, 5, 8, 8)
    back = from_wire(unet, wire)
    assert back["timestep"].shape == (3,) and np.array_equal(back["timestep"], feed["timestep"])


def test_request_round_trips_and_bad_requests_name_the_field(product_png, tmp_path):
    definition = get_pipeline("refadgen")
    feed = encode_request(definition, {"product": product_png, "prompt": "studio", "steps": 3, "guidance": 2.5})
    assert feed["product"].dtype == object and feed["steps"].dtype == np.int64 and feed["guidance"].dtype == np.float64
    options = decode_request(definition, feed, tmp_path)
    assert options["prompt"] == "studio" and options["steps"] == 3 and options["guidance"] == 2.5
    assert options["product"].read_bytes() == product_png.read_bytes()
    with pytest.raises(InputError, match="^prompt: is required"):
        decode_request(definition, {"product": feed["product"]}, tmp_path)
    with pytest.raises(InputError, match="^steps: expected a tensor of shape"):
        decode_request(definition, {**feed, "steps": np.array([1, 2], dtype=np.int64)}, tmp_path)
    with pytest.raises(InputError, match="^prompt: expected UTF-8"):
        decode_request(definition, {**feed, "prompt": np.array([b"\xff\xfe"], dtype=object)}, tmp_path)
    with pytest.raises(InputError, match="^product: expected at most"):
        decode_request(definition, {**feed, "product": np.array([b"0" * (MAX_FILE_BYTES + 1)], dtype=object)}, tmp_path)
    with pytest.raises(InputError, match="^bogus: is not an option of pipeline refadgen"):
        encode_request(definition, {"prompt": "x", "bogus": 1})
    with pytest.raises(InputError, match="^product: file not found"):
        encode_request(definition, {"product": tmp_path / "missing.png", "prompt": "x"})


class WrongOutputs:
    """A connection whose server answers with the given outputs (what Triton 2.51 lets through)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def infer(self, model, feed, outputs):
        return self.outputs


@pytest.mark.parametrize(
    "returned, message",
    [
        ({"wrong_name": np.zeros((2, 3, 64, 64), np.float32)}, "missing"),
        ({"image": np.zeros((2, 3, 64, 32), np.float32)}, r"vae_decoder\.image: expected"),
        ({"image": np.zeros((2, 3, 64, 64), np.float64)}, r"vae_decoder\.image: expected .* float32"),
    ],
)
def test_client_checks_every_output_against_the_spec(tiny_specs, returned, message):
    from runtime.serving.client import TritonComponent

    component = TritonComponent(tiny_specs["vae_decoder"], WrongOutputs(returned), "refadgen_vae_decoder")
    with pytest.raises(SpecError, match=message):
        component.run({"latent": np.zeros((2, 4, 8, 8), np.float32)})
