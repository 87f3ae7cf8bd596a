"""Specs of the RADM layout pipeline's components (CIKM 2023; see networks/layout/__init__.py for the
architecture and its assumptions).

- `layout_backbone`: ResNet-50 + FPN over the product image at the layout resolution (the
  canvas scaled so its long side is `preset.layout.image_side`), once per request: its four
  feature maps are per-request invariants.
- `layout_head`: the six cascaded relation-aware box heads, every denoising step. It takes the
  noisy boxes in DiffusionDet's scaled (cx, cy, w, h) space and returns the last head's class
  logits and boxes (normalised x0, y0, x1, y1).

The shared `text_encoder` is the RefAdGen one, unchanged; the pipeline pools its output into
one feature per selling point (`text_features`).
"""

from __future__ import annotations

import math

from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, DerivedDim, Dim, DType, Precision, TensorSpec, build_specs
from runtime.specs.shared import text_encoder_spec, timestep_input

LAYOUT_CLASSES = ("logo", "text", "underlay", "embellishment")
FPN_LEVELS = ("p2", "p3", "p4", "p5")
FPN_STRIDES = (4, 8, 16, 32)
IMAGE_MULTIPLE = 32  # the coarsest FPN stride: every level is then an exact fraction of the image
MIN_IMAGE_SIDE = 64

# DiffusionDet's box diffusion, as RADM and PlanNet were trained: the one home of its constants.
BOX_SCALE = 2.0  # signal scale: boxes live in [-2, 2] while diffused
BOX_TRAIN_STEPS = 1000  # training timesteps of the cosine schedule
BBOX_WEIGHTS = (2.0, 2.0, 1.0, 1.0)  # box-delta weights (dx, dy, dw, dh)
SCALE_CLAMP = math.log(100000.0 / 16)  # largest dw, dh before exp (detectron2's default)
POOLER_SAMPLING_RATIO = 2  # RoIAlignV2: 2 x 2 bilinear samples per output cell
CANONICAL_BOX_SIZE = 224  # a box of this side (pixels) is pooled from p4
# The backbone's normalisation, ImageNet RGB on 0..255 (RADM's detectron2 config): the graph takes
# x in [-1, 1] and computes ((x + 1) * 127.5 - mean) / std.
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
# RADM's test-time input (detectron2's defaults, INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST): the canvas
# resized so its short side is 800 and its long side at most 1333, then zero-padded (after the
# normalisation) at the bottom and right to a multiple of 32.
REFERENCE_SHORT_SIDE = 800
REFERENCE_LONG_SIDE = 1333
CANONICAL_LEVEL = 4
NMS_IOU = 0.15  # class-aware NMS of the post-processing (not in any graph)
SCORE_THRESHOLD = 0.25  # sigmoid score a kept box must exceed (not in any graph)


