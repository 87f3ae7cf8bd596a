"""Box geometry, NMS, box diffusion, selling points, `--layout-fixed` and RADM's post-processing:
the numpy side of the layout and poster pipelines (no networks)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from runtime.diffusion.boxes import (
    FixedBoxes,
    cosine_alphas_cumprod,
    from_scaled,
    sample_boxes,
    time_pairs,
    to_scaled,
)
from runtime.errors import InputError
from runtime.layout.boxes import cxcywh_to_xyxy, iou, nms, to_pixels, xyxy_to_cxcywh
from runtime.layout.elements import Element, FixedBox, check_texts, layout_mask, load_fixed_boxes
from runtime.layout.postprocess import grow_box, move_off_product, select_elements
from runtime.specs.layout import BOX_SCALE


def _iou_scalar(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n):
    xy = rng.uniform(0, 0.8, size=(n, 2))
    wh = rng.uniform(0.05, 0.4, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(12))
def test_nms_matches_brute_force_subset_search(seed):
    """Greedy NMS keeps the unique set S where a box is in S exactly when no higher-priority box
    of S of its class overlaps it above the threshold; find S by trying every subset."""
    rng = np.random.default_rng(seed)
    n = 9
    boxes = _random_boxes(rng, n)
    scores = rng.choice([0.2, 0.5, 0.5, 0.7, 0.9], size=n)  # ties on purpose
    classes = rng.integers(0, 2, size=n)
    threshold = 0.15
    priority = sorted(range(n), key=lambda i: (-scores[i], i))
    rank = {i: r for r, i in enumerate(priority)}

    def consistent(subset):
        for i in range(n):
            blocked = any(
                j in subset and rank[j] < rank[i] and classes[j] == classes[i] and _iou_scalar(boxes[i], boxes[j]) > threshold
                for j in range(n)
            )
            if (i in subset) == blocked:
                return False
        return True

    solutions = [set(s) for r in range(n + 1) for s in itertools.combinations(range(n), r) if consistent(set(s))]
    assert len(solutions) == 1
    kept = nms(boxes, scores, classes, threshold)
    assert set(kept.tolist()) == solutions[0]
    assert [rank[i] for i in kept] == sorted(rank[i] for i in kept)  # highest score first


def test_iou_matches_scalar_reference():
    rng = np.random.default_rng(3)
    a, b = _random_boxes(rng, 5), _random_boxes(rng, 4)
    expected = np.array([[_iou_scalar(x, y) for y in b] for x in a])
    np.testing.assert_allclose(iou(a, b), expected, atol=1e-12)


def test_box_conversions_round_trip():
    rng = np.random.default_rng(0)
    b = _random_boxes(rng, 6)
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, atol=1e-12)
    np.testing.assert_allclose(from_scaled(to_scaled(b)), b, atol=1e-6)
    assert np.abs(to_scaled(np.array([[0.0, 0.0, 1.0, 1.0]]))).max() <= BOX_SCALE


def test_to_pixels_stays_on_canvas_and_at_least_one_pixel():
    px = to_pixels(np.array([[-0.2, 0.5, 0.5, 0.5], [0.9, 0.9, 1.4, 1.2]]), 100, 50)
    assert (px[:, [0, 2]] >= 0).all() and (px[:, [0, 2]] <= 100).all()
    assert (px[:, [1, 3]] >= 0).all() and (px[:, [1, 3]] <= 50).all()
    assert (px[:, 2] > px[:, 0]).all() and (px[:, 3] > px[:, 1]).all()


def test_cosine_schedule_and_time_grid():
    a = cosine_alphas_cumprod()
    assert a.shape == (1000,) and (np.diff(a) < 0).all() and 0 < a[-1] < 1e-3 < a[0] <= 1
    assert time_pairs(1) == [(999, -1)]  # RADM's reference: one DDIM step from t = 999
    assert time_pairs(4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    for bad in (0, 101, 2.0, True):
        with pytest.raises(InputError, match="layout_steps"):
            time_pairs(bad)


def _predict_per_sample(x, t):
    """A deterministic per-sample 'network': each sample's clean boxes depend only on its own x."""
    boxes = np.clip(from_scaled(np.tanh(x) * BOX_SCALE), 0, 1)
    boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]), np.maximum(boxes[..., :2], boxes[..., 2:])], -1)
    logits = np.stack([x.sum(-1), -x.sum(-1), x[..., 0], x[..., 1]], axis=-1)
    return boxes.astype(np.float32), logits.astype(np.float32)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_request_does_not_depend_on_its_batch(steps):
    seeds = [5, 6, 7]
    fixed = FixedBoxes.none(3, 8)
    fixed.mask[1, 0] = True
    fixed.boxes[1, 0] = [0.1, 0.2, 0.5, 0.3]
    gens = lambda: [np.random.Generator(np.random.PCG64(s)) for s in seeds]  # noqa: E731
    together = sample_boxes(_predict_per_sample, gens(), 8, steps, fixed=fixed, renewal=True)
    for b, seed in enumerate(seeds):
        alone_fixed = FixedBoxes(fixed.mask[b : b + 1], fixed.boxes[b : b + 1])
        alone = sample_boxes(_predict_per_sample, [np.random.Generator(np.random.PCG64(seed))], 8, steps,
                             fixed=alone_fixed, renewal=True)
        np.testing.assert_array_equal(alone.boxes[0], together.boxes[b])


