"""The P&R poster networks on tiny: ONNX parity of the four new components (also at a second
size and text count), PlanNet's batch independence and padding, the ControlNet residual
contract, RenderNet's locality, SD 1.5 parameter counts and the weights folder round trip."""

from __future__ import annotations

import fixtures
import numpy as np
import pytest
from graph_parity import assert_graph_matches_module, assert_parity_report_format

from runtime.artifacts.graphs import graph_path
from runtime.artifacts.weights import WeightsSource
from runtime.errors import WeightsError
from runtime.presets import get_preset
from runtime.specs.core import Precision
from runtime.specs.poster import control_residual_names, poster_specs
from runtime.specs.shared import skip_residual_layout

NEW = ("plannet", "render_cond", "controlnet", "poster_unet")


@pytest.fixture(scope="module")
def specs(tiny):
    return poster_specs(tiny)


modules = fixtures.networks("poster")
graphs = fixtures.exported("poster", NEW)


def _run(module, *args):
    import torch

    with torch.inference_mode():
        return module(*args)


@pytest.mark.parametrize("component", NEW)
def test_export_passes_fp32_parity(graphs, specs, modules, component):
    assert_graph_matches_module(graph_path(graphs, component), modules[component], specs[component], Precision.FP32)


def test_parity_report_lists_the_new_components(graphs, specs):
    assert_parity_report_format(graphs, {name: specs[name] for name in NEW}, Precision.FP32)


# A size and text count the graphs were neither traced nor checked at during export.
SECOND_ENV = {"plannet": {"B": 3, "texts": 7}, "render_cond": {"B": 1, "height": 72, "width": 200}}
SECOND_LATENT = {"B": 3, "latent_h": 9, "latent_w": 25}


@pytest.mark.parametrize("component", NEW)
def test_graphs_match_torch_at_a_second_size(graphs, specs, modules, component):
    spec = specs[component]
    env = spec.env_at("opt", **SECOND_ENV.get(component, SECOND_LATENT))
    assert_graph_matches_module(graph_path(graphs, component), modules[component], spec, Precision.FP32, envs=[env])


def _plan_inputs(spec, batch, texts, seed):
    import torch

    feed = spec.sample_inputs(np.random.default_rng(seed), spec.env_at("opt", B=batch, texts=texts))
    feed["text_mask"] = np.ones_like(feed["text_mask"])
    return [torch.from_numpy(feed[name]) for name in spec.input_names]


def test_plannet_output_does_not_depend_on_the_rest_of_the_batch(specs, modules):
    plannet = modules["plannet"]
    batch = _plan_inputs(specs["plannet"], 3, 5, seed=0)
    batch[4][1, 3:] = 0.0  # the requests differ in their number of texts too
    together = _run(plannet, *batch)
    for i in range(3):
        alone = _run(plannet, *(x[i : i + 1] for x in batch))
        assert (together[i : i + 1] - alone).abs().max() <= 1e-5, i
    assert (together[0] - together[1]).abs().max() > 1e-3  # different requests, different layouts


def test_plannet_padded_text_slots_do_not_change_the_real_boxes(specs, modules, torch):
    plannet = modules["plannet"]
    layout, timestep, image_tokens, text_features, text_mask = _plan_inputs(specs["plannet"], 1, 2, seed=1)
    real = _run(plannet, layout, timestep, image_tokens, text_features, text_mask)
    for seed in (2, 3):  # two different paddings: garbage boxes and texts in two extra slots
        g = torch.Generator().manual_seed(seed)
        padded = (
            torch.cat([layout, 4 * torch.rand(1, 2, 4, generator=g) - 2], dim=1),
            timestep,
            image_tokens,
            torch.cat([text_features, torch.randn(1, 2, text_features.shape[2], generator=g)], dim=1),
            torch.cat([text_mask, torch.zeros(1, 2)], dim=1),
        )
        out = _run(plannet, *padded)
        assert out.shape == (1, 4, 4)
        assert (out[:, :2] - real).abs().max() <= 1e-5, seed
    swapped = _run(plannet, layout, timestep, image_tokens, text_features.flip(1), text_mask)
    # Which text sits in which slot matters: at random init the effect is small but far above
    # float noise (about 1e-7).
    assert (swapped - real).abs().max() > 1e-4


