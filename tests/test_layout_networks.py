"""RADM's layout networks on tiny: ONNX parity (at the export's shapes and at a second size),
batch independence, padded texts, RoIAlign against a brute-force reference, the FPN level rule,
and sd15's real ResNet-50."""

from __future__ import annotations

import math

import fixtures
import numpy as np
import pytest
from graph_parity import assert_graph_matches_module

from runtime.artifacts.graphs import graph_path
from runtime.artifacts.weights import WeightsSource
from runtime.presets import get_preset
from runtime.specs.core import Precision
from runtime.specs.layout import FPN_LEVELS, layout_specs

OWN = ("layout_backbone", "layout_head")
RESNET50_TRUNK_PARAMS = 23_508_032  # torchvision resnet50 without fc (BatchNorm weight and bias included)
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def specs(tiny):
    return layout_specs(tiny)


modules = fixtures.networks("layout")
graphs = fixtures.exported("layout", OWN)  # the backbone and head, with the exporter's parity, in the session's cache


def run_module(module, spec, feed):
    """networks.common.runner.run_module, imported at the first call (it needs torch)."""
    from networks.common.runner import run_module

    return run_module(module, spec, feed)


def _features(specs, modules, rng, b, h, w):
    spec = specs["layout_backbone"]
    image = rng.uniform(-1, 1, size=(b, 3, h, w)).astype(np.float32)
    return run_module(modules["layout_backbone"], spec, {"image": image})


def _head_feed(specs, modules, rng, b, h, w, boxes, texts, real=None):
    """A layout_head feed from real backbone features; `real[i]` texts of sample i are real."""
    feed = {
        "boxes": rng.normal(size=(b, boxes, 4)).astype(np.float32).clip(-2, 2),
        "timestep": rng.uniform(0, 999, size=(b,)).astype(np.float32),
        **_features(specs, modules, rng, b, h, w),
    }
    dim = specs["layout_head"].tensor("text_features").shape[-1]
    feed["text_features"] = rng.normal(size=(b, texts, dim)).astype(np.float32)
    real = real if real is not None else [texts] * b
    feed["text_mask"] = np.array([[1.0] * r + [0.0] * (texts - r) for r in real], dtype=np.float32)
    feed["image_size"] = np.array([[h, w]] * b, dtype=np.float32)  # no padding: the whole input
    return feed


def _head(modules, specs, feed):
    return run_module(modules["layout_head"], specs["layout_head"], feed)


def _sample(feed, i, texts=None):
    """Request i of a batched feed alone, its texts cut to `texts` slots."""
    one = {k: v[i:i + 1] for k, v in feed.items()}
    if texts is not None:
        one["text_features"] = one["text_features"][:, :texts]
        one["text_mask"] = one["text_mask"][:, :texts]
    return one


@pytest.mark.parametrize("component", OWN)
def test_layout_graphs_pass_fp32_parity(graphs, specs, modules, component):
    """At opt and at min (batch 1); the head on real backbone features (its `parity_feed`)."""
    assert_graph_matches_module(graph_path(graphs, component), modules[component], specs[component], Precision.FP32)


def test_layout_graphs_match_torch_at_a_second_size(graphs, specs, modules):
    """ONNX Runtime == torch at another size, box and text count, with padded text slots."""
    rng = np.random.default_rng(11)
    b, h, w = 2, 96, 128  # landscape; the trace and the parity cases were portrait or square
    image = {"image": rng.uniform(-1, 1, size=(b, 3, h, w)).astype(np.float32)}
    feed = _head_feed(specs, modules, rng, b, h, w, boxes=7, texts=3, real=[3, 1])
    for name, inputs in (("layout_backbone", image), ("layout_head", feed)):
        assert_graph_matches_module(graph_path(graphs, name), modules[name], specs[name], Precision.FP32, feeds=[inputs])