def test_sampler_keeps_fixed_boxes_exactly_and_shows_them_to_the_network():
    seen = []

    def predict(x, t):
        seen.append(from_scaled(x[0, 0]))
        return _predict_per_sample(x, t)

    fixed = FixedBoxes.none(1, 4)
    fixed.mask[0, 0] = True
    fixed.boxes[0, 0] = [0.125, 0.25, 0.375, 0.3]
    out = sample_boxes(predict, [np.random.default_rng(0)], 4, 3, fixed=fixed)
    assert out.boxes[0, 0].tolist() == [0.125, 0.25, 0.375, 0.3]
    for box in seen:
        np.testing.assert_allclose(box, fixed.boxes[0, 0], atol=1e-6)


def test_check_texts_rules():
    assert check_texts(["Breathable mesh", "40% off"]) == ("Breathable mesh", "40% off")
    for bad, field in (([], "text"), (["a"] * 21, "text"), ([""], r"text\[0\]"), (["ok", "  "], r"text\[1\]"),
                       (["bad\x07"], r"text\[0\]"), ("just a string", "text"), (["x" * 201], r"text\[0\]")):
        with pytest.raises(InputError, match=field):
            check_texts(bad)


def _write(tmp_path, data, raw=False):
    path = tmp_path / "boxes.json"
    path.write_text(data if raw else json.dumps(data))
    return path


def test_fixed_boxes_parse_and_claim_texts(tmp_path):
    path = _write(tmp_path, [{"class": "text", "box": [10, 10, 60, 30], "text": 1},
                             {"box": [10, 40, 60, 60]}, {"class": "logo", "box": [0, 0, 20, 20]}])
    boxes = load_fixed_boxes(path, 128, 160, ["a", "b", "c"])
    assert [(b.class_name, b.box, b.text) for b in boxes] == [
        ("text", (10, 10, 60, 30), 1), ("text", (10, 40, 60, 60), 0), ("logo", (0, 0, 20, 20), None)]


