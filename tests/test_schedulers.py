"""runtime.schedulers against diffusers: same timesteps, same samples at every step.

Tolerance: each step's float32 sample matches diffusers' within rtol=1e-5, atol=1e-5 (ours
computes in float64, diffusers in float32; observed worst error is about half of that bound).
The comparisons skip without diffusers and torch; the state, dtype and error tests need neither.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.diffusion.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerConfig,
    make_scheduler,
)
from runtime.errors import AdgenError, InputError

RTOL = 1e-5
ATOL = 1e-5
KINDS = ("ddim", "dpm++")
SPACINGS = ("leading", "trailing", "linspace")


def reference(kind: str, config: SchedulerConfig):
    """The diffusers scheduler with the settings ours implements, spelled out."""
    diffusers = pytest.importorskip("diffusers")
    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        steps_offset=config.steps_offset,
        thresholding=False,
    )
    if kind == "ddim":
        return diffusers.DDIMScheduler(
            clip_sample=False, set_alpha_to_one=config.set_alpha_to_one, **common
        )
    return diffusers.DPMSolverMultistepScheduler(
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        **common,
    )


def pseudo_model(sample: np.ndarray, t: int, noise: np.ndarray) -> np.ndarray:
    """A stand-in network: depends on the sample, the timestep and fixed per-step noise."""
    return (0.9 * sample + 0.1 * noise + 1e-4 * t).astype(np.float32)


def run_loop(scheduler, steps: int, seed: int = 0, start: int = 0, shape=(2, 4, 8, 8)):
    """Denoise from seeded noise; returns every intermediate sample (float32)."""
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    out = []
    for t in scheduler.timesteps[start:]:
        noise = rng.standard_normal(shape).astype(np.float32)
        x = scheduler.step(pseudo_model(x, int(t), noise), int(t), x)
        out.append(x)
    return out


def run_reference_loop(scheduler, steps: int, seed: int = 0, start: int = 0, shape=(2, 4, 8, 8)):
    """`run_loop` for a diffusers scheduler, fed the identical noise."""
    torch = pytest.importorskip("torch")
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    out = []
    for t in scheduler.timesteps[start:]:
        noise = rng.standard_normal(shape).astype(np.float32)
        model_output = torch.from_numpy(pseudo_model(x.numpy(), int(t), noise))
        x = scheduler.step(model_output, int(t), x).prev_sample
        out.append(x.numpy())
    return out


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {i}")


# --- timesteps -------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_timesteps_match_diffusers_for_every_step_count(kind, spacing):
    config = SchedulerConfig(timestep_spacing=spacing)
    ours, theirs = make_scheduler(kind, config), reference(kind, config)
    for n in range(1, config.num_train_timesteps + 1):
        theirs.set_timesteps(n)
        expected = theirs.timesteps.numpy()
        try:
            ours.set_timesteps(n)
        except InputError as err:
            # Only step counts where diffusers' own schedule is broken are refused.
            assert err.field == "steps"
            assert (
                expected.min() < 0
                or expected.max() >= config.num_train_timesteps
                or np.any(np.diff(expected) >= 0)
            ), (n, expected)
            continue
        assert ours.timesteps.dtype == np.int64 and ours.timesteps.ndim == 1
        if spacing == "trailing" and len(expected) == n + 1:
            # diffusers' float arange adds a stray timestep -1 for some n (61, 103, ...).
            assert expected[-1] == -1
            expected = expected[:n]
        np.testing.assert_array_equal(ours.timesteps, expected, err_msg=f"n={n}")
        assert len(ours.timesteps) == n


def test_sd15_defaults():
    config = SchedulerConfig()
    assert (config.num_train_timesteps, config.beta_start, config.beta_end) == (1000, 0.00085, 0.012)
    assert (config.beta_schedule, config.prediction_type) == ("scaled_linear", "epsilon")
    assert (config.timestep_spacing, config.steps_offset, config.set_alpha_to_one) == ("leading", 1, False)
    # SD 1.5 at 50 steps: DDIM spaces by 1000 // 50, DPM-Solver by 1000 // 51 (diffusers' layouts).
    for kind, head, tail in (("ddim", [981, 961], [21, 1]), ("dpm++", [951, 932], [39, 20])):
        scheduler = make_scheduler(kind)
        assert scheduler.init_noise_sigma == 1.0
        assert scheduler.config == config
        scheduler.set_timesteps(50)
        np.testing.assert_array_equal(scheduler.timesteps[:2], head)
        np.testing.assert_array_equal(scheduler.timesteps[-2:], tail)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(schedule):
    config = SchedulerConfig(beta_schedule=schedule)
    ours = DDIMScheduler(config).alphas_cumprod
    theirs = reference("ddim", config).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)


# --- full denoising loops --------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 30, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_loop_matches_diffusers(kind, spacing, prediction, steps):
    config = SchedulerConfig(timestep_spacing=spacing, prediction_type=prediction)
    assert_same_trajectory(
        run_loop(make_scheduler(kind, config), steps),
        run_reference_loop(reference(kind, config), steps),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_loop_matches_diffusers_linear_betas_and_odd_steps(kind):
    config = SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    for steps in (3, 7, 61):
        assert_same_trajectory(
            run_loop(make_scheduler(kind, config), steps),
            run_reference_loop(reference(kind, config), steps),
        )


def test_ddim_set_alpha_to_one_matches_diffusers():
    config = SchedulerConfig(set_alpha_to_one=True)
    assert_same_trajectory(
        run_loop(DDIMScheduler(config), 10), run_reference_loop(reference("ddim", config), 10)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_starting_mid_schedule_matches_diffusers(kind):
    # Image-to-image starts partway down the schedule.
    config = SchedulerConfig()
    assert_same_trajectory(
        run_loop(make_scheduler(kind, config), 20, start=6),
        run_reference_loop(reference(kind, config), 20, start=6),
    )


# --- state, dtypes, batches ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reuse_after_set_timesteps_equals_fresh(kind):
    fresh = run_loop(make_scheduler(kind), 12, seed=3)
    reused = make_scheduler(kind)
    run_loop(reused, 12, seed=1)
    run_loop(reused, 5, seed=2)
    # Abandon a sequence half way: set_timesteps must drop the multistep history.
    reused.set_timesteps(12)
    x = np.ones((2, 4, 8, 8), np.float32)
    for t in reused.timesteps[:4]:
        x = reused.step(x, int(t), x)
    again = run_loop(reused, 12, seed=3)
    for a, b in zip(fresh, again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_returns_dtype_and_shape_of_sample(kind, dtype):
    scheduler = make_scheduler(kind)
    scheduler.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 5)).astype(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x, t, x)  # numpy int64 timesteps are accepted as-is
        assert x.dtype == dtype and x.shape == (1, 4, 6, 5)
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_items_are_independent(kind):
    batch = np.stack(run_loop(make_scheduler(kind), 8, shape=(3, 4, 8, 8)))
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noises = [rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(8)]
    for b in range(3):
        scheduler = make_scheduler(kind)
        scheduler.set_timesteps(8)
        x = x0[b : b + 1]
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(pseudo_model(x, int(t), noises[i][b : b + 1]), int(t), x)
            np.testing.assert_array_equal(x, batch[i, b : b + 1])


# --- errors ----------------------------------------------------------------------------------


def test_every_registered_scheduler_is_compared_and_unknown_names_are_refused():
    assert set(SCHEDULERS) == set(KINDS)  # a new scheduler joins the comparisons with diffusers above
    assert make_scheduler("ddim") is not make_scheduler("ddim")  # schedulers hold state: one per loop
    with pytest.raises(InputError) as err:
        make_scheduler("euler")
    assert err.value.field == "scheduler"
    assert str(err.value) == "scheduler: expected one of ddim, dpm++ (got 'euler')"


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "10"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_step_counts(kind, steps):
    with pytest.raises(InputError) as err:
        make_scheduler(kind).set_timesteps(steps)
    assert err.value.field == "steps"


@pytest.mark.parametrize("kind", KINDS)
def test_step_before_set_timesteps(kind):
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(AdgenError, match="call set_timesteps"):
        make_scheduler(kind).step(x, 981, x)


@pytest.mark.parametrize("timestep", [500, -1, 5000, 981.0])
@pytest.mark.parametrize("kind", KINDS)
def test_timestep_not_in_schedule(kind, timestep):
    scheduler = make_scheduler(kind)
    scheduler.set_timesteps(50)
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InputError) as err:
        scheduler.step(x, timestep, x)
    assert err.value.field == "timestep"


def test_dpm_steps_must_follow_the_schedule():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(3)
    x = np.zeros((1, 4, 8, 8), np.float32)
    first, second, third = (int(t) for t in scheduler.timesteps)
    scheduler.step(x, first, x)
    with pytest.raises(InputError, match=f"next timestep in the schedule, {second}"):
        scheduler.step(x, third, x)
    scheduler.step(x, second, x)
    scheduler.step(x, third, x)
    with pytest.raises(AdgenError, match="call set_timesteps again"):
        scheduler.step(x, third, x)


@pytest.mark.parametrize("kind", KINDS)
def test_model_output_shape_must_match_sample(kind):
    scheduler = make_scheduler(kind)
    scheduler.set_timesteps(2)
    with pytest.raises(InputError) as err:
        scheduler.step(np.zeros((1, 4, 8, 8)), int(scheduler.timesteps[0]), np.zeros((2, 4, 8, 8)))
    assert err.value.field == "model_output"


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("beta_schedule", dict(beta_schedule="cosine")),
        ("prediction_type", dict(prediction_type="sample")),
        ("timestep_spacing", dict(timestep_spacing="karras")),
        ("num_train_timesteps", dict(num_train_timesteps=0)),
        ("beta_start, beta_end", dict(beta_start=0.02, beta_end=0.01)),
        ("steps_offset", dict(steps_offset=-1)),
    ],
)
def test_bad_config(field, kwargs):
    with pytest.raises(InputError) as err:
        SchedulerConfig(**kwargs)
    assert err.value.field == field