def test_layout_head_is_batch_independent(specs, modules):
    """Each request of a batch of 3 (own boxes, features, texts, text counts) equals it run alone."""
    rng = np.random.default_rng(3)
    real = [4, 1, 2]
    feed = _head_feed(specs, modules, rng, 3, 64, 96, boxes=9, texts=4, real=real)
    batched = _head(modules, specs, feed)
    for i, count in enumerate(real):
        alone = _head(modules, specs, _sample(feed, i, texts=count))
        for out in batched:
            np.testing.assert_allclose(batched[out][i:i + 1], alone[out], rtol=0, atol=BATCH_ATOL, err_msg=f"{out}[{i}]")


def test_layout_backbone_is_batch_independent(specs, modules):
    rng = np.random.default_rng(4)
    image = rng.uniform(-1, 1, size=(3, 3, 64, 96)).astype(np.float32)
    spec = specs["layout_backbone"]
    batched = run_module(modules["layout_backbone"], spec, {"image": image})
    for i in range(3):
        alone = run_module(modules["layout_backbone"], spec, {"image": image[i:i + 1]})
        for level in FPN_LEVELS:
            np.testing.assert_allclose(batched[level][i:i + 1], alone[level], rtol=0, atol=BATCH_ATOL)


def test_padded_text_features_do_not_change_the_output(specs, modules):
    rng = np.random.default_rng(5)
    feed = _head_feed(specs, modules, rng, 2, 64, 64, boxes=6, texts=5, real=[2, 0])
    before = _head(modules, specs, feed)
    changed = dict(feed)
    changed["text_features"] = feed["text_features"].copy()
    changed["text_features"][0, 2:] = rng.normal(size=changed["text_features"][0, 2:].shape) * 10
    changed["text_features"][1] = rng.normal(size=changed["text_features"][1].shape) * 10
    after = _head(modules, specs, changed)
    for out in before:
        assert np.isfinite(before[out]).all()
        np.testing.assert_array_equal(before[out], after[out])
    # and the real texts do matter, so the test above can fail (one text of two: the same change
    # to every text, or a lone text, is removed by the instance norm over the RoI tokens)
    changed["text_features"][0, 1] = rng.normal(size=changed["text_features"].shape[-1])
    assert np.abs(_head(modules, specs, changed)["class_logits"][0] - before["class_logits"][0]).max() > 1e-4


def _bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """detectron2's ROIAlign bilinear_interpolate on (C, H, W)."""
    c, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * feature[:, y_low, x_low] + hy * lx * feature[:, y_low, x_high]
            + ly * hx * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])


def _roi_align_brute(features, boxes, image_h, image_w, out=7, ratio=2):
    """Per box, per cell, per sample loops: aligned RoIAlign from the box's FPN level."""
    b, n = boxes.shape[:2]
    c = features[0].shape[1]
    result = np.zeros((b, n, c, out, out))
    for i in range(b):
        for j in range(n):
            x0, y0, x1, y1 = boxes[i, j] * [image_w, image_h, image_w, image_h]
            area = (x1 - x0) * (y1 - y0)
            level = min(max(math.floor(4 + math.log2(math.sqrt(area) / 224 + 1e-8)), 2), 5)
            scale = 1.0 / 2**level
            feature = features[level - 2][i].astype(np.float64)
            sx, sy = x0 * scale - 0.5, y0 * scale - 0.5
            bw, bh = (x1 - x0) * scale / out, (y1 - y0) * scale / out
            for ph in range(out):
                for pw in range(out):
                    acc = np.zeros(c)
                    for iy in range(ratio):
                        for ix in range(ratio):
                            y = sy + ph * bh + (iy + 0.5) * bh / ratio
                            x = sx + pw * bw + (ix + 0.5) * bw / ratio
                            acc += _bilinear(feature, y, x)
                    result[i, j, :, ph, pw] = acc / ratio**2
    return result


