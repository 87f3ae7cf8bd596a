"""fp16 export, external data, precision in the cache key, and ONNX Runtime provider selection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from graph_parity import assert_graph_matches_module, assert_parity_report_format

from runtime.artifacts.graphs import MANIFEST, GraphKey, check_manifest, graph_bytes, graph_path
from runtime.artifacts.weights import WeightsSource
from runtime.backends.devices import CPU_EP, CUDA_EP, TENSORRT_EP, Device, resolve_providers
from runtime.errors import BackendError
from runtime.specs.core import DType, Precision
from runtime.specs.refadgen import refadgen_specs

COMPONENTS = ("text_encoder", "image_encoder", "vae_encoder", "reference_unet", "afm_kv", "unet", "vae_decoder")


@pytest.fixture(scope="session")
def tiny_fp16_specs(tiny):
    return refadgen_specs(tiny, Precision.FP16)


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def tiny_fp16_graphs(tiny, tiny_fp16_specs, cache_root, torch):
    """Exported through the CLI (`adgen export --precision fp16`) into the session's cache."""
    from runtime.cli import main

    key = GraphKey.of("refadgen", tiny.name, Precision.FP16, tiny_fp16_specs, WeightsSource(seed=0).fingerprint(tiny.name))
    folder = cache_root / key.dirname
    assert main(["export", "--preset", "tiny", "--precision", "fp16", "--out", str(folder), "--quiet"]) == 0
    return folder


def _key(specs, precision, seed=0):
    return GraphKey.of("refadgen", "tiny", precision, specs, WeightsSource(seed=seed).fingerprint("tiny"))


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_passes_fp16_parity_against_the_fp32_module(tiny_fp16_graphs, tiny_fp16_specs, tiny_modules, component):
    """The fp16 graph (float16 inputs) against the float32 module (the same values widened),
    held to the fp16 tolerance."""
    assert_graph_matches_module(
        graph_path(tiny_fp16_graphs, component), tiny_modules[component], tiny_fp16_specs[component], Precision.FP16
    )


def test_fp16_parity_report_lists_every_component_at_fp16(tiny_fp16_graphs, tiny_fp16_specs):
    assert_parity_report_format(tiny_fp16_graphs, tiny_fp16_specs, Precision.FP16)


