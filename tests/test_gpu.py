"""The torch backend on CUDA: float16 against the CPU float32 reference, CUDA-graph replay
against eager, invariant inputs held on the device. The `gpu` tests run where torch sees a CUDA
device (benchmarks/gpu_check.py runs them first); the rest check the refusals anywhere."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import ModelSource
from runtime.backends.devices import Device
from runtime.errors import BackendError
from runtime.presets import get_preset
from runtime.specs.core import Precision
from runtime.specs.guided import guided_name

STEP = guided_name("unet")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")


def _components(device: Device, precision: Precision, cuda_graphs: bool = False, names=(STEP, "vae_decoder")):
    from runtime.backends import load_components
    from runtime.pipelines import get_pipeline

    preset = get_preset("tiny")
    specs = get_pipeline("refadgen").fused_specs(preset, precision)
    source = ModelSource("refadgen", preset, WeightsSource(), precision=precision, device=device, cuda_graphs=cuda_graphs)
    return load_components("torch", {n: specs[n] for n in names}, source, None)


def _feed(component, seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
    spec = component.spec
    return spec.sample_inputs(np.random.default_rng(seed), spec.env_at("opt", **dims))


def test_cuda_graphs_on_the_cpu_are_refused(torch):
    with pytest.raises(BackendError, match="CUDA graphs need --device cuda"):
        _components(Device.CPU, Precision.FP32, cuda_graphs=True)


def test_graphed_module_refuses_a_module_off_cuda(torch):
    from networks.common.runner import GraphedModule

    component = _components(Device.CPU, Precision.FP32, names=("vae_decoder",))["vae_decoder"]
    with pytest.raises(ValueError, match="vae_decoder: CUDA graphs need a module on a CUDA device"):
        GraphedModule(component.module, component.spec)


@pytest.mark.gpu
@needs_cuda
def test_fp16_on_cuda_matches_the_cpu_reference():
    cpu = _components(Device.CPU, Precision.FP32)
    gpu = _components(Device.CUDA, Precision.FP16)
    for name in (STEP, "vae_decoder"):
        feed = _feed(cpu[name], B=1)
        want = cpu[name].run(feed)
        got = gpu[name].run(gpu[name].spec.cast_inputs(feed))
        for key, expected in want.items():
            value = got[key].astype(np.float32)
            assert np.isfinite(value).all(), f"{name}.{key}: non-finite values in float16"
            bound = Precision.FP16.tolerance.bound(float(np.abs(expected).max()))
            assert np.abs(value - expected).max() <= bound, f"{name}.{key}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_matches_eager_across_shapes_and_new_inputs():
    eager = _components(Device.CUDA, Precision.FP32)[STEP]
    graphed = _components(Device.CUDA, Precision.FP32, cuda_graphs=True)[STEP]
    graphed.module.load_state_dict(eager.module.state_dict())
    one, two, again = _feed(eager, 0, B=1), _feed(eager, 1, B=2), _feed(eager, 2, B=1)
    for feed in (one, two, again, one):  # a new shape captures; a known one replays with new values
        want = eager.run(feed)["noise_pred"]
        got = graphed.run(feed)["noise_pred"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert graphed.graphed.captures == 2
    assert len(graphed.graphed.graphs) == 2


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_drop_the_least_recently_used_shape_beyond_the_limit():
    from networks.common.runner import GraphedModule

    eager = _components(Device.CUDA, Precision.FP32, names=("vae_decoder",))["vae_decoder"]
    graphed = GraphedModule(eager.module, eager.spec, limit=1)
    for batch in (1, 2, 1):
        feed = _feed(eager, batch, B=batch)
        np.testing.assert_allclose(graphed(feed)["image"], eager.run(feed)["image"], rtol=1e-5, atol=1e-5)
    assert graphed.captures == 3 and len(graphed.graphs) == 1


@pytest.mark.gpu
@needs_cuda
def test_an_invariant_input_held_on_the_device_follows_a_new_array():
    """Held inputs are keyed by the caller's array object: a new request's keys/values replace them."""
    step = _components(Device.CUDA, Precision.FP32)[STEP]
    feed = _feed(step, 0, B=1)
    first = step.run(feed)["noise_pred"]
    changed = dict(feed, ref_key_00=feed["ref_key_00"] + 1.0)
    assert step.spec.tensor("ref_key_00").invariant
    second = step.run(changed)["noise_pred"]
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(step.run(feed)["noise_pred"], first)


@pytest.mark.gpu
@needs_cuda
def test_a_tiny_request_on_cuda_graphs_gives_the_eager_image(tmp_path):
    from runtime.api import generate, load_pipeline

    images = []
    for graphs in (False, True):
        pipe = load_pipeline("refadgen", "tiny", "torch", device="cuda", precision="fp16", cuda_graphs=graphs,
                             fused_step=True)
        options = {**pipe.definition.example_options(tmp_path, pipe.source.preset), pipe.definition.steps_option: 4}
        images.append(np.asarray(generate(pipe, **options).image, dtype=np.int16))
        pipe.close()
    assert np.abs(images[0] - images[1]).max() <= 1