@pytest.mark.parametrize("data, raw, match", [
    ("{not json", True, "expected JSON"),
    ({"boxes": 3}, False, "list of boxes"),
    ([[1, 2, 3, 4]], False, "expected an object"),
    ([{"box": [0, 0, 10]}], False, r"\[0\]\.box"),
    ([{"box": [0, 0, "a", 5]}], False, "finite numbers"),
    ([{"box": [10, 0, 5, 5]}], False, "x0 < x1"),
    ([{"box": [0, 0, 129, 20]}], False, "inside the 128x160 canvas"),
    ([{"box": [-1, 0, 10, 20]}], False, "inside the 128x160 canvas"),
    ([{"class": "banner", "box": [0, 0, 10, 10]}], False, "expected one of"),
    ([{"box": [0, 0, 10, 10], "colour": "red"}], False, "only the keys"),
    ([{"box": [0, 0, 10, 10], "text": 5}], False, "index of a --text"),
    ([{"box": [0, 0, 10, 10], "text": 0}, {"box": [0, 20, 10, 30], "text": 0}], False, "already held"),
    ([{"box": [0, 0, 10, 10]}, {"box": [0, 20, 10, 30]}, {"box": [0, 40, 10, 50]}], False, "more text boxes"),
    ([{"class": "logo", "box": [0, 0, 10, 10], "text": 0}], False, "only text boxes"),
])
def test_fixed_boxes_bad_input(tmp_path, data, raw, match, bad_input_tally):
    path = _write(tmp_path, data, raw)
    try:
        load_fixed_boxes(path, 128, 160, ["a", "b"])
    except InputError as e:
        outcome = "clear" if e.field.startswith("layout_fixed") else "unexpected"
        bad_input_tally.record("api", f"layout_fixed {match}", outcome, str(e))
        assert outcome == "clear" and __import__("re").search(match, str(e)), str(e)
    else:
        bad_input_tally.record("api", f"layout_fixed {match}", "unexpected", "accepted")
        pytest.fail("accepted")


def test_fixed_boxes_missing_file(tmp_path):
    with pytest.raises(InputError, match="layout_fixed"):
        load_fixed_boxes(tmp_path / "nope.json", 128, 160, ["a"])


def _logits(n, hot):
    """(n, 4) logits: -6 everywhere, `hot` maps slot -> (class, logit)."""
    logits = np.full((n, 4), -6.0)
    for slot, (cls, value) in hot.items():
        logits[slot, cls] = value
    return logits


def test_select_elements_nms_threshold_and_reading_order():
    boxes = np.array([
        [0.1, 0.6, 0.9, 0.7],   # text, lower
        [0.1, 0.1, 0.9, 0.2],   # text, upper
        [0.1, 0.1, 0.9, 0.21],  # duplicate of slot 1, weaker: suppressed by NMS
        [0.0, 0.0, 0.2, 0.1],   # logo
        [0.5, 0.5, 0.6, 0.6],   # below threshold everywhere
    ])
    logits = _logits(5, {0: (1, 3.0), 1: (1, 1.0), 2: (1, 0.5), 3: (0, 2.0)})
    elements, unused = select_elements(boxes, logits, (), 2, 100, 100)
    texts = [e for e in elements if e.class_name == "text"]
    assert [e.text for e in texts] == [0, 1]
    assert texts[0].box == (10, 10, 90, 20) and texts[1].box == (10, 60, 90, 70)  # reading order, not score order
    assert [e.class_name for e in elements if e.class_name != "text"] == ["logo"]
    assert unused == 0 and not any(e.below_threshold for e in texts)


def test_select_elements_fills_texts_below_threshold_when_short():
    boxes = _random_boxes(np.random.default_rng(1), 6)
    logits = _logits(6, {0: (1, 2.0)})
    elements, _ = select_elements(boxes, logits, (), 3, 64, 64)
    texts = [e for e in elements if e.class_name == "text"]
    assert sorted(e.text for e in texts) == [0, 1, 2]
    assert sum(e.below_threshold for e in texts) == 2


