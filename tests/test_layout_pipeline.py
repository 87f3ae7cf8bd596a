"""The layout pipeline (RADM) end to end on tiny: the CLI's picture and report, both backends,
batch independence, fixed boxes kept exactly, and clear errors for bad requests."""

from __future__ import annotations

import json

import fixtures
import numpy as np
import pytest
from PIL import Image

from runtime.api import prepare
from runtime.cli import main
from runtime.errors import InputError
from runtime.layout.boxes import iou
from runtime.layout.elements import LAYOUT_CLASSES

TEXTS = ["Breathable mesh", "40% off"]


layout_ort = fixtures.opened("layout")
layout_torch = fixtures.opened("layout", "torch")


def _elements(result):
    return result.report["layout"]["elements"]


def test_cli_writes_picture_and_boxes_per_text(tmp_path, product_png, cache_root, layout_ort):
    out = tmp_path / "layout.png"
    code = main(["generate", "--pipeline", "layout", "--product", str(product_png), "--text", TEXTS[0],
                 "--text", TEXTS[1], "--out", str(out), "--cache-dir", str(cache_root), "--quiet"])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert Image.open(out).size == (report["width"], report["height"])
    elements = report["layout"]["elements"]
    assert sorted(e["text"] for e in elements if e["class"] == "text") == sorted(TEXTS)
    for e in elements:
        x0, y0, x1, y1 = e["box"]
        assert e["class"] in LAYOUT_CLASSES and 0 <= x0 < x1 <= report["width"] and 0 <= y0 < y1 <= report["height"]
        assert 0.0 <= e["score"] <= 1.0
    assert set(report["layout"]["metrics"]) >= {"validity", "overlap", "alignment", "occlusion", "utility"}
    assert report["layout_steps"] == 1 and len(report["timings_s"]["layout_step"]["samples"]) == 1


def test_more_steps_run_more_head_calls(product_png, layout_ort):
    from runtime.api import run

    result = run(layout_ort, prepare(layout_ort, product=product_png, text=TEXTS, layout_steps=3))
    assert len(result.report["timings_s"]["layout_step"]["samples"]) == 3


def test_backends_agree(product_png, layout_ort, layout_torch):
    from runtime.api import run

    a = _elements(run(layout_ort, prepare(layout_ort, product=product_png, text=TEXTS, seed=3)))
    b = _elements(run(layout_torch, prepare(layout_torch, product=product_png, text=TEXTS, seed=3)))
    assert [(e["class"], e["text"]) for e in a] == [(e["class"], e["text"]) for e in b]
    # the same boxes up to float rounding: at most one pixel apart after rounding to pixels
    assert np.abs(np.array([e["box"] for e in a]) - np.array([e["box"] for e in b])).max() <= 1


def test_a_request_does_not_depend_on_its_batch(product_png, layout_ort):
    d = layout_ort.definition
    requests = [
        prepare(layout_ort, product=product_png, text=["One"], seed=1),
        prepare(layout_ort, product=product_png, text=["Two", "texts here", "and a third"], seed=2),
        prepare(layout_ort, product=product_png, text=TEXTS, seed=3),
    ]
    together = d.run_batch(layout_ort.runner, requests)
    for p, batched in zip(requests, together):
        alone = d.run_batch(layout_ort.runner, [p])[0]
        assert _elements(alone) == _elements(batched)


def test_fixed_boxes_come_out_exactly(tmp_path, product_png, layout_ort):
    from runtime.api import run

    fixed = [{"class": "text", "box": [8, 6, 120, 30], "text": 1}, {"class": "logo", "box": [4.5, 130, 40, 156]}]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(fixed))
    elements = _elements(run(layout_ort, prepare(layout_ort, product=product_png, text=TEXTS, layout_fixed=path)))
    assert [(e["class"], e["box"], e["text"], e["fixed"]) for e in elements[:2]] == [
        ("text", [8, 6, 120, 30], TEXTS[1], True), ("logo", [4.5, 130, 40, 156], None, True)]
    planned = [e for e in elements if not e["fixed"]]
    assert [e["text"] for e in planned if e["class"] == "text"] == [TEXTS[0]]
    fixed_boxes = np.array([f["box"] for f in fixed], dtype=float)
    for e in planned:
        if e["class"] in ("text", "logo"):
            assert iou(np.array([e["box"]], dtype=float), fixed_boxes).max() <= 0.15


@pytest.mark.parametrize("options, field", [
    ({"text": [f"point {i}" for i in range(21)]}, "text"),
    ({"text": ["fine", ""]}, "text[1]"),
    ({"text": []}, "text"),
    ({"text": "not a list"}, "text"),
    ({"text": TEXTS, "layout_steps": 0}, "layout_steps"),
    ({"text": TEXTS, "seed": -1}, "seed"),
])
def test_bad_requests_fail_before_any_model(product_png, options, field, bad_input_tally):
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    bad_input_tally.expect_refused("api", f"layout {field}", field,
                                   lambda: get_pipeline("layout").prepare(get_preset("tiny"), product=product_png, **options))


def test_cli_bad_layout_fixed_is_one_line(tmp_path, product_png, capsys, bad_input_tally):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"box": [0, 0, 500, 20]}]')
    code = main(["generate", "--pipeline", "layout", "--product", str(product_png), "--text", "A",
                 "--layout-fixed", str(bad), "--out", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    ok = code == 2 and len(err) == 1 and "layout_fixed[0].box" in err[0] and "inside the 128x160 canvas" in err[0]
    bad_input_tally.record("cli", "layout_fixed box outside the canvas", "clear" if ok else "unexpected", str(err))
    assert ok, (code, err)


def test_selling_points_travel_to_a_server_as_one_bytes_tensor(product_png, tmp_path):
    from runtime.pipelines import get_pipeline
    from runtime.serving.protocol import MAX_TEXTS, OptionKind, decode_request, encode_request, request_tensors

    definition = get_pipeline("layout")
    assert {t.name: t.kind for t in request_tensors(definition)}["text"] is OptionKind.TEXTS
    feed = encode_request(definition, {"product": product_png, "text": ["Breathable mesh", "40% off", "新品"]})
    assert feed["text"].shape == (3,) and feed["text"].dtype == object
    options = decode_request(definition, feed, tmp_path)
    assert options["text"] == ["Breathable mesh", "40% off", "新品"]
    with pytest.raises(InputError, match="^text: expected a tensor of shape"):
        decode_request(definition, {**feed, "text": np.array([b"x"] * (MAX_TEXTS + 1), dtype=object)}, tmp_path)
    with pytest.raises(InputError, match="^text: expected UTF-8"):
        decode_request(definition, {**feed, "text": np.array([b"\xff"], dtype=object)}, tmp_path)
    with pytest.raises(InputError, match="^text: expected a non-empty list"):
        encode_request(definition, {"product": product_png, "text": "one string"})