def test_fp16_graph_io_dtypes_follow_the_spec(tiny_fp16_graphs, tiny_fp16_specs, onnx):
    model = onnx.load(str(graph_path(tiny_fp16_graphs, "unet")), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    spec = tiny_fp16_specs["unet"]
    assert spec.tensor("timestep").dtype is DType.FLOAT32 and spec.tensor("afm_scale").dtype is DType.FLOAT32
    assert types["timestep"] == onnx.TensorProto.FLOAT and types["afm_scale"] == onnx.TensorProto.FLOAT
    assert types["sample"] == types["ref_key_00"] == types["noise_pred"] == onnx.TensorProto.FLOAT16
    text = onnx.load(str(graph_path(tiny_fp16_graphs, "text_encoder")), load_external_data=False)
    assert text.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_fp16_graph_weights_are_half_and_norms_run_in_float32(tiny_fp16_graphs, onnx):
    from export.graph_passes import FP32_OPS

    model = onnx.load(str(graph_path(tiny_fp16_graphs, "unet")))
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    producers = {out: node for node in model.graph.node for out in node.output}
    norms = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert norms, "the U-Net has GroupNorm/LayerNorm nodes"
    for node in norms:
        source = producers.get(node.input[0])
        cast_to = next((a.i for a in source.attribute if a.name == "to"), None) if source is not None else None
        assert source is not None and source.op_type == "Cast" and cast_to == onnx.TensorProto.FLOAT, node.name


def test_fp16_graph_is_about_half_the_fp32_size(tiny_fp16_graphs, tiny_graphs):
    for name in ("unet", "reference_unet", "text_encoder"):
        ratio = graph_bytes(graph_path(tiny_fp16_graphs, name)) / graph_bytes(graph_path(tiny_graphs, name))
        assert 0.45 < ratio < 0.6, (name, ratio)


def test_precision_changes_spec_hashes_and_cache_key(tiny_specs, tiny_fp16_specs):
    for name in COMPONENTS:
        assert tiny_specs[name].spec_hash() != tiny_fp16_specs[name].spec_hash(), name
        assert tiny_fp16_specs[name].at_float32().spec_hash() == tiny_specs[name].spec_hash(), name
    assert _key(tiny_specs, Precision.FP32).dirname != _key(tiny_fp16_specs, Precision.FP16).dirname


def test_fp32_folder_is_refused_for_fp16_with_the_field_named(tiny_graphs, tiny_fp16_specs):
    with pytest.raises(BackendError, match="precision='fp32', need 'fp16'"):
        check_manifest(tiny_graphs, _key(tiny_fp16_specs, Precision.FP16), tiny_fp16_specs)


def test_pipeline_runs_fp16_graphs_close_to_fp32(tiny_fp16_graphs, tiny_graphs, cache_root, ort_pipeline, product_png):
    from runtime.api import generate, load_pipeline

    fp16 = load_pipeline("refadgen", preset="tiny", backend="onnxruntime", cache_dir=cache_root, precision="fp16")
    options = dict(product=product_png, prompt="a sneaker on a wooden table", steps=3, seed=3)
    a = generate(ort_pipeline, **options).image.astype(np.float64)
    b = generate(fp16, **options).image.astype(np.float64)
    assert generate(fp16, **options).report["precision"] == "fp16"
    assert np.abs(a - b).mean() < 2.0  # uint8 levels, over the whole image (the product is exact in both)


def test_external_data_round_trip_gives_identical_outputs(tmp_path, tiny, tiny_specs, tiny_modules):
    import onnxruntime as ort

    from export.graph_passes import load_graph, save_graph
    from export.onnx_export import write_graph

    spec = tiny_specs["unet"]
    key = _key(tiny_specs, Precision.FP32)
    inline, external = tmp_path / "inline" / "unet.onnx", tmp_path / "external" / "unet.onnx"
    inline.parent.mkdir()
    external.parent.mkdir()
    assert not write_graph(tiny_modules["unet"], spec, inline, key)
    assert write_graph(tiny_modules["unet"], spec, external, key, external_data_threshold=0)
    data = external.with_name("unet.onnx.data")
    assert data.stat().st_size > 0.9 * inline.stat().st_size > 0 and external.stat().st_size < 0.1 * inline.stat().st_size
    assert graph_bytes(external) == external.stat().st_size + data.stat().st_size
    moved = tmp_path / "moved"
    shutil.move(external.parent, moved)  # the data file is found relative to the graph
    feed = spec.sample_inputs(np.random.default_rng(0))
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    np.testing.assert_array_equal(run(inline)[0], run(moved / "unet.onnx")[0])
    reloaded = load_graph(moved / "unet.onnx")
    resaved = tmp_path / "resaved.onnx"
    assert not save_graph(reloaded, resaved)
    np.testing.assert_array_equal(run(inline)[0], run(resaved)[0])


def test_truncated_external_data_is_refused_by_the_manifest(tmp_path, tiny, tiny_specs, tiny_modules):
    from export.onnx_export import export_pipeline

    specs = {"afm_kv": tiny_specs["afm_kv"]}
    key = _key(specs, Precision.FP32)
    folder = export_pipeline(tiny_modules, specs, key, tmp_path / "g", external_data_threshold=0)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["components"]["afm_kv"]["external_data"] is True
    check_manifest(folder, key, specs)
    data = folder / "afm_kv.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BackendError, match="afm_kv.onnx is"):
        check_manifest(folder, key, specs)


def test_spec_casts_float_inputs_only(tiny_fp16_specs):
    spec = tiny_fp16_specs["unet"]
    feed = spec.at_float32().sample_inputs(np.random.default_rng(0))
    cast = spec.cast_inputs(feed)
    assert cast["sample"].dtype == np.float16 and cast["timestep"].dtype == np.float32
    spec.validate_inputs(cast)
    ids = {"input_ids": np.zeros((1, 77), dtype=np.int32)}
    assert tiny_fp16_specs["text_encoder"].cast_inputs(ids)["input_ids"].dtype == np.int32  # left for validation


def test_missing_provider_names_what_is_available():
    with pytest.raises(BackendError, match=r"\['CUDAExecutionProvider'\] not available here \(have \['CPUExecutionProvider'\]\)"):
        resolve_providers(Device.CUDA.providers, [CPU_EP], Precision.FP16)


def test_devices_map_to_providers_with_cpu_last_and_trt_options():
    assert Device.CPU.providers == (CPU_EP,)
    assert Device.CUDA.providers == (CUDA_EP, CPU_EP)
    assert Device.TENSORRT.providers == (TENSORRT_EP, CUDA_EP, CPU_EP)
    resolved = resolve_providers(Device.TENSORRT.providers, [TENSORRT_EP, CUDA_EP, CPU_EP], Precision.FP16)
    assert resolved[0][0] == TENSORRT_EP and resolved[0][1]["trt_fp16_enable"] is True
    assert resolve_providers(Device.TENSORRT.providers, [TENSORRT_EP, CUDA_EP, CPU_EP], Precision.FP32)[0][1]["trt_fp16_enable"] is False
    assert resolved[-1] == CPU_EP


def test_cuda_device_on_a_cpu_only_install_fails_at_load(tiny_graphs, cache_root):
    import onnxruntime as ort

    from runtime.api import load_pipeline

    if CUDA_EP in ort.get_available_providers():
        pytest.skip("this installation has CUDA")
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        load_pipeline("refadgen", preset="tiny", backend="onnxruntime", cache_dir=cache_root, device="cuda")


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_provider(), reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_provider_with_io_binding_matches_cpu(tiny_fp16_graphs, tiny_fp16_specs, tiny):
    from runtime.backends.onnxruntime import OnnxRuntimeComponent

    spec = tiny_fp16_specs["unet"]
    path = graph_path(tiny_fp16_graphs, "unet")
    cpu = OnnxRuntimeComponent(spec, path, Device.CPU.providers, None, precision=Precision.FP16)
    gpu = OnnxRuntimeComponent(spec, path, Device.CUDA.providers, None, precision=Precision.FP16)
    feed = spec.sample_inputs(np.random.default_rng(0))
    a, b = cpu.run(feed)["noise_pred"].astype(np.float32), gpu.run(feed)["noise_pred"].astype(np.float32)
    again = gpu.run(feed)["noise_pred"].astype(np.float32)  # invariant inputs reused on the device
    tol = Precision.FP16.tolerance
    assert np.abs(a - b).max() <= tol.bound(float(np.abs(a).max()))
    np.testing.assert_array_equal(b, again)


def test_fp16_conversion_of_a_value_feeding_several_norms_gives_a_valid_graph(tmp_path, onnx):
    """The resampler's input feeds one LayerNorm per depth; the converter casts it once per consumer."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.graph_passes import to_float16
    from runtime.specs.core import ComponentSpec, Dim, TensorSpec

    c = 8
    weight = numpy_helper_from(np.ones(c, np.float32), "w")
    bias = numpy_helper_from(np.zeros(c, np.float32), "b")
    nodes = [
        helper.make_node("Add", ["x", "x"], ["h"], name="add"),
        helper.make_node("LayerNormalization", ["h", "w", "b"], ["n1"], name="ln1", axis=-1),
        helper.make_node("LayerNormalization", ["h", "w", "b"], ["n2"], name="ln2", axis=-1),
        helper.make_node("Add", ["n1", "n2"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c])], [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    spec = ComponentSpec("two_norms", (TensorSpec("x", DType.FLOAT16, ("B", c)),),
                         (TensorSpec("y", DType.FLOAT16, ("B", c)),), (Dim("B", 1, 1, 4),))
    converted = to_float16(model, spec, tmp_path)
    names = [n.name for n in converted.graph.node]
    assert len(names) == len(set(names))
    x = np.random.default_rng(0).standard_normal((2, c)).astype(np.float16)
    (y,) = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.dtype == np.float16 and np.isfinite(y).all()


def numpy_helper_from(array, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def test_io_binding_path_matches_plain_run_and_uploads_invariants_once(tiny_fp16_graphs, tiny_fp16_specs):
    """The IO-binding path the CUDA provider uses, run with CPU memory here (same calls, no GPU)."""
    from runtime.backends.onnxruntime import OnnxRuntimeComponent

    spec = tiny_fp16_specs["unet"]
    plain = OnnxRuntimeComponent(spec, graph_path(tiny_fp16_graphs, "unet"), Device.CPU.providers, None, precision=Precision.FP16)
    bound = OnnxRuntimeComponent(spec, graph_path(tiny_fp16_graphs, "unet"), Device.CPU.providers, None, precision=Precision.FP16)
    bound.device_type = "cpu"
    feed = spec.sample_inputs(np.random.default_rng(0))
    expected = plain.run(feed)["noise_pred"]
    np.testing.assert_array_equal(bound.run(feed)["noise_pred"], expected)
    held = {name: value for name, (_, value) in bound._on_device.items()}
    assert set(held) == {t.name for t in spec.inputs if t.invariant}
    step2 = dict(feed, sample=feed["sample"] * np.float16(0.5))  # next step: new sample, same invariants
    np.testing.assert_array_equal(bound.run(step2)["noise_pred"], plain.run(step2)["noise_pred"])
    assert all(bound._on_device[name][1] is value for name, value in held.items())
    fresh = {name: feed[name].copy() for name in held}  # next request: new arrays are uploaded again
    bound.run(dict(feed, **fresh))
    assert all(bound._on_device[name][1] is not value for name, value in held.items())


def test_export_frees_each_network_before_converting_its_graph(tmp_path, tiny, tiny_specs, tiny_modules, monkeypatch):
    """A lazy module mapping is released after tracing and the reference outputs, before the
    conversion and the ONNX Runtime session: one full-size network at most in memory."""
    from collections.abc import Mapping

    import export.onnx_export as onnx_export

    events = []

    class Tracked(Mapping):
        def __getitem__(self, name):
            events.append(("get", name))
            return tiny_modules[name]

        def __iter__(self):
            return iter(tiny_modules)

        def __len__(self):
            return len(tiny_modules)

        def release(self):
            events.append(("release", None))

    finish = onnx_export.finish_graph
    monkeypatch.setattr(onnx_export, "finish_graph", lambda *a, **k: (events.append(("finish", None)), finish(*a, **k))[1])
    specs = {name: tiny_specs[name] for name in ("afm_kv", "vae_decoder")}
    onnx_export.export_pipeline(Tracked(), specs, _key(specs, Precision.FP32), tmp_path / "g")
    assert events == [("get", "afm_kv"), ("release", None), ("finish", None),
                      ("get", "vae_decoder"), ("release", None), ("finish", None)]
