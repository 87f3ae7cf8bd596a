"""Diffusion schedulers in numpy: deterministic DDIM and DPM-Solver++ (2M).

The maths follows diffusers' `DDIMScheduler` (eta = 0, no clipping or thresholding) and
`DPMSolverMultistepScheduler` (solver_order=2, algorithm_type="dpmsolver++",
solver_type="midpoint", lower_order_final=True, no Karras sigmas), so a pipeline built on these
produces the same latents as a diffusers pipeline with the same settings. Nothing here imports
torch: the runtime must work with whatever backend runs the networks.

Usage, for a latent `x` of shape (B, C, H, W) drawn from N(0, 1) * `init_noise_sigma`:

    scheduler = make_scheduler("dpm++")
    scheduler.set_timesteps(30)
    for t in scheduler.timesteps:
        eps = unet(x, t)                   # (B, C, H, W), same shape as x
        x = scheduler.step(eps, int(t), x)  # (B, C, H, W), dtype of x

Every sample in a batch shares the timestep. Coefficients and arithmetic are float64; the result
is cast back to the dtype of `sample`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from runtime.errors import AdgenError, InputError
from runtime.specs.shared import LATENT_TRAIN_STEPS

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(field, "expected one of " + ", ".join(choices), repr(value))


@dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule and timestep layout. The defaults are Stable Diffusion 1.5's.

    beta_schedule: "scaled_linear" (linear in sqrt(beta), as SD trained with) or "linear".
    prediction_type: what the network predicts, "epsilon" (noise) or "v_prediction".
    timestep_spacing: how inference timesteps are picked from the training ones, "leading",
        "trailing" or "linspace" (Table 2 of https://huggingface.co/papers/2305.08891).
    steps_offset: added to every timestep under "leading" spacing.
    set_alpha_to_one: DDIM only: whether the step past timestep 0 lands on alpha_bar = 1 or
        on alpha_bar[0].
    """

    num_train_timesteps: int = LATENT_TRAIN_STEPS
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise InputError("num_train_timesteps", "must be an integer >= 2", self.num_train_timesteps)
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise InputError(
                "beta_start, beta_end",
                "must satisfy 0 < beta_start <= beta_end < 1",
                (self.beta_start, self.beta_end),
            )
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise InputError("steps_offset", "must be an integer >= 0", self.steps_offset)