def layout_image_size(preset: Preset, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the backbone input for a canvas: long side `image_side`, the short one
    scaled with it and rounded to a multiple of 32 (at least 64)."""
    side = preset.layout.image_side
    scale = side / max(width, height)

    def fit(n: int) -> int:
        return max(MIN_IMAGE_SIDE, min(side, round(n * scale / IMAGE_MULTIPLE) * IMAGE_MULTIPLE))

    return fit(width), fit(height)


def reference_image_size(preset: Preset, width: int, height: int) -> tuple[int, int]:
    """(width, height) RADM's test-time resize gives a canvas (detectron2's ResizeShortestEdge:
    short side REFERENCE_SHORT_SIDE, long side at most REFERENCE_LONG_SIDE), with the long side
    also at most the largest input the preset's specs allow (`LayoutSize.input_side_max`: sd15's
    1344 holds every reference size; the small presets scale it down). The backbone gets it
    padded up to `padded_image_size`."""
    longest = min(REFERENCE_LONG_SIDE, preset.layout.input_side_max)
    scale = REFERENCE_SHORT_SIDE / min(width, height)
    h, w = height * scale, width * scale
    if max(h, w) > longest:
        h, w = h * longest / max(h, w), w * longest / max(h, w)
    return int(w + 0.5), int(h + 0.5)


def padded_image_size(width: int, height: int) -> tuple[int, int]:
    """Each side up to a multiple of IMAGE_MULTIPLE (and at least MIN_IMAGE_SIDE)."""
    def up(n: int) -> int:
        return max(MIN_IMAGE_SIDE, -(-n // IMAGE_MULTIPLE) * IMAGE_MULTIPLE)

    return up(width), up(height)


def _batch(preset: Preset) -> Dim:
    return Dim("B", 1, 1, preset.max_batch)


def _image_dims(preset: Preset) -> tuple[Dim, Dim]:
    side = preset.layout.input_side_max
    w, h = layout_image_size(preset, preset.default_width, preset.default_height)
    return (
        Dim("img_h", MIN_IMAGE_SIDE, h, side, multiple=IMAGE_MULTIPLE),
        Dim("img_w", MIN_IMAGE_SIDE, w, side, multiple=IMAGE_MULTIPLE),
    )


def feature_shape(level: str) -> tuple[str, str]:
    """Symbolic (h, w) of an FPN level: `feat_h`/`feat_w` at p2, `feat_h_p3`.. below it."""
    if level == "p2":
        return ("feat_h", "feat_w")
    return (f"feat_h_{level}", f"feat_w_{level}")


def _features(preset: Preset, dtype: DType) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(level, dtype, ("B", preset.layout.fpn_channels, *feature_shape(level)), invariant=True,
                   doc=f"FPN level, stride {stride}")
        for level, stride in zip(FPN_LEVELS, FPN_STRIDES)
    )


def layout_backbone_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    derived = tuple(
        DerivedDim(name, ((axis, 1, stride),))
        for level, stride in zip(FPN_LEVELS, FPN_STRIDES)
        for name, axis in zip(feature_shape(level), ("img_h", "img_w"))
    )
    return ComponentSpec(
        name="layout_backbone",
        inputs=(TensorSpec("image", f, ("B", 3, "img_h", "img_w"), invariant=True,
                           doc="RGB in [-1, 1] at the layout resolution; ImageNet mean/std applied inside"),),
        outputs=_features(preset, f),
        dims=(_batch(preset), *_image_dims(preset), *derived),
        doc="ResNet-50 + FPN: product image -> p2..p5. Run once per request.",
    )


def layout_head_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    """The feature maps bind `feat_h`/`feat_w` (p2, a multiple of 8 so p5 is exact); p3..p5 are
    ceil(/2) of the level above, which for backbone outputs is exact."""
    f = precision.float_dtype
    lay = preset.layout
    img_h, img_w = _image_dims(preset)
    stride = FPN_STRIDES[0]
    feature_dims = (
        Dim("feat_h", img_h.min // stride, img_h.opt // stride, img_h.max // stride, multiple=IMAGE_MULTIPLE // stride),
        Dim("feat_w", img_w.min // stride, img_w.opt // stride, img_w.max // stride, multiple=IMAGE_MULTIPLE // stride),
    )
    derived = tuple(
        DerivedDim(name, ((axis, 1, s // stride),))
        for level, s in zip(FPN_LEVELS[1:], FPN_STRIDES[1:])
        for name, axis in zip(feature_shape(level), ("feat_h", "feat_w"))
    )
    return ComponentSpec(
        name="layout_head",
        inputs=(
            TensorSpec("boxes", DType.FLOAT32, ("B", "boxes", 4), value_range=(-BOX_SCALE, BOX_SCALE),
                       doc="noisy boxes, (cx, cy, w, h) in [0, 1] mapped to [-2, 2]; clamped inside"),
            timestep_input(BOX_TRAIN_STEPS),
            *_features(preset, f),
            TensorSpec("text_features", f, ("B", "texts", preset.text.hidden_size), invariant=True,
                       doc="one feature per selling point; padded slots are ignored"),
            TensorSpec("text_mask", DType.FLOAT32, ("B", "texts"), invariant=True, limits=(0.0, 1.0),
                       doc="1 for a real selling point, 0 for padding"),
            TensorSpec("image_size", DType.FLOAT32, ("B", 2), invariant=True,
                       value_range=(MIN_IMAGE_SIDE, lay.image_side), limits=(1.0, float(lay.input_side_max)),
                       doc="(height, width) in pixels of the image within the backbone input (the input "
                           "less its padding): the canvas the boxes are relative to"),
        ),
        outputs=(
            TensorSpec("class_logits", DType.FLOAT32, ("B", "boxes", lay.num_classes),
                       doc=f"last head's logits over {LAYOUT_CLASSES} (sigmoid scores)"),
            TensorSpec("pred_boxes", DType.FLOAT32, ("B", "boxes", 4),
                       doc="last head's boxes, (x0, y0, x1, y1) in canvas units (1 = full side), not clipped"),
        ),
        dims=(
            _batch(preset),
            Dim("boxes", 1, lay.num_boxes, lay.num_boxes),
            Dim("texts", 1, min(4, lay.max_texts), lay.max_texts),
            *feature_dims,
            *derived,
        ),
        constants={
            "box_scale": BOX_SCALE,
            "bbox_weights": list(BBOX_WEIGHTS),
            "scale_clamp": SCALE_CLAMP,
            "pooler": lay.pooler,
            "pooler_sampling_ratio": POOLER_SAMPLING_RATIO,
            "canonical_box_size": CANONICAL_BOX_SIZE,
            "cascade": lay.cascade,
        },
        doc="RADM's six cascaded box heads (VTRAM, GRAM): noisy boxes -> clean boxes and class logits. Every step.",
    )


LAYOUT_COMPONENTS = (text_encoder_spec, layout_backbone_spec, layout_head_spec)


def layout_specs(preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return build_specs(LAYOUT_COMPONENTS, preset, precision)
