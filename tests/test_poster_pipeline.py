"""The poster pipeline (P&R) end to end on tiny: a finished poster with the product's pixels
exact, every selling point typeset inside its planned box, fixed boxes kept, both backends,
once-per-request work, and clear errors."""

from __future__ import annotations

import json

import fixtures
import numpy as np
import pytest
from PIL import Image

from runtime.api import prepare, run
from runtime.cli import main
from runtime.errors import InputError
from runtime.inputs.images import load_product, place_on_canvas

TEXTS = ["Breathable mesh", "40% off"]
STEPS, LAYOUT_STEPS = 3, 4


poster_ort = fixtures.opened("poster")
poster_torch = fixtures.opened("poster", "torch")


def _poster(loaded, product_png, **options):
    options = {"prompt": "studio", "text": TEXTS, "steps": STEPS, "layout_steps": LAYOUT_STEPS, **options}
    return run(loaded, prepare(loaded, product=product_png, **options))


def test_cli_poster_end_to_end(tmp_path, product_png, cache_root, poster_ort):
    out = tmp_path / "poster.png"
    code = main(["generate", "--pipeline", "poster", "--product", str(product_png), "--text", TEXTS[0], "--text", TEXTS[1],
                 "--prompt", "studio", "--steps", str(STEPS), "--layout-steps", str(LAYOUT_STEPS), "--out", str(out),
                 "--cache-dir", str(cache_root), "--quiet"])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    image = np.asarray(Image.open(out).convert("RGB"))
    placed, _ = place_on_canvas(load_product(product_png), report["width"], report["height"])
    assert np.array_equal(image[placed.mask], placed.rgb[placed.mask])  # product pixels exact, text or not
    boxes = {e["text"]: e["box"] for e in report["layout"]["elements"]}
    assert sorted(boxes) == sorted(TEXTS)
    assert [t["text"] for t in report["typeset"]] == TEXTS
    for t in report["typeset"]:
        x0, y0, x1, y1 = boxes[t["text"]]
        ix0, iy0, ix1, iy1 = t["ink_box"]
        assert x0 <= ix0 < ix1 <= x1 and y0 <= iy0 < iy1 <= y1, (t, boxes[t["text"]])
    timings = report["timings_s"]
    assert len(timings["layout_step"]["samples"]) == LAYOUT_STEPS and len(timings["denoise_step"]["samples"]) == STEPS
    once = ("text_encode", "image_encode", "render_cond", "vae_decode", "compose", "typeset")
    loops = timings["layout_step"]["total"] + timings["denoise_step"]["total"]
    assert sum(timings[stage] for stage in once) + loops <= timings["total"]  # stages nest in the total, none twice


def test_text_is_drawn_inside_its_boxes_and_nowhere_else(product_png, poster_ort):
    """The finished poster differs from the composited image only inside the text boxes, never
    on the product, and every box received ink."""
    from runtime.finishing.compose import compose

    request = prepare(poster_ort, product=product_png, prompt="studio", text=TEXTS, steps=STEPS,
                      layout_steps=LAYOUT_STEPS, seed=2).request
    output = poster_ort.runner([request], steps=STEPS)  # the request carries its layout steps
    changed = np.any(output.images[0] != compose(output.generated[0], request.product), axis=-1)
    inside = np.zeros_like(changed)
    for e in output.layouts[0].elements:
        x0, y0, x1, y1 = e.box
        inside[y0:y1, x0:x1] = True
        assert changed[y0:y1, x0:x1].any(), e
    assert not (changed & ~inside).any()
    assert not (changed & request.product.mask).any()


def test_fixed_text_box_is_kept(tmp_path, product_png, poster_ort):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"box": [4, 4, 124, 36], "text": 1}]))
    elements = _poster(poster_ort, product_png, layout_fixed=path).report["layout"]["elements"]
    held = [e for e in elements if e["text"] == TEXTS[1]]
    assert held == [dict(held[0], box=[4, 4, 124, 36], fixed=True)]
    assert [e["fixed"] for e in elements if e["text"] == TEXTS[0]] == [False]


