"""Every request option of `adgen generate`, defined once: its flags and argparse keywords. A
pipeline names the ones it reads in `PipelineDefinition.options`; the CLI and the server's request
tensors (runtime.serving.protocol) derive from this table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "product": (("--product",), dict(type=Path, help="RGBA product image (alpha = mask), or RGB with --mask")),
    "mask": (("--mask",), dict(type=Path, help="product mask (white = product) for an RGB product image")),
    "prompt": (("--prompt",), dict(help="what the background should show")),
    "negative_prompt": (("--negative-prompt",), dict(help="what it should not show")),
    "width": (("--width",), dict(type=int, help="canvas width, multiple of 8 (default: the product's, else the preset's)")),
    "height": (("--height",), dict(type=int, help="canvas height, multiple of 8")),
    "steps": (("--steps",), dict(type=int, help="denoising steps (default: the pipeline's)")),
    "guidance": (("--guidance",), dict(type=float, help="classifier-free guidance scale (default 7.5)")),
    "afm_scale": (("--afm-scale",), dict(type=float, help="RefAdGen: weight of the reference attention (default 1.0)")),
    "seed": (("--seed",), dict(type=int, help="noise seed (default 0); same seed, same image")),
    "scheduler": (("--scheduler",), dict(choices=("ddim", "dpm++"), help="sampler (default ddim)")),
    "category": (("--category",), dict(help="background: product category (runtime/data/categories.json, or --categories)")),
    "categories": (("--categories",), dict(type=Path, help="background: JSON file of more categories {name: {noun, identifier}}")),
    "reference": (("--reference",), dict(type=Path, help="background: reference ad whose layout, colour and style to follow")),
    "reference_mask": (("--reference-mask",), dict(type=Path, help="background: the reference's product mask (white = product)")),
    "style_scale": (("--style-scale",), dict(type=float, help="background: weight of the reference's style (default 1.0)")),
    "text": (("--text",), dict(action="append", help="layout/poster: a selling point to place (repeat, up to 20)")),
    "layout_fixed": (("--layout-fixed",), dict(type=Path, help="layout/poster: JSON boxes kept exactly; the rest is planned around them")),
    "layout_steps": (("--layout-steps",), dict(type=int, help="layout/poster: box-diffusion steps (default: RADM 1, PlanNet 20)")),
    "control_scale": (("--control-scale",), dict(type=float, help="poster: weight of the RenderNet/ControlNet conditioning (default 1.0)")),
    "processing": (("--processing",), dict(choices=("adgen", "reference"),
                                           help="refadgen/layout: pre/post-processing around the networks: adgen's, or the reference "
                                                "code's the trained weights expect (default adgen; see runtime/pipelines/processing.py)")),
    "latents": (("--latents",), dict(type=Path, help="refadgen/background/poster: initial latents (.npy, (C, H/8, W/8)) "
                                                     "in place of the seed's noise, to compare with another implementation")),
}


def add_option_arguments(parser: argparse.ArgumentParser, names: set[str]) -> None:
    for name in sorted(names, key=list(OPTIONS).index):
        flags, kwargs = OPTIONS[name]
        parser.add_argument(*flags, dest=name, **kwargs)
