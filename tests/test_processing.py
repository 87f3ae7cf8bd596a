"""Processing profiles (runtime/pipelines/processing.py): RefAdGen's reference pre- and
post-processing, each piece against what the reference code's libraries compute, and the
profile end to end on tiny."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.api import prepare, run
from runtime.errors import InputError
from runtime.inputs.images import clip_pixels, load_product, long_side_resized, resize_mask_nearest
from runtime.pipelines import get_pipeline
from runtime.pipelines.processing import REFADGEN, WHITE, Profile
from runtime.presets import get_preset


@pytest.mark.parametrize("h, w", [(300, 200), (150, 417), (224, 224)])
def test_clip_centre_crop_is_transformers_clip_image_processor(h, w):
    pil_processor = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    rgb = np.random.default_rng(h * w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    expected = pil_processor.CLIPImageProcessorPil()(images=Image.fromarray(rgb), return_tensors="np").pixel_values
    np.testing.assert_allclose(clip_pixels(rgb, 224, crop=True), expected, atol=1e-6)


@pytest.mark.parametrize("size", [(80, 64), (20, 16), (33, 47)])
def test_corner_nearest_is_torch_interpolate_nearest(size, torch):
    mask = np.random.default_rng(1).random((517, 389)) > 0.5
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask[None, None].astype(np.float32)), size=size,
                                               mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(resize_mask_nearest(mask, *size, corner=True), expected)


@pytest.mark.parametrize("photo, canvas, expected", [
    ((800, 1000), (512, 640), (512, 640)),  # (w, h): already the canvas's shape
    ((1000, 700), (512, 640), (640, 448)),  # short 700 -> 512: 731 x 512; long 731 -> 640: 640 x 448
    ((333, 1200), (512, 640), (128, 640)),  # 512 x 1845 -> 178 x 640 -> floored to 128 x 640
    ((500, 400), (128, 160), (160, 128)),  # tiny's canvas: multiples of 16
])
def test_long_side_resize_follows_the_reference_arithmetic(photo, canvas, expected):
    rgb = np.zeros((photo[1], photo[0], 3), dtype=np.uint8)
    out = long_side_resized(rgb, *canvas)
    assert (out.shape[1], out.shape[0]) == expected


def test_vae_encoder_gives_the_posterior_mode_and_std(tiny, torch, tiny_modules):
    """The encoder's two outputs are diffusers' DiagonalGaussianDistribution mode and std, x scale."""
    encoder = tiny_modules["vae_encoder"]
    image = torch.rand(2, 3, 160, 128) * 2 - 1
    with torch.inference_mode():
        mode, std = encoder(image)
        dist = encoder.vae.encode(image).latent_dist
    scale = encoder.vae.config.scaling_factor
    torch.testing.assert_close(mode, dist.mode() * scale)
    torch.testing.assert_close(std, dist.std * scale)


def test_reference_profile_end_to_end(ort_pipeline, tmp_path):
    """A product photo of another shape than the canvas: the result comes back at the photo's
    size with its pixels exact (adgen's result is its fitted canvas); the same seed (initial and
    posterior noise) gives the same image."""
    rgba = np.zeros((300, 240, 4), dtype=np.uint8)  # (h, w): not tiny's 128 x 160 canvas shape
    rgba[..., :3] = np.random.default_rng(3).integers(0, 256, size=(300, 240, 3), dtype=np.uint8)
    rgba[60:240, 40:200, 3] = 255
    path = tmp_path / "photo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    photo = load_product(path)
    options = dict(product=path, prompt="a sneaker on a wooden table", steps=2, seed=4)
    reference = run(ort_pipeline, prepare(ort_pipeline, processing="reference", **options))
    again = run(ort_pipeline, prepare(ort_pipeline, processing="reference", **options))
    adgen = run(ort_pipeline, prepare(ort_pipeline, **options))
    assert reference.image.shape == (300, 240, 3)  # back at the photo's size
    assert np.array_equal(reference.image[photo.mask], photo.rgb[photo.mask])
    assert np.array_equal(reference.image, again.image)
    assert adgen.image.shape == (160, 128, 3)  # adgen's result is its canvas: the photo fitted onto tiny's default
    assert reference.report["processing"] == "reference" and adgen.report["processing"] == "adgen"
    assert (reference.report["width"], reference.report["height"]) == (128, 160)  # the preset's canvas
    assert reference.report["product"]["placement"]["stretched"] is True
    assert reference.report["negative_prompt"] == REFADGEN[Profile.REFERENCE].default_negative_prompt


def test_reference_views_are_white_filled_and_stretched(ort_pipeline, product_png):
    prepared = prepare(ort_pipeline, product=product_png, prompt="studio", processing="reference", width=128, height=128)
    r = prepared.request
    clip, vae, mask = ort_pipeline.runner._views(r, 16, 16)
    assert clip.shape == (1, 3, 32, 32) and vae.shape == (1, 3, 128, 128) and mask.shape == (1, 16, 16)
    corner = (vae[0, :, 0, 0] + 1) * 127.5  # the photo's corner is background: filled white
    np.testing.assert_allclose(corner, WHITE, atol=1)
    assert r.processing.prompt("studio").endswith(", best quality, high quality")


def test_unknown_profile_is_refused(product_png, bad_input_tally):
    bad_input_tally.expect_refused("api", "processing unknown", "processing", lambda: get_pipeline("refadgen").prepare(
        get_preset("tiny"), product=product_png, prompt="studio", processing="paper"))


def test_processing_profile_named_in_the_error():
    with pytest.raises(InputError, match="expected one of adgen, reference"):
        Profile.parse("paper")


def test_renewal_threshold_is_per_request():
    from runtime.diffusion.boxes import sample_boxes

    renewed = {}

    def predict(x, t):
        """Clean boxes that follow the noisy ones (so a renewed box changes the result); every box scores 0.3."""
        from runtime.diffusion.boxes import from_scaled

        boxes = np.clip(from_scaled(x), 0, 1)
        boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]), np.maximum(boxes[..., :2], boxes[..., 2:])], -1)
        return boxes.astype(np.float32), np.full(x.shape[:2] + (4,), np.log(0.3 / 0.7), dtype=np.float32)

    def run(thresholds):
        return sample_boxes(predict, [np.random.default_rng(s) for s in (1, 2)], 4, 2, renewal=True,
                            renewal_threshold=thresholds).boxes

    renewed["both"], renewed["mixed"] = run([0.5, 0.5]), run([0.5, 0.25])
    np.testing.assert_array_equal(renewed["both"][0], renewed["mixed"][0])  # 0.3 <= 0.5: renewed in both runs
    assert not np.array_equal(renewed["both"][1], renewed["mixed"][1])  # 0.3 > 0.25: kept, a different walk


def test_layout_reference_profile_end_to_end(open_tiny, product_png):
    layout = open_tiny("layout")
    options = dict(product=product_png, text=["Breathable mesh", "40% off"], layout_steps=3, seed=1)
    reference = run(layout, prepare(layout, processing="reference", **options))
    adgen = run(layout, prepare(layout, **options))
    assert reference.report["processing"] == "reference" and adgen.report["processing"] == "adgen"
    texts = [e for e in reference.report["layout"]["elements"] if e["class"] == "text"]
    assert sorted(e["text"] for e in texts) == sorted(options["text"])


@pytest.mark.parametrize("preset, canvas, size, padded", [
    ("sd15", (513, 750), (800, 1170), (800, 1184)),  # short side to 800
    ("sd15", (500, 1000), (667, 1333), (672, 1344)),  # long side capped at 1333
    ("sd15", (900, 600), (1200, 800), (1216, 800)),
    ("tiny", (128, 160), (102, 128), (128, 128)),  # capped at the preset's largest input
])
def test_radm_reference_input_size_is_detectron2_s_resize_then_padding(preset, canvas, size, padded):
    """ResizeShortestEdge(800, 1333) as detectron2 computes it (int(x + 0.5)), then each side up
    to a multiple of 32."""
    from runtime.presets import get_preset
    from runtime.specs.layout import padded_image_size, reference_image_size

    assert reference_image_size(get_preset(preset), *canvas) == size
    assert padded_image_size(*size) == padded


def test_layout_reference_input_is_padded_with_what_normalises_to_zero(open_tiny, product_png):
    from runtime.pipelines.layout import BACKBONE_PAD
    from runtime.specs.layout import PIXEL_MEAN, PIXEL_STD

    layout = open_tiny("layout")
    request = prepare(layout, processing="reference", product=product_png, text=["40% off"]).request
    runner = layout.runner
    size, padded = runner._input_sizes(request)
    assert (size, padded) == ((102, 128), (128, 128))  # the 128x160 canvas
    image = runner._backbone_images([request], size, padded)
    assert image.shape == (1, 3, 128, 128)
    np.testing.assert_array_equal(image[0, :, :, 102:], np.broadcast_to(BACKBONE_PAD, (3, 128, 26)))
    normalised = ((BACKBONE_PAD[:, 0, 0] + 1) * 127.5 - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    np.testing.assert_allclose(normalised, 0, atol=1e-5)
    adgen = prepare(layout, product=product_png, text=["40% off"]).request
    assert runner._input_sizes(adgen) == ((96, 128),) * 2  # long side image_side, multiples of 32, no padding