def test_backends_agree(product_png, poster_ort, poster_torch):
    a = _poster(poster_ort, product_png, seed=5)
    b = _poster(poster_torch, product_png, seed=5)
    boxes_a = np.array([e["box"] for e in a.report["layout"]["elements"]])
    boxes_b = np.array([e["box"] for e in b.report["layout"]["elements"]])
    assert np.abs(boxes_a - boxes_b).max() <= 1
    diff = np.abs(a.image.astype(int) - b.image.astype(int))
    assert diff.mean() <= 0.5, diff.mean()  # float rounding in the loops; typesetting identical where boxes are


def test_layout_is_planned_before_the_image_and_runs_once(product_png, poster_ort):
    """The order of the component calls: PlanNet's loop ends before RenderNet encodes its layout,
    RenderNet runs once before the first denoising step, and the decoder runs once after the last."""
    calls = []
    originals = {}
    for name, component in poster_ort.runner.components.items():
        originals[name] = component.run

        def logged(feed, _name=name, _run=component.run):
            calls.append(_name)
            return _run(feed)

        component.run = logged
    try:
        _poster(poster_ort, product_png)
    finally:
        for name, component in poster_ort.runner.components.items():
            component.run = originals[name]
    first = {name: calls.index(name) for name in set(calls)}
    last = {name: len(calls) - 1 - calls[::-1].index(name) for name in set(calls)}
    assert calls.count("plannet") == LAYOUT_STEPS and calls.count("controlnet") == STEPS
    assert calls.count("poster_unet") == STEPS
    assert [calls.count(n) for n in ("render_cond", "image_encoder", "vae_decoder")] == [1, 1, 1]
    assert last["image_encoder"] < first["plannet"]  # PlanNet sees the product's image tokens
    assert last["plannet"] < first["render_cond"] < first["controlnet"]  # planned, then rendered
    assert last["poster_unet"] < first["vae_decoder"] == len(calls) - 1
    steps = calls[first["controlnet"]:last["poster_unet"] + 1]
    assert steps == ["controlnet", "poster_unet"] * STEPS  # each step: ControlNet's residuals, then the U-Net


@pytest.mark.parametrize("options, field", [
    ({"text": [f"p{i}" for i in range(21)]}, "text"),
    ({"text": ["   "]}, "text[0]"),
    ({"control_scale": 9.0}, "control_scale"),
    ({"layout_steps": 1000}, "layout_steps"),
])
def test_bad_requests(product_png, options, field, bad_input_tally):
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    merged = {"prompt": "studio", "text": TEXTS, **options}
    bad_input_tally.expect_refused("api", f"poster {field}", field,
                                   lambda: get_pipeline("poster").prepare(get_preset("tiny"), product=product_png, **merged))


def test_poster_refuses_fixed_boxes_of_other_classes(tmp_path, product_png, bad_input_tally):
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"class": "logo", "box": [0, 0, 20, 20]}]))
    with pytest.raises(InputError, match=r"layout_fixed\[0\]\.class.*expected one of text") as info:
        get_pipeline("poster").prepare(get_preset("tiny"), product=product_png, prompt="s", text=TEXTS, layout_fixed=path)
    bad_input_tally.record("api", "poster fixed logo box", "clear", str(info.value))


def test_text_no_font_can_draw_fails_before_any_model_loads(tmp_path, product_png, monkeypatch, capsys, bad_input_tally):
    """Refused when the request is prepared, not after the whole denoising loop at typesetting."""
    import runtime.api

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that cannot be typeset")

    monkeypatch.setattr(runtime.api, "load_pipeline", no_models)
    undrawable = "Sale \U0010fffd"  # supplementary private use: no font has a glyph for it
    code = main(["generate", "--pipeline", "poster", "--product", str(product_png), "--prompt", "studio",
                 "--text", TEXTS[0], "--text", undrawable, "--out", str(tmp_path / "p.png"), "--quiet"])
    message = capsys.readouterr().err
    assert code == 2 and "no installed font can draw" in message and "\\U0010fffd" in message, message
    assert not (tmp_path / "p.png").exists()
    bad_input_tally.record("cli", "poster text no font covers", "clear", message)
