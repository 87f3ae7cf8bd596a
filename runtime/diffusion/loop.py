"""The one latent denoising loop of every diffusion pipeline (refadgen, background, poster).

A pipeline builds its conditioning once per request and hands the loop a `Denoiser`: the
component(s) that run every step, the per-request inputs they take, and how the latents become
their `sample`. The loop does the rest the same way for every pipeline:

    guidance = Guidance.of([r.guidance for r in requests], fused=...)
    latents = denoise(denoiser, seeds, (C, h, w), steps, "ddim", guidance, timer, on_step)

- each request's initial noise from its own seed (independent of the batch);
- the scheduler's timesteps, one per sample of the network batch;
- classifier-free guidance as ONE batch of 2B (conditional half first, unconditional second),
  or inside a fused guided-step graph (runtime/specs/guided.py) that takes the B per-request
  inputs and the guidance scales and returns the guided prediction;
- the prediction cast to float32 before the guidance and scheduler maths (float16 graphs);
- each step timed under `denoise_step`, then the step callback;
- the loop is one `request_scope`: a served component keeps the per-request (invariant) inputs
  from the first step on, and drops them after the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.backends.base import Component, request_scope, run_cast
from runtime.diffusion.schedulers import make_scheduler
from runtime.specs.guided import GUIDANCE
from runtime.timing import StageTimer

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
STEP_STAGE = "denoise_step"


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of a batch: one scale per request. Both halves run when a request
    guides (at scale 1 the unconditional half cancels out) or the step graph is fused (it always
    runs both)."""

    scales: np.ndarray  # (B,) float32
    fused: bool = False

    @classmethod
    def of(cls, scales: Sequence[float], fused: bool = False) -> "Guidance":
        return cls(np.asarray(scales, dtype=np.float32), fused)

    @property
    def halves(self) -> int:
        return 2 if self.fused or bool((self.scales > 1.0).any()) else 1

    def double(self, x: np.ndarray) -> np.ndarray:
        """(B, ...) -> (halves * B, ...): what both halves of the network batch take alike."""
        return np.concatenate([x] * self.halves) if self.halves == 2 else x

    def combine(self, eps: np.ndarray) -> np.ndarray:
        """(halves * B, ...) prediction -> (B, ...): uncond + scale * (cond - uncond)."""
        if self.halves == 1:
            return eps
        n = len(self.scales)
        cond, uncond = eps[:n], eps[n:]
        return uncond + self.scales.reshape(-1, *([1] * (eps.ndim - 1))) * (cond - uncond)


@dataclass
class Denoiser:
    """A pipeline's per-step work: `components` run in order every step, each taking the inputs
    its spec names from the per-request `conditioning`, this step's `sample` and `timestep`, and
    the outputs of the components before it (a ControlNet's residuals feed the U-Net).

    `conditioning` holds the network batch (conditional half first, unconditional second, when
    guidance doubles it). With a fused guided-step graph as the only component, the inputs it
    takes per request (`shared_inputs` of its spec) are cut to their first half and the guidance
    scales are fed to the graph.
    """

    components: Sequence[Component]
    conditioning: Mapping[str, np.ndarray]
    sample: Callable[[np.ndarray], np.ndarray] = field(default=lambda latents: latents)  # (B, C, h, w) -> `sample`
    output: str = "noise_pred"

    @property
    def fused(self) -> bool:
        return len(self.components) == 1 and "guided_step_of" in self.components[0].spec.constants

    def predict(self, latents: np.ndarray, t: int, guidance: Guidance) -> np.ndarray:
        """The guided noise prediction for `latents` (B, C, h, w) at timestep `t`, float32."""
        n = len(latents)
        sample = self.sample(latents)
        if self.fused:
            (step,) = self.components
            shared = set(step.spec.constants["shared_inputs"])
            feed = {k: (v[:n] if k in shared else v) for k, v in self.conditioning.items() if k in step.spec.input_names}
            feed |= {"sample": sample, "timestep": np.full(n, t, dtype=np.float32), GUIDANCE: guidance.scales}
            return run_cast(step, feed)[self.output].astype(np.float32, copy=False)
        values = {
            **self.conditioning,
            "sample": guidance.double(sample),
            "timestep": np.full(guidance.halves * n, t, dtype=np.float32),
        }
        for component in self.components:
            values |= run_cast(component, {k: values[k] for k in component.spec.input_names})
        return guidance.combine(values[self.output].astype(np.float32, copy=False))


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], sigma: float, given: Sequence[np.ndarray | None] | None = None
) -> np.ndarray:
    """(B, C, h, w) float32, each request's noise from its own seed (independent of the batch),
    or the request's own initial latents where `given` has them; scaled by the scheduler's
    initial sigma either way, as diffusers does with `latents=`."""
    given = given or [None] * len(seeds)
    return np.stack([
        np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32) if start is None else start
        for seed, start in zip(seeds, given)
    ]) * np.float32(sigma)


def denoise(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    steps: int,
    scheduler: str,
    guidance: Guidance,
    timer: StageTimer,
    on_step: StepCallback | None = None,
    given: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """`steps` steps of `scheduler` from each seed's noise of `shape` (C, h, w) (or the initial
    latents `given` for a request): the denoised latents (B, C, h, w) float32."""
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    latents = initial_noise(seeds, shape, sched.init_noise_sigma, given)
    with request_scope() as scope:  # served components keep the conditioning for the whole loop
        for i, t in enumerate(sched.timesteps):
            scope.final = i == len(sched.timesteps) - 1
            with timer.stage(STEP_STAGE, repeated=True):
                eps = denoiser.predict(latents, int(t), guidance)
                latents = sched.step(eps, int(t), latents)
            if on_step:
                on_step(i + 1, steps)
    return latents
