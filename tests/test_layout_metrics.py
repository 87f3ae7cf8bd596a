import math

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.layout.metrics import METRIC_NAMES, layout_metrics, metrics_for_layouts

CANVAS = (100, 200)  # w, h: 20,000 px, so an element needs >= 20 px to be valid


def test_two_identical_text_boxes_overlap_by_half():
    # One pair with IoU 1, divided by n = 2 elements: Ove = 1 / 2.
    boxes = np.array([[10, 10, 50, 30], [10, 10, 50, 30]])
    assert layout_metrics(boxes, ["text", "text"], CANVAS)["overlap"] == pytest.approx(0.5)


def test_overlap_is_intersection_over_union_per_element():
    # text (0,0,40,20) and logo (20,0,60,20): intersection 20*20 = 400, union 800 + 800 - 400
    # = 1200, IoU 1/3, one pair over 2 elements: 1/6. The underlay on top of both is ignored.
    boxes = np.array([[0, 0, 40, 20], [20, 0, 60, 20], [0, 0, 60, 20]])
    got = layout_metrics(boxes, ["text", "logo", "underlay"], CANVAS)["overlap"]
    assert got == pytest.approx(1 / 6)


def test_perfectly_left_aligned_boxes_have_alignment_zero():
    # Every element shares its left edge with another: nearest gap 0, g(0) = 0.
    boxes = np.array([[10, 10, 60, 30], [10, 50, 90, 70], [10, 100, 40, 140]])
    assert layout_metrics(boxes, ["text", "text", "logo"], CANVAS)["alignment"] == 0.0


def test_misaligned_boxes_cost_g_of_their_nearest_gap():
    # Two boxes: left 0 vs 10 (/100 = 0.1), centres 10 vs 25 (0.15), right 20 vs 40 (0.2),
    # top 0 vs 100 (/200 = 0.5), centre 10 vs 110 (0.5), bottom 20 vs 120 (0.5). Each
    # element's nearest gap is 0.1: Ali = 2 * -log10(0.9).
    boxes = np.array([[0, 0, 20, 20], [10, 100, 40, 120]])
    got = layout_metrics(boxes, ["text", "text"], CANVAS)["alignment"]
    assert got == pytest.approx(-2 * math.log10(0.9))


def test_an_underlay_holding_a_text_box_is_loose_and_strict_one():
    # text (10,10,50,50) lies inside the underlay (0,0,100,100): |u & t| / |t| = 1, contained.
    boxes = np.array([[0, 0, 100, 100], [10, 10, 50, 50]])
    got = layout_metrics(boxes, ["underlay", "text"], CANVAS)
    assert got["underlay_loose"] == 1.0 and got["underlay_strict"] == 1.0


def test_an_underlay_under_half_a_text_box_is_loose_half_strict_zero():
    # text (50,10,150,50) is 100*40 = 4000 px, of which x in [50,100) is on the underlay
    # (0,0,100,100): 50*40 = 2000, share 0.5; not contained. (The canvas is widened so the
    # text box is not clipped.)
    boxes = np.array([[0, 0, 100, 100], [50, 10, 150, 50]])
    got = layout_metrics(boxes, ["underlay", "text"], (200, 200))
    assert got["underlay_loose"] == pytest.approx(0.5) and got["underlay_strict"] == 0.0


def test_the_right_edge_counts_for_strict_containment():
    # The text sticks out of the underlay's right edge only (PosterLayout's released
    # is_contain never looked at it).
    boxes = np.array([[0, 0, 50, 100], [10, 10, 60, 50]])
    assert layout_metrics(boxes, ["underlay", "text"], CANVAS)["underlay_strict"] == 0.0


def test_an_element_entirely_on_the_product_occludes_fully():
    mask = np.zeros((200, 100), dtype=bool)
    mask[50:150, 20:80] = True
    boxes = np.array([[30, 60, 70, 100]])  # inside the product
    got = layout_metrics(boxes, ["text"], CANVAS, mask)
    assert got["occlusion"] == 1.0 and got["utility"] == 0.0


