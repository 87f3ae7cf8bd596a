"""The once-per-request encodings several pipelines share: prompt embeddings (with the negative
prompts as the unconditional half under guidance), image tokens of the product, and one pooled
text feature per selling point."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from runtime.backends.base import Component, run_cast
from runtime.diffusion.loop import Guidance
from runtime.inputs.images import Product, clip_pixels, product_only
from runtime.inputs.tokenizer import Tokenizer


def prompt_embeddings(
    text_encoder: Component, tokenizer: Tokenizer, prompts: Sequence[str], negatives: Sequence[str], guidance: Guidance
) -> np.ndarray:
    """(halves * B, L, D): the prompts, then (under guidance) the negative prompts."""
    texts = list(prompts) + (list(negatives) if guidance.halves == 2 else [])
    return run_cast(text_encoder, {"input_ids": tokenizer(texts)})["text_embeds"]


def image_tokens(image_encoder: Component, image_size: int, products: Sequence[Product]) -> np.ndarray:
    """(B, tokens, D): the image encoder on each product on grey, CLIP-preprocessed."""
    pixels = np.concatenate([clip_pixels(product_only(p), image_size) for p in products])
    return run_cast(image_encoder, {"pixel_values": pixels})["image_tokens"]


def selling_point_features(
    text_encoder: Component, tokenizer: Tokenizer, texts: Sequence[Sequence[str]], max_batch: int, slots: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One vector per selling point, padded per request with zeros: features (B, T, D) float32
    and mask (B, T) float32 (1 = a real text), T the most texts of any request in the batch, or
    `slots` if that is more.

    The vector is CLIP's pooled text embedding: the last hidden state at the end-of-text token,
    the highest id of the vocabulary (CLIP's own `argmax` rule). Calls stay within `max_batch`."""
    flat = [t for request in texts for t in request]
    ids = tokenizer(flat)
    embeds = np.concatenate([
        run_cast(text_encoder, {"input_ids": ids[i : i + max_batch]})["text_embeds"].astype(np.float32, copy=False)
        for i in range(0, len(flat), max_batch)
    ])
    pooled = embeds[np.arange(len(flat)), ids.argmax(-1)]  # (sum T_i, D)
    longest = max([slots, *(len(request) for request in texts)])
    features = np.zeros((len(texts), longest, pooled.shape[-1]), dtype=np.float32)
    mask = np.zeros((len(texts), longest), dtype=np.float32)
    start = 0
    for b, request in enumerate(texts):
        features[b, : len(request)] = pooled[start : start + len(request)]
        mask[b, : len(request)] = 1.0
        start += len(request)
    return features, mask
