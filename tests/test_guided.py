"""The fused guided-step graph: its spec derived from the per-step spec, the torch wrapper equal
to the loop's own guidance, ONNX parity, and the pipeline giving the same image either way."""

from __future__ import annotations

import numpy as np
import pytest
from graph_parity import assert_graph_matches_module

from runtime.pipelines import get_pipeline
from runtime.specs.core import DType, Precision
from runtime.specs.guided import GUIDANCE, guided_step_spec

SHARED = ("sample", "timestep", "afm_scale")


@pytest.fixture(scope="module")
def guided_spec(tiny_specs):
    return guided_step_spec(tiny_specs["unet"], SHARED)


def test_guided_spec_takes_requests_once_and_halves_twice(guided_spec, tiny_specs, tiny):
    step = tiny_specs["unet"]
    assert guided_spec.name == "guided_unet"
    assert guided_spec.input_names == (*step.input_names, GUIDANCE)
    assert guided_spec.tensor("sample").shape == ("B", 5, "latent_h", "latent_w")
    assert guided_spec.tensor("text_embeds").shape[0] == "B2" and guided_spec.tensor("ref_value_15").shape[0] == "B2"
    assert guided_spec.tensor(GUIDANCE).dtype is DType.FLOAT32
    assert guided_spec.dim("B").max == tiny.max_batch // 2
    profile = guided_spec.profile()
    assert [s[0] for s in profile["text_embeds"]] == [2 * s[0] for s in profile["sample"]]  # 2B at every bound
    assert guided_spec.spec_hash() != step.spec_hash()
    with pytest.raises(ValueError, match="not inputs of the step"):
        guided_step_spec(step, ("sample", "mask"))


def test_fused_specs_replace_the_step_and_follow_precision(tiny):
    definition = get_pipeline("refadgen")
    fused = definition.fused_specs(tiny, Precision.FP16)
    assert "unet" not in fused and list(fused)[5] == "guided_unet"
    assert fused["guided_unet"].tensor("sample").dtype is DType.FLOAT16
    assert fused["guided_unet"].tensor(GUIDANCE).dtype is DType.FLOAT32


def test_guided_module_equals_two_halves_combined(guided_spec, tiny_specs, tiny_modules):
    from networks.common.guided import GuidedStep
    from networks.common.runner import run_module

    feed = guided_spec.sample_inputs(np.random.default_rng(0), guided_spec.env_at("opt", B=2))
    got = run_module(GuidedStep(tiny_modules["unet"], guided_spec), guided_spec, feed)["noise_pred"]
    step_feed = {n: (np.concatenate([feed[n]] * 2) if n in SHARED else feed[n]) for n in tiny_specs["unet"].input_names}
    eps = run_module(tiny_modules["unet"], tiny_specs["unet"], step_feed)["noise_pred"]
    cond, uncond = eps[:2], eps[2:]
    expected = uncond + feed[GUIDANCE][:, None, None, None] * (cond - uncond)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_guided_graph_passes_parity(tmp_path, guided_spec, tiny_modules):
    from export.onnx_export import export_component
    from networks.common.guided import GuidedStep

    module = GuidedStep(tiny_modules["unet"], guided_spec)
    path = tmp_path / "guided_unet.onnx"
    export_component(module, guided_spec, path, opset=17)
    envs = [guided_spec.env_at("opt"), guided_spec.env_at("min", B=1), guided_spec.env_at("opt", B=3)]
    assert_graph_matches_module(path, module, guided_spec, Precision.FP32, envs=envs)


def test_pipeline_gives_the_same_image_with_the_fused_step(product_png, torch):
    from runtime.api import generate, load_pipeline

    options = dict(product=product_png, prompt="a sneaker on a wooden table", steps=3, seed=5, guidance=6.0)
    plain = load_pipeline("refadgen", preset="tiny", backend="torch")
    fused = load_pipeline("refadgen", preset="tiny", backend="torch", fused_step=True)
    assert "guided_unet" in fused.runner.components and "unet" not in fused.runner.components
    a = generate(plain, **options).image.astype(int)
    b = generate(fused, **options).image.astype(int)
    assert np.abs(a - b).max() <= 1
