"""Diffusion over boxes (DiffusionDet, as RADM and the PlanNet loop use it), in numpy.

A layout is (N, 4) boxes in a "scaled" space: normalized (cx, cy, w, h) mapped from [0, 1] to
[-scale, scale] (scale 2). The forward process uses the cosine schedule over 1000 steps; the
network predicts the CLEAN boxes (x0), and DDIM derives the noise from them. The reference
samples with ONE step from t = 999; more steps walk the same trunc(linspace(-1, 999, k + 1))
grid DiffusionDet uses.

Batch rule: every random draw (initial boxes, DDIM noise, renewed boxes) comes from the
request's own generator, in the same order whatever else is in the batch, so a request's layout
does not depend on its batch neighbours.

User-fixed boxes (controllability): their slots hold the user's clean box at every step, so the
network plans the other boxes around them, and the result keeps them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.backends.base import Component, request_scope, run_cast
from runtime.errors import InputError
from runtime.layout.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from runtime.specs.layout import BOX_SCALE, BOX_TRAIN_STEPS
from runtime.timing import StageTimer

STEP_STAGE = "layout_step"
RENEWAL_THRESHOLD = 0.5  # DiffusionDet: boxes below this class score are replaced by fresh noise
MAX_LAYOUT_STEPS = 100

# (x_t (B, N, 4) float32, t (B,) float32) -> (clean boxes, normalized xyxy (B, N, 4); class logits (B, N, C) or None)
Predict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def cosine_alphas_cumprod(steps: int = BOX_TRAIN_STEPS, s: float = 0.008) -> np.ndarray:
    """(steps,) float64 alpha-bar of the cosine schedule (Nichol & Dhariwal), betas clipped at 0.999."""
    x = np.linspace(0, steps, steps + 1, dtype=np.float64)
    f = np.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


def time_pairs(steps: int) -> list[tuple[int, int]]:
    """DiffusionDet's (t, t_next) pairs: one step is [(999, -1)]."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_LAYOUT_STEPS:
        raise InputError("layout_steps", f"expected an integer in [1, {MAX_LAYOUT_STEPS}]", steps)
    times = np.trunc(np.linspace(-1, BOX_TRAIN_STEPS - 1, steps + 1)).astype(int)[::-1].tolist()
    return list(zip(times[:-1], times[1:]))


def to_scaled(xyxy: np.ndarray) -> np.ndarray:
    """Normalized xyxy -> the diffusion space, clipped to [-BOX_SCALE, BOX_SCALE]."""
    return np.clip((xyxy_to_cxcywh(xyxy) * 2 - 1) * BOX_SCALE, -BOX_SCALE, BOX_SCALE).astype(np.float32)


def from_scaled(x: np.ndarray) -> np.ndarray:
    """The diffusion space -> normalized xyxy (what the networks see of a noisy box)."""
    return cxcywh_to_xyxy((np.clip(x, -BOX_SCALE, BOX_SCALE) / BOX_SCALE + 1) / 2)


@dataclass(frozen=True)
class FixedBoxes:
    """Per request: which slots hold user boxes and those boxes (normalized xyxy)."""

    mask: np.ndarray  # (B, N) bool
    boxes: np.ndarray  # (B, N, 4) float, rows outside the mask ignored

    @classmethod
    def none(cls, batch: int, slots: int) -> "FixedBoxes":
        return cls(np.zeros((batch, slots), dtype=bool), np.zeros((batch, slots, 4)))

    @classmethod
    def of(cls, held: Sequence[Mapping[int, np.ndarray]], slots: int) -> "FixedBoxes":
        """Per request, the boxes it holds by slot (normalized xyxy)."""
        fixed = cls.none(len(held), slots)
        for b, boxes in enumerate(held):
            for slot, box in boxes.items():
                fixed.mask[b, slot] = True
                fixed.boxes[b, slot] = box
        return fixed