def test_roi_align_matches_brute_force(torch):
    from networks.layout.head import fpn_levels, roi_align_levels

    rng = np.random.default_rng(6)
    image_h, image_w = 1024, 768  # big enough for every level to be picked
    features = [rng.normal(size=(2, 3, image_h // s, image_w // s)).astype(np.float32) for s in (4, 8, 16, 32)]
    boxes = np.array([
        [[0.1, 0.1, 0.15, 0.12], [0.2, 0.3, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.4, 0.4, 0.4, 0.45]],
        [[-0.05, -0.02, 0.3, 0.2], [0.7, 0.8, 1.04, 1.01], [0.3, 0.1, 0.45, 0.3], [0.9, 0.9, 0.99, 0.99]],
    ], dtype=np.float32)  # partly outside the image, a zero-width box, every level
    levels = fpn_levels(torch.from_numpy(boxes * [image_w, image_h, image_w, image_h]).float())
    assert set(levels.flatten().tolist()) == {2.0, 3.0, 4.0, 5.0}
    got = roi_align_levels([torch.from_numpy(f) for f in features], torch.from_numpy(boxes), 7).numpy()
    expected = _roi_align_brute(features, boxes, image_h, image_w)
    # float32 sample positions (grid_sample normalises them) against float64 loops
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_fpn_level_rule(torch):
    """clamp(floor(4 + log2(sqrt(area) / 224)), 2, 5) on pixel boxes."""
    from networks.layout.head import fpn_levels

    sides = [1, 100, 111, 112, 113, 223, 224, 225, 447, 448, 449, 1000, 5000]
    boxes = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides])
    expected = [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5]
    assert fpn_levels(boxes).tolist() == expected
    assert fpn_levels(torch.tensor([[5.0, 5.0, 5.0, 5.0]])).tolist() == [2]  # empty box: finite, lowest level
    wide = torch.tensor([[0.0, 0.0, 224.0 * 4, 224.0 / 4]])  # sqrt(area) = 224
    assert fpn_levels(wide).tolist() == [4]


def test_sd15_backbone_is_resnet50_fpn(torch):
    from networks.layout.backbone import LayoutBackbone
    from networks.layout.head import LayoutHead

    preset = get_preset("sd15")
    with torch.device("meta"):
        backbone = LayoutBackbone(preset)
        head = LayoutHead(preset)

    def learned(module):  # frozen BN keeps BatchNorm's weight and bias as buffers, beside its statistics
        return sum(v.numel() for k, v in module.state_dict().items() if not k.endswith(("running_mean", "running_var")))

    assert learned(backbone.bottom_up) == RESNET50_TRUNK_PARAMS
    f = preset.layout.fpn_channels
    fpn = sum(c * f + f for c in (256, 512, 1024, 2048)) + 4 * (9 * f * f + f)
    assert learned(backbone) == RESNET50_TRUNK_PARAMS + fpn
    assert len(head.head_series) == 6


def test_layout_weights_folder_round_trip(tiny, modules, tmp_path, torch):
    from safetensors.torch import load_file, save_file

    from networks.registry import build_modules, save_random_weights
    from runtime.errors import WeightsError

    save_random_weights("layout", tiny, 0, tmp_path)
    assert not any(tmp_path.rglob("*num_batches_tracked*"))
    loaded = build_modules("layout", tiny, WeightsSource(path=tmp_path))
    for name in ("layout_backbone", "layout_head"):
        for k, v in modules[name].state_dict().items():
            assert torch.equal(loaded[name].state_dict()[k], v), k
    head = tmp_path / "layout_head" / "model.safetensors"
    state = load_file(head)
    del state[next(iter(state))]
    save_file(state, head)
    with pytest.raises(WeightsError, match="missing"):
        build_modules("layout", tiny, WeightsSource(path=tmp_path))


def test_radm_proposal_frame_scales_x_by_the_height(specs, modules, torch):
    """proposal_frame "hwhw" (RADM's weights): the first head gets the noisy boxes scaled by
    (H, W, H, W), as the reference's (c, w, h) reading of the image shape does, and the clean boxes
    come back divided by it; the heads in between see true pixels. Same weights, non-square canvas."""
    from dataclasses import replace

    from networks.layout.head import LayoutHead
    from runtime.presets import get_preset

    tiny = get_preset("tiny")
    reference = replace(tiny, layout=replace(tiny.layout, proposal_frame="hwhw"))
    ours = modules["layout_head"]
    head = LayoutHead(reference, specs["layout_head"].tensor("text_features").shape[-1]).eval()
    head.load_state_dict(ours.state_dict())
    rng = np.random.default_rng(11)
    h, w = 96, 64
    feed = _head_feed(specs, modules, rng, 1, h, w, 6, 3)
    seen = []
    for module in (ours, head):
        hooks = [stage.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), out[1].clone())))
                 for stage in module.head_series]
        try:
            out = run_module(module, specs["layout_head"], feed)["pred_boxes"]
        finally:
            for hook in hooks:
                hook.remove()
        seen.append(out)
    cascade = len(ours.head_series)
    ours_stages, _, reference_stages, reference_out = seen[:cascade], seen[cascade], seen[cascade + 1:-1], seen[-1]
    x = (np.clip(feed["boxes"], -2, 2) / 2 + 1) / 2
    norm = np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], axis=-1)
    np.testing.assert_allclose(ours_stages[0][0].numpy(), norm * [w, h, w, h], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(reference_stages[0][0].numpy(), norm * [h, w, h, w], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(reference_out, reference_stages[-1][1].numpy() / [h, w, h, w], rtol=1e-5, atol=1e-6)
    assert not np.allclose(reference_out, seen[cascade], atol=1e-3)  # it matters on a non-square canvas


def test_reference_views_follow_radm_s_view_of_texts_and_of_vtram_s_output(torch):
    """reference_views (RADM's weights): RADM/head.py takes the (B, 20, 768) text features as
    `view(B, 768, 20)` and pools VTRAM's (B*N, 49, C) output as `reshape(B*N, C, 49).mean(-1)`.
    Written here as those literal steps around the same module without the views."""
    from networks.layout.head import VTRAM

    torch.manual_seed(0)
    b, n, tokens, c, slots, d = 2, 3, 49, 16, 20, 24
    plain, viewed = VTRAM(c, d, 2, tokens), VTRAM(c, d, 2, tokens, reference_views=True)
    viewed.load_state_dict(plain.state_dict())
    roi, box = torch.randn(b, n, tokens, c), torch.randn(b, n, c)
    texts, mask = torch.randn(b, slots, d), (torch.arange(slots) < 3).float().expand(b, slots)
    captured = []
    hook = plain.project_mm[0].register_forward_hook(lambda m, args, out: captured.append(out))
    with torch.no_grad():
        l = texts.view(b, d, slots)  # the reference's `txt_features.view(N, 768, -1)`: (B, D, L)
        plain(roi, box, l.transpose(1, 2), mask)  # this module reads texts as (B, L, D)
        mm_fea = torch.nn.functional.gelu(captured[0]).reshape(b * n, tokens, c)
        expected = mm_fea.reshape(b * n, c, -1).mean(-1).reshape(b, n, c)
        got = viewed(roi, box, texts, mask)
        hook.remove()
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, plain(roi, box, texts, mask), atol=1e-3)


def test_boxes_are_relative_to_the_image_within_a_padded_input(specs, modules, torch):
    """image_size smaller than the backbone input (RADM's reference pads it): the proposals are
    the noisy boxes times the image's size, and the RoIs still index the padded feature maps."""
    head = modules["layout_head"]
    rng = np.random.default_rng(12)
    feed = _head_feed(specs, modules, rng, 1, 128, 128, 5, 2)
    feed["image_size"] = np.array([[128, 102]], dtype=np.float32)  # (height, width) within 128 x 128
    seen = []
    hook = head.head_series[0].register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    try:
        out = run_module(head, specs["layout_head"], feed)["pred_boxes"]
    finally:
        hook.remove()
    x = (np.clip(feed["boxes"], -2, 2) / 2 + 1) / 2
    norm = np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], axis=-1)
    np.testing.assert_allclose(seen[0].numpy(), norm * [102, 128, 102, 128], rtol=1e-5, atol=1e-4)
    whole = run_module(head, specs["layout_head"], {**feed, "image_size": np.array([[128, 128]], np.float32)})
    assert not np.allclose(out, whole["pred_boxes"], atol=1e-3)
