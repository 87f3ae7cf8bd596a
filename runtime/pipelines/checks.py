"""The request rules every pipeline shares, defined once so the pipelines cannot drift apart on
what a valid seed, step count, guidance scale or batch is, and the defaults they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from runtime.backends.base import Component
from runtime.diffusion.schedulers import make_scheduler
from runtime.errors import InputError
from runtime.inputs.images import Product
from runtime.inputs.tokenizer import check_prompt
from runtime.presets import Preset

MAX_STEPS = 500
DEFAULT_STEPS = 30  # RefAdGen's paper: 30 DDIM steps, guidance 7.5; the other pipelines follow it
DEFAULT_SCHEDULER = "ddim"
DEFAULT_GUIDANCE = 7.5
GUIDANCE_RANGE = (1.0, 30.0)


class BatchedRequest(Protocol):
    product: Product

    def validate(self) -> None: ...


def require_components(components: Mapping[str, Component], needed: Sequence[str], pipeline: str) -> None:
    missing = [c for c in needed if c not in components]
    if missing:
        raise InputError("components", f"the {pipeline} pipeline needs {list(needed)}", f"missing {missing}")


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise InputError("steps", f"expected an integer in [1, {MAX_STEPS}]", steps)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InputError("seed", "expected an integer in [0, 2**63)", seed)


def check_range(field: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= float(value) <= high:
        raise InputError(field, f"expected a number in [{low}, {high}]", value)


@dataclass(frozen=True, kw_only=True)
class Guided:
    """The fields every guided diffusion request has, given by keyword; a pipeline's request
    adds its own and calls `check_guided` from its `validate`."""

    negative_prompt: str = ""
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    latents: np.ndarray | None = field(default=None, compare=False)  # (C, h, w): in place of the seed's noise

    def check_guided(self) -> None:
        check_prompt("negative_prompt", self.negative_prompt)
        check_seed(self.seed)
        check_range("guidance", self.guidance, *GUIDANCE_RANGE)


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


def schedule_settings(steps: int | None, scheduler: str | None, default_steps: int = DEFAULT_STEPS) -> tuple[int, str]:
    """The request's step count and scheduler with their defaults, both checked."""
    steps = default_steps if steps is None else steps
    scheduler = scheduler or DEFAULT_SCHEDULER
    check_steps(steps)
    make_scheduler(scheduler)
    return steps, scheduler