class _Scheduler:
    """Shared parts: the training noise schedule, argument checks and step bookkeeping.

    `alphas_cumprod` is alpha_bar_t for t = 0 .. num_train_timesteps - 1, shape (T,), float64.
    """

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        if not isinstance(config, SchedulerConfig):
            raise InputError("config", "must be a SchedulerConfig", type(config).__name__)
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        # Both samplers start from pure N(0, 1) noise in the variance-preserving parametrisation.
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose `num_inference_steps` timesteps (1-D int64, descending) and reset step state."""
        n = num_inference_steps
        limit = self.config.num_train_timesteps
        if not _is_int(n):
            raise InputError("steps", "must be an integer", repr(n))
        n = int(n)
        if not 1 <= n <= limit:
            raise InputError("steps", f"must be between 1 and {limit}", n)
        timesteps = self._spaced_timesteps(n).astype(np.int64)
        # A few step counts make diffusers' formulas run past the training range (leading
        # spacing with steps_offset) or repeat a timestep; stepping on those is meaningless.
        if timesteps.min() < 0 or timesteps.max() >= limit or np.any(np.diff(timesteps) >= 0):
            raise InputError(
                "steps",
                f"too many for timestep_spacing={self.config.timestep_spacing!r} "
                f"(timesteps would repeat or leave 0..{limit - 1}); use fewer steps",
                n,
            )
        self.num_inference_steps = n
        self.timesteps = timesteps
        self._reset()

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Take one denoising step from `timestep` to the next timestep in the schedule.

        model_output: network output at (`sample`, `timestep`), shape (B, C, H, W).
        sample: the current latent x_t, shape (B, C, H, W), any float dtype.
        Returns the previous sample x_{t_prev}, shape (B, C, H, W), dtype of `sample`.
        """
        if self.num_inference_steps is None:
            raise AdgenError(
                f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()"
            )
        t = self._check_timestep(timestep)
        sample = np.asarray(sample)
        model_output = np.asarray(model_output)
        if not np.issubdtype(sample.dtype, np.floating):
            raise InputError("sample", "must be a floating-point array", sample.dtype)
        if model_output.shape != sample.shape:
            raise InputError(
                "model_output", f"must have the sample's shape {sample.shape}", model_output.shape
            )
        prev = self._step(model_output.astype(np.float64), t, sample.astype(np.float64))
        return prev.astype(sample.dtype)

    def _check_timestep(self, timestep: int) -> int:
        try:
            t = operator.index(timestep)
        except TypeError:
            raise InputError("timestep", "must be an integer", repr(timestep)) from None
        if t not in self.timesteps:
            raise InputError("timestep", "must be one of the scheduler's timesteps", t)
        return t

    def _x0_and_eps(self, model_output: np.ndarray, sample: np.ndarray, alpha_t: float, sigma_t: float):
        """Predicted clean sample and noise from the network output; x_t = alpha_t x0 + sigma_t eps."""
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t, model_output
        # v = alpha_t eps - sigma_t x0 (https://huggingface.co/papers/2202.00512, section 4)
        return alpha_t * sample - sigma_t * model_output, alpha_t * model_output + sigma_t * sample

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM (eta = 0), https://huggingface.co/papers/2010.02502 eq. (12).

    After `set_timesteps(n)`, `timesteps` has shape (n,). `step` takes and returns (B, C, H, W)
    arrays and depends only on its arguments, so steps may be taken in any order.
    """

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        return _inference_timesteps(self.config, n, extra=0)

    def _reset(self) -> None:
        pass  # DDIM keeps no state between steps.

    def _step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        # Like diffusers, the previous timestep is always t - T // n, whatever the spacing.
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        if prev_timestep >= 0:
            alpha_prod_prev = self.alphas_cumprod[prev_timestep]
        else:
            alpha_prod_prev = 1.0 if self.config.set_alpha_to_one else self.alphas_cumprod[0]

        x0, eps = self._x0_and_eps(model_output, sample, alpha_prod_t**0.5, (1.0 - alpha_prod_t) ** 0.5)
        return alpha_prod_prev**0.5 * x0 + (1.0 - alpha_prod_prev) ** 0.5 * eps


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M): second-order multistep solver on the data prediction,
    https://huggingface.co/papers/2211.01095 (midpoint form, as in diffusers).

    After `set_timesteps(n)`, `timesteps` has shape (n,) and `sigmas` shape (n + 1,): the
    noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) at each timestep, then 0 for the
    clean end point. `step` takes and returns (B, C, H, W) arrays and keeps the previous step's
    x0 prediction (B, C, H, W), so the timesteps must be stepped in order: the first call may
    start anywhere in the schedule (image-to-image), each later call must pass the next one.
    The first step and the last are first order (the last lands on sigma = 0).
    """

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        super().__init__(config)
        self.sigmas = np.zeros(0, dtype=np.float64)
        self._step_index: int | None = None
        self._prev_x0: np.ndarray | None = None

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        return _inference_timesteps(self.config, n, extra=1)

    def _reset(self) -> None:
        ac = self.alphas_cumprod[self.timesteps]
        self.sigmas = np.concatenate([((1.0 - ac) / ac) ** 0.5, [0.0]])
        self._step_index = None
        self._prev_x0 = None

    def _step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        i = self._next_index(timestep)
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        x0, _ = self._x0_and_eps(model_output, sample, alpha_s0, sigma_s0)

        # h = lambda_t - lambda_s0 with lambda = log(alpha / sigma) = -log(sigmas[k]), so
        # e^-h = sigmas[i + 1] / sigmas[i]; written without logs so the final sigma of 0 is exact.
        exp_neg_h = self.sigmas[i + 1] / self.sigmas[i]
        first_order = self._prev_x0 is None or i == len(self.timesteps) - 1
        if first_order:
            # DPM-Solver++ 1: the DDIM step in the data-prediction parametrisation.
            prev = (sigma_t / sigma_s0) * sample + alpha_t * (1.0 - exp_neg_h) * x0
        else:
            h = np.log(self.sigmas[i] / self.sigmas[i + 1])
            h_0 = np.log(self.sigmas[i - 1] / self.sigmas[i])
            d1 = (h / h_0) * (x0 - self._prev_x0)
            prev = (sigma_t / sigma_s0) * sample + alpha_t * (1.0 - exp_neg_h) * (x0 + 0.5 * d1)

        self._prev_x0 = x0
        self._step_index = i + 1
        return prev

    def _next_index(self, timestep: int) -> int:
        if self._step_index is None:
            # Timesteps are unique (set_timesteps checks), so this is the only match.
            return int(np.flatnonzero(self.timesteps == timestep)[0])
        if self._step_index >= len(self.timesteps):
            raise AdgenError(
                f"{type(self).__name__}: all {len(self.timesteps)} steps are done; "
                "call set_timesteps again to start a new sequence"
            )
        expected = int(self.timesteps[self._step_index])
        if timestep != expected:
            raise InputError("timestep", f"must be the next timestep in the schedule, {expected}", timestep)
        return self._step_index


SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, config: SchedulerConfig | None = None) -> _Scheduler:
    """A fresh scheduler by name ("ddim" or "dpm++"); `config` defaults to SD 1.5's."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise InputError("scheduler", "expected one of " + ", ".join(SCHEDULERS), repr(name))
    return SCHEDULERS[name](config if config is not None else SchedulerConfig())


def _inference_timesteps(config: SchedulerConfig, n: int, extra: int) -> np.ndarray:
    """diffusers' timestep layouts, descending. DPM-Solver lays out `n + extra` points under
    "leading" and "linspace" and drops the last (t = 0 end), DDIM lays out exactly `n`."""
    total = config.num_train_timesteps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, total - 1, n + extra).round()[::-1][:n]
    if spacing == "leading":
        step_ratio = total // (n + extra)
        return (np.arange(0, n + extra) * step_ratio)[::-1][:n] + config.steps_offset
    # "trailing". np.arange with a float step sometimes yields one extra point next to 0 (for
    # n = 61, 103, ... with T = 1000), which diffusers keeps as timestep -1; drop it.
    return np.round(np.arange(total, 0, -total / n))[:n] - 1


def _alpha_sigma(ratio: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1 from the ratio sigma_t / alpha_t."""
    alpha = 1.0 / (ratio**2 + 1.0) ** 0.5
    return alpha, ratio * alpha

