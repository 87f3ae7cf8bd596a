"""The model repository is generated from the specs (no server needed): the committed one is
exactly what the generator writes, every config parses back through Triton's schema with the
spec's tensors, a config tritonserver would refuse (or that means nothing) fails at generation
with a ConfigError naming model and field, and a pipeline model's request round-trips through
the protocol."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from runtime.errors import ConfigError, InputError, SpecError  # noqa: E402
from runtime.pipelines import PIPELINES, get_pipeline  # noqa: E402
from runtime.presets import PRESETS, get_preset  # noqa: E402
from runtime.serving.admission import Bound  # noqa: E402
from runtime.serving.config_check import check_config  # noqa: E402
from runtime.serving.names import PARAMETER_PREFIX, ConfigKey  # noqa: E402
from runtime.serving.protocol import (  # noqa: E402
    MAX_FILE_BYTES,
    batch_only,
    decode_request,
    encode_request,
    from_wire,
    model_name,
    to_wire,
)
from runtime.serving.repository import (  # noqa: E402
    CONFIG,
    NATIVE_FLAVOURS,
    RepositoryOptions,
    admission_bounds,
    component_config,
    pipeline_config,
    repository_files,
    write_repository,
)
from runtime.serving.resident import ResidentBounds
from runtime.specs.core import ComponentSpec, Dim, DType, TensorSpec  # noqa: E402

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
        assert python.parameters[ConfigKey.SPEC_HASH.value].string_value == spec.spec_hash()
        assert python.HasField("dynamic_batching")
        expected_delay = 1000 if name in definition.step_components else 0
        assert python.dynamic_batching.max_queue_delay_microseconds == expected_delay
        # no queue policy: on 2.51 it stalls calls 0.5 s; the fronts keep the bounds (admission_bounds)
        assert not python.dynamic_batching.HasField("default_queue_policy"), model
        assert _parse(files[f"{model}/configs/onnxruntime.pbtxt"]).platform == "onnxruntime_onnx"
        assert _parse(files[f"{model}/configs/tensorrt.pbtxt"]).platform == "tensorrt_plan"
        for flavour in NATIVE_FLAVOURS:
            assert _parse(files[f"{model}/configs/{flavour}.pbtxt"]).instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    bls = _parse(files[f"{pipeline}/{CONFIG}"])
    assert {i.name for i in bls.input} == set(definition.options)
    assert {i.name for i in bls.input if not i.optional} == set(definition.required)
    assert [o.name for o in bls.output] == ["image", "report", "png"]
    assert not bls.HasField("dynamic_batching")  # nothing to batch, no queue policy to carry


def test_every_served_model_has_an_admission_bound_from_the_options(tiny):
    options = RepositoryOptions(pipeline_instances=3, pipeline_queue_size=5, pipeline_queue_timeout_s=9.0,
                                step_queue_size=40, component_queue_size=7)
    bounds = admission_bounds(tiny, ["refadgen", "layout"], options)
    served = {model for path in repository_files(tiny, ["refadgen", "layout"], options) for model in [path.split("/")[0]]}
    assert set(bounds) == served
    assert bounds["refadgen"] == Bound(3, 5, 9.0)
    assert bounds["refadgen_unet"].concurrency == 40 and bounds["layout_layout_head"].concurrency == 40  # per-step
    assert bounds["refadgen_vae_decoder"] == Bound(7, 0, options.component_queue_timeout_s)


@pytest.mark.parametrize("option, value, model", [
    ("pipeline_queue_size", -1, "refadgen"), ("pipeline_queue_timeout_s", 0.0, "refadgen"),
    ("pipeline_queue_timeout_s", math.nan, "refadgen"), ("pipeline_instances", 0, "refadgen"),
    ("step_queue_size", 0, "refadgen_unet"), ("component_queue_size", 0, "refadgen_text_encoder"),
    ("step_queue_timeout_s", -1.0, "refadgen_unet"),
])
def test_an_admission_bound_that_would_refuse_everything_or_nothing_fails_naming_model_and_option(tiny, option, value, model):
    with pytest.raises(ConfigError, match=rf"{model}.*{option}"):
        admission_bounds(tiny, ["refadgen"], RepositoryOptions(**{option: value}))


def test_python_models_that_take_invariants_keep_them_and_native_platforms_require_every_input(tiny):
    """runtime/serving/resident.py: a Python component model with invariant inputs declares them
    optional (later calls of a request omit them) and its bounds; native flavours keep nothing."""
    definition = get_pipeline("refadgen")
    files = repository_files(tiny, ["refadgen"])
    off = repository_files(tiny, ["refadgen"], RepositoryOptions(resident=None))
    for name, spec in definition.specs(tiny).items():
        model, invariant = model_name("refadgen", name), {t.name for t in spec.inputs if t.invariant}
        for flavour_files, keeps in ((files, bool(invariant)), (off, False)):
            python = _parse(flavour_files[f"{model}/{CONFIG}"])
            assert {i.name for i in python.input if i.optional} == (invariant if keeps else set()), model
            bounds = python.parameters[ConfigKey.RESIDENT.value].string_value
            assert (ResidentBounds.parse(bounds) == RepositoryOptions().resident) if keeps else bounds == "", model
        cuda = _parse(files[f"{model}/configs/python_cuda.pbtxt"])  # the same Python model on the GPU
        assert {i.name for i in cuda.input if i.optional} == invariant, model
        for flavour in ("onnxruntime", "tensorrt"):
            native = _parse(files[f"{model}/configs/{flavour}.pbtxt"])
            assert not any(i.optional for i in native.input), (model, flavour)
    assert {i.name for i in _parse(files[f"refadgen_unet/{CONFIG}"]).input if not i.optional} == {"sample", "timestep"}


def test_step_batching_can_be_switched_off(tiny):
    definition = get_pipeline("refadgen")
    files = repository_files(tiny, ["refadgen"], RepositoryOptions(step_batching=False))
    for name in definition.specs(tiny):
        config = _parse(files[f"{model_name('refadgen', name)}/{CONFIG}"])
        merged = config.parameters[ConfigKey.BATCH_CALLS.value].string_value == "1"
        assert merged == (name not in definition.step_components), name
        assert not config.dynamic_batching.HasField("default_queue_policy"), name


def test_no_config_names_a_folder_of_this_host(tiny, tmp_path):
    """What Triton serves to anyone (configs) holds no path: the run-time folders go to host.json,
    which only the models read."""
    import json

    from runtime.serving.names import HOST_FILE, HostKey

    options = RepositoryOptions(graphs_dir="/opt/graphs", runtime_root="/srv/adgen", weights="/srv/weights",
                                cancel_dir="/tmp/cancel")
    files = repository_files(tiny, ["refadgen"], options)
    configs = [text for path, text in files.items() if path.endswith(".pbtxt")]
    assert configs and not any(folder in text for text in configs for folder in ("/opt/", "/srv/", "/tmp/"))
    assert json.loads(files[f"refadgen_unet/{HOST_FILE}"]) == {  # components: the weights' architecture too
        HostKey.ROOT.value: "/srv/adgen", HostKey.GRAPHS_DIR.value: "/opt/graphs", HostKey.WEIGHTS.value: "/srv/weights"}
    assert json.loads(files[f"refadgen/{HOST_FILE}"]) == {
        HostKey.ROOT.value: "/srv/adgen", HostKey.WEIGHTS.value: "/srv/weights", HostKey.CANCEL_DIR.value: "/tmp/cancel"}
    assert not any(path.endswith(HOST_FILE) for path in repository_files(tiny, ["refadgen"]))  # the committed one


def _probe_spec(inputs=(("x", DType.FLOAT32, ("B", 4)),), outputs=(("y", DType.FLOAT32, ("B", 4)),), batch_max=4):
    """A small batch-leading spec; the arguments make it invalid one way at a time."""
    batch = Dim("B", 1, 1, max(batch_max, 1))
    if batch_max < 1:
        object.__setattr__(batch, "max", batch_max)  # Dim refuses it; a spec built another way might not
    return ComponentSpec("probe", tuple(TensorSpec(*t) for t in inputs), tuple(TensorSpec(*t) for t in outputs), (batch,))


def _from_spec(**spec_kwargs) -> Callable[[], object]:
    def generate():
        return component_config(get_pipeline("refadgen"), _probe_spec(**spec_kwargs), get_preset("tiny"), RepositoryOptions())
    return generate


def _from_options(component: str | None, flavour: str = "python", **options) -> Callable[[], object]:
    """Generate refadgen's `component` config (None: the pipeline model's) with these options."""
    def generate():
        definition, tiny = get_pipeline("refadgen"), get_preset("tiny")
        if component is None:
            return pipeline_config(definition, tiny, RepositoryOptions(**options))
        return component_config(definition, definition.specs(tiny)[component], tiny, RepositoryOptions(**options), flavour)
    return generate


def _mutated(change: Callable[[mc.ModelConfig], None], component: str | None = "unet") -> Callable[[], object]:
    """A valid generated config changed by `change`, then checked: the checker covers any field,
    including ones the generator does not set today."""
    def generate():
        config = _from_options(component)()
        change(config)
        return check_config(config)
    return generate


def _set_reshape(config, shape):
    config.input[0].reshape.shape[:] = shape


def _set_parameter(config, key, value):
    config.parameters[key].string_value = value


THREADS = f"parameters[{ConfigKey.THREADS.value}]"
QUEUE = "dynamic_batching.default_queue_policy"
# case -> (generation that must fail, model named, field named)
INVALID_CONFIGS: dict[str, tuple[Callable[[], object], str, str]] = {
    # invalid specs
    "spec dtype without a Triton type": (_from_spec(inputs=(("x", "bfloat16", ("B", 4)),)), "refadgen_probe", "input[x].data_type"),
    "empty tensor name": (_from_spec(inputs=(("", DType.FLOAT32, ("B", 4)),)), "refadgen_probe", "input[0].name"),
    "duplicate input names": (_from_spec(inputs=(("x", DType.FLOAT32, ("B", 4)), ("x", DType.INT64, ("B", 2)))),
                              "refadgen_probe", "input[x].name"),
    "output named like an input": (_from_spec(outputs=(("x", DType.FLOAT32, ("B", 4)),)), "refadgen_probe", "output[x].name"),
    "dim of 0": (_from_spec(inputs=(("x", DType.FLOAT32, ("B", 0)),)), "refadgen_probe", "input[x].dims"),
    "dim below -1": (_from_spec(outputs=(("y", DType.FLOAT32, ("B", -2)),)), "refadgen_probe", "output[y].dims"),
    "batch-leading spec with batch max < 1": (_from_spec(batch_max=0), "refadgen_probe", "max_batch_size"),
    # invalid RepositoryOptions
    "step queue delay negative": (_from_options("unet", step_queue_delay_us=-5), "refadgen_unet",
                                  "dynamic_batching.max_queue_delay_microseconds"),
    "threads negative": (_from_options("vae_decoder", threads=-1), "refadgen_vae_decoder", THREADS),
    "pipeline instances 0": (_from_options(None, pipeline_instances=0), "refadgen", "instance_group[0].count"),
    "unknown config flavour": (_from_options("unet", flavour="tflite"), "refadgen_unet", "flavour"),
    # rules over the built message, whichever field carries the value
    "reshape with another element count": (_mutated(lambda c: _set_reshape(c, [3])), "refadgen_unet",
                                           "input[sample].reshape.shape"),
    "reshape dim of 0": (_mutated(lambda c: _set_reshape(c, [5, 0, -1])), "refadgen_unet", "input[sample].reshape.shape"),
    "empty reshape in a non-batching model": (_mutated(lambda c: c.output[1].reshape.SetInParent(), None), "refadgen",
                                              "output[report].reshape.shape"),
    "no dims": (_mutated(lambda c: c.output[0].ClearField("dims")), "refadgen_unet", "output[noise_pred].dims"),
    "no data type": (_mutated(lambda c: c.output[0].ClearField("data_type")), "refadgen_unet", "output[noise_pred].data_type"),
    "no model name": (_mutated(lambda c: c.ClearField("name")), "", "name"),
    "neither backend nor platform": (_mutated(lambda c: c.ClearField("backend")), "refadgen_unet", "backend"),
    "platform on another backend": (_mutated(lambda c: setattr(c, "platform", "tensorrt_plan")), "refadgen_unet", "backend"),
    "max batch size negative": (_mutated(lambda c: setattr(c, "max_batch_size", -1)), "refadgen_unet", "max_batch_size"),
    "preferred batch size above max": (_mutated(lambda c: c.dynamic_batching.preferred_batch_size.append(64)), "refadgen_unet",
                                       "dynamic_batching.preferred_batch_size"),
    "no instance group": (_mutated(lambda c: c.ClearField("instance_group")), "refadgen_unet", "instance_group"),
    "CPU instances naming GPUs": (_mutated(lambda c: c.instance_group[0].gpus.append(0)), "refadgen_unet", "instance_group[0].gpus"),
    "priority queue policy unbounded": (_mutated(lambda c: c.dynamic_batching.priority_queue_policy[1].SetInParent()),
                                        "refadgen_unet", "dynamic_batching.priority_queue_policy[1].max_queue_size"),
    "Python model with a queue policy (stalls on 2.51)": (
        _mutated(lambda c: c.dynamic_batching.default_queue_policy.SetInParent(), "vae_decoder"), "refadgen_vae_decoder", QUEUE),
    "batch calls neither 0 nor 1": (_mutated(lambda c: _set_parameter(c, ConfigKey.BATCH_CALLS.value, "yes")), "refadgen_unet",
                                    f"parameters[{ConfigKey.BATCH_CALLS.value}]"),
    "resident bounds that keep nothing": (_mutated(lambda c: _set_parameter(c, ConfigKey.RESIDENT.value, "0,2048,300")),
                                          "refadgen_unet", f"parameters[{ConfigKey.RESIDENT.value}]"),
    "unknown adgen parameter": (_mutated(lambda c: _set_parameter(c, f"{PARAMETER_PREFIX}treads", "2")), "refadgen_unet",
                                f"parameters[{PARAMETER_PREFIX}treads]"),
    "preset parameter unknown": (_mutated(lambda c: _set_parameter(c, ConfigKey.PRESET.value, "huge"), None), "refadgen",
                                 f"parameters[{ConfigKey.PRESET.value}]"),
}


@pytest.mark.parametrize("case", list(INVALID_CONFIGS))
def test_invalid_config_fails_at_generation_naming_model_and_field(case):
    generate, model, field = INVALID_CONFIGS[case]
    with pytest.raises(ConfigError) as raised:
        generate()
    error = raised.value
    assert (error.model, error.field) == (model, field), str(error)
    assert str(error).startswith(f"{model or '(unnamed model)'}.{field}: ") and "(got " in str(error), str(error)


def test_every_generated_config_passes_the_check(tiny):
    """The rules hold for what is committed, in every flavour (generation would have raised), and
    the checker does not only pass: a config it passed still fails once broken."""
    options = RepositoryOptions(step_batching=False)
    for name in PIPELINES:
        definition = get_pipeline(name)
        for spec in definition.specs(tiny).values():
            for flavour in ("python", *NATIVE_FLAVOURS):
                assert check_config(component_config(definition, spec, tiny, options, flavour)).name
        config = pipeline_config(definition, tiny, replace(options, pipeline_instances=1))
        config.instance_group[0].count = 0
        with pytest.raises(ConfigError, match=rf"^{name}\.instance_group\[0\]\.count: must be >= 1 \(got 0\)$"):
            check_config(config)


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

    def infer(self, model, feed, outputs, parameters=None):
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