def test_select_elements_keeps_fixed_boxes_and_plans_around_them():
    fixed = (FixedBox("text", (10, 10, 90, 20), 0), FixedBox("underlay", (0, 0, 100, 30), None))
    boxes = np.array([
        [0.1, 0.1, 0.9, 0.2], [0.0, 0.0, 1.0, 0.3],  # the fixed slots
        [0.1, 0.1, 0.9, 0.21],  # overlaps the fixed text box: dropped
        [0.1, 0.5, 0.9, 0.6],   # free text box
        [0.05, 0.0, 1.0, 0.3],  # underlay over the fixed underlay: dropped (same class)
    ])
    logits = _logits(5, {2: (1, 4.0), 3: (1, 1.0), 4: (2, 3.0)})
    elements, _ = select_elements(boxes, logits, fixed, 2, 100, 100)
    assert elements[0].box == (10, 10, 90, 20) and elements[0].fixed and elements[0].text == 0
    assert elements[1].box == (0, 0, 100, 30) and elements[1].fixed
    planned = [e for e in elements if not e.fixed]
    assert [(e.class_name, e.box, e.text) for e in planned] == [("text", (10, 50, 90, 60), 1)]


def test_radm_merge_takes_earlier_steps_candidates():
    last = np.array([[0.1, 0.6, 0.9, 0.7], [0.5, 0.5, 0.6, 0.6]])
    first = np.array([[0.0, 0.0, 0.2, 0.1], [0.5, 0.5, 0.6, 0.6]])
    last_logits = _logits(2, {0: (1, 3.0)})
    first_logits = _logits(2, {0: (0, 2.0)})  # a logo only the first step saw
    alone, _ = select_elements(last, last_logits, (), 1, 100, 100)
    merged, _ = select_elements(last, last_logits, (), 1, 100, 100, earlier=[(first, first_logits)])
    assert [e.class_name for e in alone] == ["text"]
    assert sorted(e.class_name for e in merged) == ["logo", "text"]
    assert [e.box for e in merged if e.class_name == "logo"] == [(0, 0, 20, 10)]


def test_radm_drops_candidates_with_no_area_inside_the_canvas():
    boxes = np.array([[0.1, 0.6, 0.9, 0.7], [1.2, 0.1, 1.5, 0.3]])  # the logo lies right of the canvas
    logits = _logits(2, {0: (1, 3.0), 1: (0, 2.0)})
    kept, _ = select_elements(boxes, logits, (), 1, 100, 100)
    dropped, _ = select_elements(boxes, logits, (), 1, 100, 100, drop_empty=True)
    assert [e.box for e in kept if e.class_name == "logo"] == [(99, 10, 100, 30)]  # adgen: one pixel at the edge
    assert [e.class_name for e in dropped] == ["text"]


def test_grow_box_and_layout_mask():
    box, grown = grow_box(np.array([50, 50, 52, 51]), 100, 200)
    assert grown and box[2] - box[0] >= 25 and box[3] - box[1] >= 12
    assert 0 <= box[0] and box[2] <= 100 and 0 <= box[1] and box[3] <= 200
    same, grown = grow_box(np.array([0, 0, 80, 40]), 100, 200)
    assert not grown and same.tolist() == [0, 0, 80, 40]
    mask = layout_mask([Element("text", (10, 20, 30, 25), 1.0, 0), Element("logo", (0, 0, 5, 5), 1.0)], 40, 30)
    assert mask.sum() == 20 * 5 and mask[20:25, 10:30].all() and mask[0, 0] == 0


def test_move_off_product_finds_the_nearest_free_place():
    mask = np.zeros((100, 80), dtype=bool)
    mask[30:70, 20:60] = True
    assert move_off_product((0, 0, 30, 10), mask) == ((0, 0, 30, 10), False)  # already clear
    box, moved = move_off_product((25, 35, 55, 45), mask)  # 30x10 inside the product
    assert moved and box[2] - box[0] == 30 and box[3] - box[1] == 10
    assert not mask[box[1]:box[3], box[0]:box[2]].any()
    assert box == (25, 20, 55, 30)  # straight up: the shortest way out
    full = np.ones((100, 80), dtype=bool)
    box, moved = move_off_product((10, 10, 40, 20), full)  # nowhere is free: stays put
    assert box == (10, 10, 40, 20)
