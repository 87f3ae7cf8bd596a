"""TensorRT engine identity on any machine: profiles derived from specs, engine keys, manifests
and their refusals. Building and running engines needs TensorRT and a GPU: those tests are
marked `tensorrt` and skip where `import tensorrt` fails."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime.artifacts.engines import (
    GpuIdentity,
    check_engine,
    engine_keys,
    engine_path,
    find_engine,
    profile_hash,
    profiles,
    select_profile,
    timing_cache_path,
    write_manifest,
)
from runtime.artifacts.graphs import GraphKey
from runtime.artifacts.weights import WeightsSource
from runtime.errors import BackendError, InputError
from runtime.presets import PRESETS, get_preset
from runtime.specs.core import AttentionKernel, Dim, Precision
from runtime.specs.refadgen import refadgen_specs
from runtime.specs.shared import canvas_env

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0), "12.8")


def _graphs(preset="tiny", precision=Precision.FP16, seed=0):
    specs = refadgen_specs(get_preset(preset), precision)
    return specs, GraphKey.of("refadgen", preset, precision, specs, WeightsSource(seed=seed).fingerprint(preset), AttentionKernel.ONNX)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dynamic_profile_bounds_are_the_specs_bounds(preset):
    for spec in refadgen_specs(get_preset(preset), Precision.FP16).values():
        (profile,) = profiles(spec)
        for t in spec.inputs:
            lo, opt, hi = profile[t.name]
            for axis, d in enumerate(t.shape):
                if isinstance(d, int):
                    assert lo[axis] == opt[axis] == hi[axis] == d
                    continue
                dim = spec.dim(d)
                if isinstance(dim, Dim):
                    assert (lo[axis], opt[axis], hi[axis]) == (dim.min, dim.opt, dim.max), (spec.name, t.name, d)
                else:  # derived: the value of its formula at each bound
                    assert (lo[axis], hi[axis]) == (spec.env_at("min")[d], spec.env_at("max")[d]), (spec.name, t.name, d)
        if preset == "tiny":  # feeds at the profile's bounds pass the spec's own validation
            for point in (0, 2):
                feed = {t.name: np.zeros(profile[t.name][point], t.dtype.numpy) for t in spec.inputs}
                spec.validate_inputs(feed)


def test_canvas_profiles_pin_every_spatial_dim_and_free_the_batch():
    preset = get_preset("sd15")
    specs = refadgen_specs(preset, Precision.FP16)
    canvases = [canvas_env(preset, 512, 640), canvas_env(preset, 768, 768)]
    unet = profiles(specs["unet"], canvases)
    assert len(unet) == 2
    assert unet[0]["sample"] == ((1, 5, 80, 64), (2, 5, 80, 64), (preset.max_batch, 5, 80, 64))
    assert unet[1]["sample"][0] == (1, 5, 96, 96)
    assert unet[0]["ref_key_06"] == ((1, 80, 1280), (2, 80, 1280), (preset.max_batch, 80, 1280))  # ceil(80/8) * ceil(64/8)
    afm = profiles(specs["afm_kv"], canvases)  # token counts are its base dims
    assert afm[0]["ref_state_00"][0] == (1, 80 * 64, 320) and afm[0]["ref_state_00"][2][1] == 80 * 64
    vae = profiles(specs["vae_encoder"], canvases)
    assert vae[0]["image"] == ((1, 3, 640, 512), (2, 3, 640, 512), (preset.max_batch, 3, 640, 512))
    assert profiles(specs["text_encoder"], canvases) == profiles(specs["text_encoder"])  # nothing spatial to pin


def test_canvas_outside_the_spec_bounds_is_refused_naming_the_dim():
    preset = get_preset("sd15")
    spec = refadgen_specs(preset)["unet"]
    with pytest.raises(InputError, match=r"sizes: unet: canvas needs latent_h in \[32, 128\]"):
        profiles(spec, [canvas_env(preset, 512, 2048)])
    with pytest.raises(InputError, match="multiples of 8"):
        canvas_env(preset, 500, 640)


def test_select_profile_picks_the_profile_holding_the_shapes():
    preset = get_preset("sd15")
    spec = refadgen_specs(preset)["unet"]
    ps = profiles(spec, [canvas_env(preset, 512, 640), canvas_env(preset, 768, 768)])
    shapes_at = lambda env: {t.name: spec.shape(t, env) for t in spec.inputs}  # noqa: E731
    assert select_profile(ps, shapes_at(spec.env_at("opt", B=4, latent_h=96, latent_w=96))) == 1
    assert select_profile(ps, shapes_at(spec.env_at("opt", B=1, latent_h=80, latent_w=64))) == 0
    with pytest.raises(BackendError, match="no optimization profile holds"):
        select_profile(ps, shapes_at(spec.env_at("opt", B=2, latent_h=64, latent_w=64)))


def test_engine_key_changes_when_any_of_its_inputs_change():
    specs, graphs = _graphs()
    key = engine_keys(specs, graphs, H100, "10.9.0")["unet"][0]
    variants = {
        "gpu_name": engine_keys(specs, graphs, dataclasses.replace(H100, name="NVIDIA A100-SXM4-80GB"), "10.9.0"),
        "compute_capability": engine_keys(specs, graphs, dataclasses.replace(H100, compute_capability=(8, 9)), "10.9.0"),
        "tensorrt": engine_keys(specs, graphs, H100, "10.10.0"),
        "profile_hash": engine_keys(specs, graphs, H100, "10.9.0", [canvas_env(get_preset("tiny"), 128, 160)]),
        "weights": engine_keys(specs, _graphs(seed=1)[1], H100, "10.9.0"),
        "precision": engine_keys(*_graphs(precision=Precision.FP32), H100, "10.9.0"),
        "spec_hash": engine_keys(*_graphs(preset="small"), H100, "10.9.0"),
    }
    filenames = {key.filename}
    for field_name, keys in variants.items():
        other = keys["unet"][0]
        assert getattr(other, field_name) != getattr(key, field_name), field_name
        filenames.add(other.filename)
    assert len(filenames) == len(variants) + 1
    for field_name in ("graphs",):  # a field the readable name omits still changes the file
        assert dataclasses.replace(key, **{field_name: "other"}).filename != key.filename
    assert key.filename.startswith("unet-nvidia-h100-80gb-hbm3-sm90-trt10.9.0-fp16-")


def test_profile_hash_is_order_free_and_shape_sensitive():
    spec = refadgen_specs(get_preset("tiny"))["unet"]
    (p,) = profiles(spec)
    reordered = dict(reversed(list(p.items())))
    assert profile_hash([p]) == profile_hash([reordered])
    widened = dict(p, sample=(p["sample"][0], p["sample"][1], (32, *p["sample"][2][1:])))
    assert profile_hash([p]) != profile_hash([widened])


def test_timing_cache_is_named_per_gpu_cuda_and_tensorrt(tmp_path):
    path = timing_cache_path(tmp_path, H100, "10.9.0")
    assert path.name == "timing-nvidia-h100-80gb-hbm3-sm90-cuda12.8-trt10.9.0.cache"
    assert timing_cache_path(tmp_path, dataclasses.replace(H100, cuda="12.4"), "10.9.0") != path


def _fake_engine(root, key, profile_set):
    path = engine_path(root, key)
    path.write_bytes(b"plan" * 100)
    write_manifest(path, key, profile_set, [], {"build_seconds": 0.0})
    return path


def test_mismatched_engine_is_refused_naming_the_field(tmp_path):
    specs, graphs = _graphs()
    key, profile_set = engine_keys(specs, graphs, H100, "10.9.0")["unet"]
    path = _fake_engine(tmp_path, key, profile_set)
    assert check_engine(path, key)["key"]["gpu_name"] == H100.name
    assert find_engine(tmp_path, key) == path

    a100 = engine_keys(specs, graphs, GpuIdentity("NVIDIA A100-SXM4-80GB", (8, 0), "12.8"), "10.9.0")["unet"][0]
    with pytest.raises(BackendError, match=r"gpu_name='NVIDIA H100 80GB HBM3' \(need 'NVIDIA A100-SXM4-80GB'\)"):
        find_engine(tmp_path, a100)
    with pytest.raises(BackendError, match=r"built for gpu_name='NVIDIA H100 80GB HBM3', need 'NVIDIA A100"):
        check_engine(path, a100)
    newer = engine_keys(specs, graphs, H100, "10.10.0")["unet"][0]
    with pytest.raises(BackendError, match=r"tensorrt='10.9.0' \(need '10.10.0'\)"):
        find_engine(tmp_path, newer)
    other_weights = engine_keys(specs, _graphs(seed=1)[1], H100, "10.9.0")["unet"][0]
    with pytest.raises(BackendError, match=r"weights="):
        find_engine(tmp_path, other_weights)
    with pytest.raises(BackendError, match="no TensorRT engine for vae_decoder"):
        find_engine(tmp_path, engine_keys(specs, graphs, H100, "10.9.0")["vae_decoder"][0])


def test_truncated_engine_or_missing_manifest_is_refused(tmp_path):
    specs, graphs = _graphs()
    key, profile_set = engine_keys(specs, graphs, H100, "10.9.0")["unet"]
    path = _fake_engine(tmp_path, key, profile_set)
    path.write_bytes(b"plan")
    with pytest.raises(BackendError, match="4 bytes, manifest says 400"):
        check_engine(path, key)
    path.with_suffix(".json").unlink()
    with pytest.raises(BackendError, match="no manifest"):
        check_engine(path, key)


def test_manifest_records_profiles_as_built(tmp_path):
    specs, graphs = _graphs()
    key, profile_set = engine_keys(specs, graphs, H100, "10.9.0")["vae_decoder"]
    path = _fake_engine(tmp_path, key, profile_set)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["profiles"][0]["latent"] == [list(s) for s in specs["vae_decoder"].profile()["latent"]]
    assert manifest["key"]["profile_hash"] == profile_hash(profile_set)


def test_engines_command_says_tensorrt_is_missing(tmp_path, capsys):
    from runtime.cli import main

    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here")
    except ImportError:
        pass
    (tmp_path / "manifest.json").write_text(json.dumps({"key": {"preset": "tiny"}}))
    assert main(["engines", "--onnx", str(tmp_path), "--out", str(tmp_path / "e")]) == 1
    assert "needs TensorRT" in capsys.readouterr().err
    assert main(["engines", "--onnx", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert main(["engines", "--onnx", str(tmp_path), "--out", str(tmp_path / "e"), "--sizes", "512by640"]) == 2


@pytest.mark.tensorrt
def test_tensorrt_engines_build_and_match_onnxruntime(tmp_path, tiny, tiny_modules, product_png):
    """Build tiny fp16 engines (portable attention) and run them against ONNX Runtime on CPU."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import onnxruntime as ort

    from export.onnx_export import export_pipeline
    from export.tensorrt_build import build_engines
    from runtime.api import generate, load_pipeline
    from runtime.backends import load_components
    from runtime.backends.base import ModelSource
    from runtime.inputs.images import load_product

    specs, graphs = _graphs()
    onnx_dir = export_pipeline(tiny_modules, specs, graphs, tmp_path / "onnx")
    canvases = [canvas_env(tiny, 128, 160)]
    build_engines(onnx_dir, tmp_path / "engines", lambda p, s, prec: refadgen_specs(get_preset(s), prec), canvases)
    source = ModelSource("refadgen", tiny, WeightsSource(seed=0), precision=Precision.FP16,
                         engines_dir=tmp_path / "engines", cuda_graphs=True)
    engines = load_components("tensorrt", specs, source)
    tol = Precision.FP16.tolerance
    for name, spec in specs.items():
        env = spec.env_at("opt", **{k: v for k, v in canvases[0].items() if k in {d.name for d in spec.dims}})
        feed = spec.sample_inputs(np.random.default_rng(0), env)
        session = ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        expected = dict(zip(spec.output_names, session.run(None, feed)))
        for _ in range(2):  # the second call replays the captured CUDA graph
            got = engines[name].run(feed)
            for out in spec.output_names:
                a, b = got[out].astype(np.float32), expected[out].astype(np.float32)
                assert np.abs(a - b).max() <= tol.bound(float(np.abs(b).max())), (name, out)
    # a pipeline generates an ad on the engines: the canvas size, the product pasted exactly
    pipe = load_pipeline("refadgen", preset="tiny", backend="tensorrt", precision="fp16", engines_dir=tmp_path / "engines")
    result = generate(pipe, product=product_png, prompt="a sneaker on a wooden table", steps=2, seed=0)
    product = load_product(product_png)
    assert result.image.shape == (160, 128, 3) and result.image.dtype == np.uint8
    assert np.array_equal(result.image[product.mask], product.rgb[product.mask])
    assert (result.report["backend"], result.report["precision"]) == ("tensorrt", "fp16")
