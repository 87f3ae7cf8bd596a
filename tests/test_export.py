"""Export: torch vs ONNX parity for every component, dynamic shapes, the manifest-checked cache.

Parity is recomputed here (tests/graph_parity.py), never read back from the exporter's report."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from graph_parity import assert_graph_matches_module, assert_parity_report_format, graph_errors

from runtime.artifacts.graphs import MANIFEST, GraphKey, check_manifest, ensure_graphs, graph_path
from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import ModelSource
from runtime.errors import BackendError
from runtime.specs.core import Precision

COMPONENTS = ("text_encoder", "image_encoder", "vae_encoder", "reference_unet", "afm_kv", "unet", "vae_decoder")


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_passes_fp32_parity(tiny_graphs, tiny_specs, tiny_modules, component):
    errors = assert_graph_matches_module(
        graph_path(tiny_graphs, component), tiny_modules[component], tiny_specs[component], Precision.FP32
    )
    for e in errors:
        assert e.reference_scale <= 1e3, e  # outputs of fp32 size, so the bound stays tight


def test_parity_report_lists_every_component_and_output(tiny_graphs, tiny_specs):
    assert_parity_report_format(tiny_graphs, tiny_specs, Precision.FP32)


def test_graphs_serve_other_batches_and_sizes_than_traced(tiny_graphs, tiny_specs, tiny_modules):
    from export.onnx_export import trace_env

    spec = tiny_specs["unet"]
    traced = trace_env(spec)
    envs = [
        spec.env_at("min", B=1),
        spec.env_at("opt", B=3, latent_h=traced["latent_h"] + 1, latent_w=traced["latent_w"] + 3),
        spec.env_at("max", B=1),
    ]
    assert_graph_matches_module(graph_path(tiny_graphs, "unet"), tiny_modules["unet"], spec, Precision.FP32, envs=envs)


def test_parity_check_detects_a_graph_that_disagrees(tmp_path, tiny_specs, tiny_modules, torch):
    """Both the exporter's check and the tests' own catch a 1% change to one projection."""
    from export.onnx_export import check_parity, export_component

    spec = tiny_specs["afm_kv"]
    path = tmp_path / "afm_kv.onnx"
    export_component(tiny_modules["afm_kv"], spec, path, opset=17)
    drifted = copy.deepcopy(tiny_modules["afm_kv"])
    with torch.no_grad():
        drifted.processors[3].to_v_ref.weight.mul_(1.01)
    assert check_parity(tiny_modules["afm_kv"], spec, path, Precision.FP32).passed
    result = check_parity(drifted, spec, path, Precision.FP32)
    assert not result.passed
    assert result.worst().output == "ref_value_03"
    assert_graph_matches_module(path, tiny_modules["afm_kv"], spec, Precision.FP32)
    failed = {e.output for e in graph_errors(path, drifted, spec, Precision.FP32) if not e.passed}
    assert failed == {"ref_value_03"}


def test_manifest_records_key_spec_hashes_and_versions(tiny_graphs, tiny_specs):
    manifest = json.loads((tiny_graphs / MANIFEST).read_text())
    assert manifest["key"]["preset"] == "tiny" and manifest["key"]["precision"] == "fp32"
    for name, spec in tiny_specs.items():
        assert manifest["components"][name]["spec_hash"] == spec.spec_hash()
        assert manifest["components"][name]["bytes"] == graph_path(tiny_graphs, name).stat().st_size
    from importlib.metadata import version

    for lib in ("torch", "onnx", "onnxruntime"):  # the libraries this export ran with
        assert manifest["versions"][lib] == version(lib), lib


def test_second_load_reuses_the_cache_without_exporting(tiny, tiny_specs, tiny_graphs, cache_root, monkeypatch):
    import export.onnx_export

    def fail(*args, **kwargs):
        raise AssertionError("export ran although the cache holds the graphs")

    monkeypatch.setattr(export.onnx_export, "export_pipeline", fail)
    source = ModelSource("refadgen", tiny, WeightsSource(seed=0), cache_root=cache_root)
    before = (tiny_graphs / MANIFEST).stat().st_mtime_ns
    assert ensure_graphs(tiny_specs, source) == tiny_graphs
    assert (tiny_graphs / MANIFEST).stat().st_mtime_ns == before


def test_cache_key_changes_with_weights_and_specs(tiny, tiny_specs):
    def key(seed, specs):
        return GraphKey.of("refadgen", "tiny", Precision.FP32, specs, WeightsSource(seed=seed).fingerprint("tiny"))

    from runtime.presets import get_preset
    from runtime.specs.refadgen import refadgen_specs

    assert key(0, tiny_specs).dirname != key(1, tiny_specs).dirname
    assert key(0, tiny_specs).dirname != key(0, refadgen_specs(get_preset("small"))).dirname


def test_manifest_mismatch_is_refused_with_the_reason(tiny, tiny_specs, tiny_graphs, tmp_path):
    import shutil

    copy_dir = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, copy_dir)
    good = GraphKey.of("refadgen", "tiny", Precision.FP32, tiny_specs, WeightsSource(seed=0).fingerprint("tiny"))
    check_manifest(copy_dir, good, tiny_specs)

    other_weights = GraphKey.of("refadgen", "tiny", Precision.FP32, tiny_specs, WeightsSource(seed=5).fingerprint("tiny"))
    with pytest.raises(BackendError, match="weights"):
        check_manifest(copy_dir, other_weights, tiny_specs)

    manifest = json.loads((copy_dir / MANIFEST).read_text())
    manifest["components"]["unet"]["spec_hash"] = "0" * 16
    (copy_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="unet spec hash"):
        check_manifest(copy_dir, good, tiny_specs)


def test_truncated_graph_is_refused(tiny, tiny_specs, tiny_graphs, tmp_path):
    import shutil

    copy_dir = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, copy_dir)
    path = graph_path(copy_dir, "vae_decoder")
    path.write_bytes(path.read_bytes()[:1000])
    good = GraphKey.of("refadgen", "tiny", Precision.FP32, tiny_specs, WeightsSource(seed=0).fingerprint("tiny"))
    with pytest.raises(BackendError, match="vae_decoder.onnx is 1000 bytes"):
        check_manifest(copy_dir, good, tiny_specs)


def test_stale_cache_folder_is_replaced_by_a_fresh_export(tiny, tiny_specs, tmp_path, torch):
    source = ModelSource("refadgen", tiny, WeightsSource(seed=0), cache_root=tmp_path)
    key = GraphKey.of("refadgen", "tiny", Precision.FP32, tiny_specs, WeightsSource(seed=0).fingerprint("tiny"))
    stale = tmp_path / key.dirname
    stale.mkdir()
    (stale / MANIFEST).write_text("{not json")
    messages = []
    folder = ensure_graphs(tiny_specs, source, messages.append)
    assert folder == stale
    check_manifest(folder, key, tiny_specs)
    assert any("replacing unusable cache folder" in m for m in messages)


def test_exported_graph_has_no_fixed_spatial_dims(tiny_graphs, tiny_specs):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(graph_path(tiny_graphs, "unet")), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["sample"] == ["B", 5, "latent_h", "latent_w"]
    assert dims["ref_key_06"] == ["B", "tokens_l3", tiny_specs["unet"].tensor("ref_key_06").shape[2]]
    np.testing.assert_equal(len(model.graph.input), len(tiny_specs["unet"].inputs))


@pytest.mark.parametrize("attention", ["ort", "onnx"])
def test_attention_forms_export_the_nodes_they_name_and_pass_parity(attention, tmp_path, tiny_specs, tiny_modules):
    onnx = pytest.importorskip("onnx")
    from export.onnx_export import export_component
    from runtime.specs.core import AttentionKernel

    spec = tiny_specs["unet"]
    path = tmp_path / "unet.onnx"
    export_component(tiny_modules["unet"], spec, path, opset=17, attention=AttentionKernel(attention))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    fused = ops.count("MultiHeadAttention")
    # 16 AFM layers x (own + reference attention) + 16 cross-attentions
    assert fused == (48 if attention == "ort" else 0)
    assert ("Softmax" in ops) == (attention == "onnx")
    assert_graph_matches_module(path, tiny_modules["unet"], spec, Precision.FP32)