def test_utility_is_the_covered_share_of_the_free_canvas():
    # Product: the bottom half (10,000 px). The element covers the top quarter, 100*50 = 5000
    # px of the 10,000 free ones: Uti = 0.5, and it touches no product: Occ = 0.
    mask = np.zeros((200, 100), dtype=bool)
    mask[100:] = True
    got = layout_metrics(np.array([[0, 0, 100, 50]]), ["text"], CANVAS, mask)
    assert got["utility"] == pytest.approx(0.5) and got["occlusion"] == 0.0


def test_a_tiny_element_lowers_validity_and_is_left_out():
    # 4x4 = 16 px < 0.1% of 20,000 = 20 px: invalid. The tiny text sits on the big one but,
    # being invalid, adds no overlap.
    boxes = np.array([[0, 0, 50, 50], [0, 0, 4, 4]])
    got = layout_metrics(boxes, ["text", "text"], CANVAS)
    assert got["validity"] == 0.5 and got["overlap"] == 0.0


def test_the_empty_layout_has_defined_values():
    got = layout_metrics(np.zeros((0, 4)), [], CANVAS)
    assert set(got) == set(METRIC_NAMES)
    assert all(v == 0.0 for v in got.values())


def test_no_nan_on_degenerate_layouts():
    boxes = np.array([[0, 0, 0, 0], [10, 10, 10, 80], [0, 0, 100, 200]])
    mask = np.ones((200, 100), dtype=bool)  # the product fills the canvas: no free area
    got = layout_metrics(boxes, ["underlay", "text", "logo"], CANVAS, mask)
    assert all(math.isfinite(v) for v in got.values())


def test_several_layouts_pool_validity_and_average_underlays_over_layouts_with_one():
    # Layout A: a valid text inside a valid underlay (Und 1). Layout B: one valid text and two
    # tiny ones, no underlay. Validity pools elements: 3 valid of 5 = 0.6 (the per-layout
    # mean would be (1 + 1/3) / 2 = 0.667). Und averages over A alone: 1. Occ/Uti average per layout.
    a = (np.array([[0, 0, 100, 100], [10, 10, 50, 50]]), ["underlay", "text"])
    b = (np.array([[0, 0, 100, 100], [0, 0, 2, 2], [5, 5, 7, 7]]), ["text", "text", "logo"])
    got = metrics_for_layouts([a, b], CANVAS)
    assert got["validity"] == pytest.approx(0.6)
    assert got["underlay_loose"] == 1.0 and got["underlay_strict"] == 1.0
    # Both cover the top half (100*100 of 20,000 px) with no product: Uti 0.5 each.
    assert got["utility"] == pytest.approx(0.5)


def test_boxes_outside_the_canvas_are_clipped():
    # (-50, -50, 50, 50) clipped to (0, 0, 50, 50): 2500 of the 20,000 px free canvas.
    got = layout_metrics(np.array([[-50, -50, 50, 50]]), ["text"], CANVAS)
    assert got["utility"] == pytest.approx(2500 / 20000)


@pytest.mark.parametrize(
    ("boxes", "classes", "canvas", "field"),
    [
        (np.zeros((2, 3)), ["text", "text"], CANVAS, "boxes"),
        (np.array([[10, 10, 5, 20]]), ["text"], CANVAS, "boxes"),
        (np.array([[0, 0, np.nan, 20]]), ["text"], CANVAS, "boxes"),
        (np.array([[0, 0, 10, 20]]), ["text", "logo"], CANVAS, "classes"),
        (np.array([[0, 0, 10, 20]]), ["headline"], CANVAS, "classes"),
        (np.array([[0, 0, 10, 20]]), ["text"], (0, 100), "canvas"),
    ],
)
def test_bad_layouts_raise_input_error(boxes, classes, canvas, field):
    with pytest.raises(InputError) as err:
        layout_metrics(boxes, classes, canvas)
    assert err.value.field == field


def test_a_mask_of_the_wrong_shape_is_rejected():
    with pytest.raises(InputError) as err:
        layout_metrics(np.array([[0, 0, 10, 20]]), ["text"], CANVAS, np.zeros((100, 200), dtype=bool))
    assert err.value.field == "product_mask"