@dataclass
class BoxDenoiser:
    """A box network as the sampler's `predict`: its per-request `conditioning` fixed, the noisy
    boxes (input `boxes`) and the timestep fed every step, timed under `layout_step`. `output`
    names the predicted clean boxes (normalized xyxy), `logits` the class logits if it has them."""

    component: Component
    conditioning: Mapping[str, np.ndarray]
    boxes: str
    output: str
    timer: StageTimer
    logits: str | None = None

    def __call__(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self.timer.stage(STEP_STAGE, repeated=True):
            out = run_cast(self.component, {self.boxes: x, "timestep": t, **self.conditioning})
        logits = None if self.logits is None else out[self.logits].astype(np.float32)
        return out[self.output].astype(np.float32), logits


@dataclass
class BoxSample:
    boxes: np.ndarray  # (B, N, 4) normalized xyxy, fixed slots exactly the user's boxes
    class_logits: np.ndarray | None  # (B, N, C) of the last network call
    # every step's prediction: (clean boxes (B, N, 4) normalized xyxy, class logits or None)
    predictions: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)

    def rescaled(self, factors: np.ndarray) -> "BoxSample":
        """Every box (the result and each step's) multiplied by `factors` (4,): from the frame the
        network returned its boxes in to the canvas's (LayoutSize.proposal_frame)."""
        return BoxSample(self.boxes * factors, self.class_logits,
                         [(boxes * factors, logits) for boxes, logits in self.predictions])


def sample_boxes(
    predict: Predict,
    generators: Sequence[np.random.Generator],
    slots: int,
    steps: int,
    fixed: FixedBoxes | None = None,
    eta: float = 1.0,
    renewal: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    renewal_threshold: float | Sequence[float] = RENEWAL_THRESHOLD,
) -> BoxSample:
    """DDIM from pure noise to a layout of `slots` boxes per request (module docstring). With
    `renewal`, boxes whose best class score is at most `renewal_threshold` (one for all, or one
    per request) are replaced by fresh noise after each step."""
    pairs = time_pairs(steps)
    batch = len(generators)
    fixed = fixed or FixedBoxes.none(batch, slots)
    alpha_bar = cosine_alphas_cumprod()
    fixed_scaled = to_scaled(fixed.boxes)
    x = np.stack([g.standard_normal((slots, 4)) for g in generators]).astype(np.float32)  # (B, N, 4)
    threshold = np.broadcast_to(np.asarray(renewal_threshold, dtype=np.float64), (batch,))[:, None]  # (B, 1)
    logits = None
    predictions = []
    with request_scope() as scope:  # served components keep the feature maps for the whole loop
        for i, (t, t_next) in enumerate(pairs):
            scope.final = t_next < 0
            x = np.where(fixed.mask[..., None], fixed_scaled, x)
            boxes, logits = predict(x, np.full(batch, t, dtype=np.float32))
            predictions.append((np.where(fixed.mask[..., None], fixed.boxes, boxes), logits))
            x0 = np.where(fixed.mask[..., None], fixed_scaled, to_scaled(boxes))
            if on_step:
                on_step(i + 1, len(pairs))
            if t_next < 0:
                x = x0
                break
            a, a_next = alpha_bar[t], alpha_bar[t_next]
            eps = (np.sqrt(1 / a) * x - x0) / np.sqrt(1 / a - 1)
            sigma = eta * math.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
            c = math.sqrt(max(1 - a_next - sigma**2, 0.0))
            noise = np.stack([g.standard_normal((slots, 4)) for g in generators])
            x = (x0 * math.sqrt(a_next) + c * eps + sigma * noise).astype(np.float32)
            if renewal and logits is not None:
                fresh = np.stack([g.standard_normal((slots, 4)) for g in generators]).astype(np.float32)
                weak = _sigmoid(logits).max(-1) <= threshold  # (B, N): per request, never sample 0's
                x = np.where(weak[..., None], fresh, x)
    result = from_scaled(x)
    result = np.where(fixed.mask[..., None], fixed.boxes, result)
    return BoxSample(boxes=result, class_logits=logits, predictions=predictions)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))