def test_plannet_predicts_ordered_boxes_in_the_unit_square(specs, modules):
    out = _run(modules["plannet"], *_plan_inputs(specs["plannet"], 4, 20, seed=4))
    x0, y0, x1, y1 = out.unbind(-1)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert bool((x0 <= x1).all()) and bool((y0 <= y1).all())


def test_controlnet_residuals_match_the_spec_and_scale_zero_removes_them(tiny, specs, modules, torch):
    spec = specs["controlnet"]
    env = spec.env_at("opt", latent_h=11, latent_w=16)
    feed = spec.sample_inputs(np.random.default_rng(0), env)
    args = [torch.from_numpy(feed[name]) for name in spec.input_names]
    residuals = _run(modules["controlnet"], *args)
    names = control_residual_names(tiny)
    assert spec.output_names == names and len(residuals) == len(skip_residual_layout(tiny)) == 13
    for name, r in zip(names, residuals):
        assert tuple(r.shape) == spec.shape(name, env), name
        assert r.abs().max() > 0, name  # random init is not ControlNet's all-zero start
    args[-1] = torch.zeros_like(args[-1])
    assert all(bool((r == 0).all()) for r in _run(modules["controlnet"], *args))


def test_poster_unet_takes_exactly_the_controlnet_residuals(tiny, specs):
    controlnet, poster_unet = specs["controlnet"], specs["poster_unet"]
    names = control_residual_names(tiny)
    assert controlnet.output_names == names and len(names) == len(skip_residual_layout(tiny)) == 13
    assert poster_unet.input_names[3:] == names
    assert all(poster_unet.tensor(n).shape == controlnet.tensor(n).shape for n in names)


def test_render_cond_follows_the_layout_mask_locally(specs, modules, torch):
    spec = specs["render_cond"]
    feed = spec.sample_inputs(np.random.default_rng(0), spec.env_at("opt", B=1, height=160, width=128))
    product = torch.from_numpy(feed["product_image"])
    mask = torch.zeros(1, 1, 160, 128)
    mask[..., 16:40, 16:48] = 1.0  # a text box near the top left
    moved = torch.zeros_like(mask)
    moved[..., 120:144, 16:48] = 1.0  # the same box near the bottom
    diff = (_run(modules["render_cond"], moved, product) - _run(modules["render_cond"], mask, product)).abs().amax(dim=1)[0]
    assert diff.shape == (20, 16)
    assert diff[1:6, 1:7].min() > 0 and diff[14:19, 1:7].min() > 0  # changed where the box left and arrived
    assert diff[8:12].max() == 0 and diff[:, 10:].max() == 0  # unchanged far from both


def test_sd15_parameter_counts_match_stable_diffusion_and_controlnet(torch):
    from diffusers import ControlNetModel

    from networks.poster import PosterControlNet, PosterUNet, controlnet_config
    from networks.sd import unet_config

    sd15 = get_preset("sd15")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = PosterUNet(unet_config(sd15, sd15.latent_channels))
        controlnet = PosterControlNet(controlnet_config(sd15))
        reference = ControlNetModel(cross_attention_dim=768)  # lllyasviel's SD 1.5 ControlNets
    assert count(unet) == 859_520_964
    assert count(controlnet) == count(reference) - count(reference.controlnet_cond_embedding) == 360_192_640


def test_weights_folder_round_trip_and_refusals(tiny, modules, tmp_path, torch):
    from safetensors.torch import load_file, save_file

    from networks.registry import build_modules, save_random_weights

    save_random_weights("poster", tiny, 0, tmp_path / "w")
    loaded = build_modules("poster", tiny, WeightsSource(path=tmp_path / "w"))
    assert set(loaded) == set(poster_specs(tiny))
    for name, module in modules.items():
        theirs = loaded[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
    plannet = tmp_path / "w" / "plannet" / "model.safetensors"
    state = load_file(plannet)
    state["extra"] = torch.zeros(1)
    save_file(state, plannet)
    with pytest.raises(WeightsError, match="unexpected"):
        build_modules("poster", tiny, WeightsSource(path=tmp_path / "w"))
    (tmp_path / "w" / "poster.ckpt").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="pickle"):
        build_modules("poster", tiny, WeightsSource(path=tmp_path / "w"))
