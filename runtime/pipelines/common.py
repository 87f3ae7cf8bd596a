"""What every diffusion pipeline's loop and request checks share: one definition of each rule,
so the pipelines cannot drift apart on what a valid seed, step count or batch is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np

from runtime.backends.base import Component
from runtime.diffusion.schedulers import make_scheduler
from runtime.errors import InputError
from runtime.inputs.images import (
    GREY,
    MAX_IMAGE_PIXELS,
    Placement,
    Product,
    check_canvas_size,
    load_product,
    place_on_canvas,
)
from runtime.presets import Preset

MAX_STEPS = 500


@dataclass
class PipelineOutput:
    images: list[np.ndarray]  # (H, W, 3) uint8, product composited
    generated: list[np.ndarray]  # (H, W, 3) uint8, the decoder's output before compositing
    timings: dict[str, object]


class BatchedRequest(Protocol):
    product: Product

    def validate(self) -> None: ...


def require_components(components: Mapping[str, Component], needed: Sequence[str], pipeline: str) -> None:
    missing = [c for c in needed if c not in components]
    if missing:
        raise InputError("components", f"the {pipeline} pipeline needs {list(needed)}", f"missing {missing}")


def run_cast(component: Component, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with float inputs in the dtypes the component's spec declares (float16 graphs)."""
    return component.run(component.spec.cast_inputs(feed))


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise InputError("steps", f"expected an integer in [1, {MAX_STEPS}]", steps)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InputError("seed", "expected an integer in [0, 2**63)", seed)


def check_range(field: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= float(value) <= high:
        raise InputError(field, f"expected a number in [{low}, {high}]", value)


def check_batch(requests: Sequence[BatchedRequest], steps: int, preset: Preset) -> None:
    """One canvas size per batch, at most max_batch / 2 requests (guidance doubles the batch)."""
    if not requests:
        raise InputError("requests", "expected at least one request")
    if 2 * len(requests) > preset.max_batch:
        raise InputError("requests", f"expected at most {preset.max_batch // 2} per batch", len(requests))
    check_steps(steps)
    for r in requests:
        r.validate()
    sizes = {(r.product.height, r.product.width) for r in requests}
    if len(sizes) != 1:
        raise InputError("requests", "expected one canvas size per batch", sorted(sizes))


def batch_settings(prepared: Sequence[object]) -> tuple[int, str]:
    """The step count and scheduler every prepared request in a batch must share."""
    settings = {(p.steps, p.scheduler) for p in prepared}  # type: ignore[attr-defined]
    if len(settings) != 1:
        raise InputError("requests", "expected one step count and scheduler per batch", sorted(settings))
    return settings.pop()


def product_only(product: Product) -> np.ndarray:
    """The product on neutral grey, (H, W, 3) uint8: what the encoders see of it."""
    return np.where(product.mask[..., None], product.rgb, np.uint8(GREY))


def initial_noise(seeds: Sequence[int], channels: int, h: int, w: int, sigma: float) -> np.ndarray:
    """(B, C, h, w) float32, each request's noise from its own seed: independent of the batch."""
    return np.stack([
        np.random.Generator(np.random.PCG64(seed)).standard_normal((channels, h, w), dtype=np.float32)
        for seed in seeds
    ]) * np.float32(sigma)


def guide(eps: np.ndarray, guidance: np.ndarray) -> np.ndarray:
    """Classifier-free guidance on a (2B, ...) prediction, conditional half first: (B, ...)."""
    n = len(guidance)
    cond, uncond = eps[:n], eps[n:]
    return uncond + guidance[:, None, None, None] * (cond - uncond)


def canvas_size(product_w: int, product_h: int, width: int | None, height: int | None, preset: Preset) -> tuple[int, int]:
    """The requested size; else the product's own size when the preset allows it; else the preset default."""
    if width is None and height is None:
        try:
            check_canvas_size(product_w, product_h, preset.min_side, preset.max_side)
            return product_w, product_h
        except InputError:
            return preset.default_width, preset.default_height
    width = preset.default_width if width is None else width
    height = preset.default_height if height is None else height
    check_canvas_size(width, height, preset.min_side, preset.max_side)
    return width, height


def placement_dict(p: Placement) -> dict:
    return {"scale": round(p.scale, 6), "offset": list(p.offset), "size": list(p.size)}


def schedule_settings(steps: int | None, scheduler: str | None, default_steps: int) -> tuple[int, str]:
    """The request's step count and scheduler with their defaults, both checked."""
    steps = default_steps if steps is None else steps
    scheduler = scheduler or "ddim"
    check_steps(steps)
    make_scheduler(scheduler)
    return steps, scheduler


def placed_product(
    preset: Preset,
    product: str | Path,
    mask: str | Path | None,
    width: int | None,
    height: int | None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Product, Product, Placement]:
    """(the product as loaded, the product placed on its canvas, where it went)."""
    item = load_product(product, mask, max_pixels=max_pixels)
    width, height = canvas_size(item.width, item.height, width, height, preset)
    placed, placement = place_on_canvas(item, width, height)
    return item, placed, placement


def selling_point_features(
    text_encoder: Component, tokenizer, texts: Sequence[Sequence[str]], max_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One vector per selling point, padded per request: features (B, T, D) float32 and mask
    (B, T) float32 (1 = a real text), T the most texts of any request in the batch.

    The vector is CLIP's pooled text embedding: the last hidden state at the end-of-text token,
    the highest id of the vocabulary (CLIP's own `argmax` rule). Calls stay within `max_batch`."""
    flat = [t for request in texts for t in request]
    ids = tokenizer(flat)
    embeds = np.concatenate([
        run_cast(text_encoder, {"input_ids": ids[i : i + max_batch]})["text_embeds"].astype(np.float32, copy=False)
        for i in range(0, len(flat), max_batch)
    ])
    pooled = embeds[np.arange(len(flat)), ids.argmax(-1)]  # (sum T_i, D)
    longest = max(len(request) for request in texts)
    features = np.zeros((len(texts), longest, pooled.shape[-1]), dtype=np.float32)
    mask = np.zeros((len(texts), longest), dtype=np.float32)
    start = 0
    for b, request in enumerate(texts):
        features[b, : len(request)] = pooled[start : start + len(request)]
        mask[b, : len(request)] = 1.0
        start += len(request)
    return features, mask
