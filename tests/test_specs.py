"""Component specs: feed validation, the bound dims, dynamic axes, profiles and spec hashes, for
the seven RefAdGen components at every preset. Torch-free except where a test runs the tiny
modules against their specs."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import SpecError
from runtime.presets import PRESETS, get_preset
from runtime.specs.core import ComponentSpec, DerivedDim, Dim, DType, Precision, TensorSpec
from runtime.specs.refadgen import NUM_REF_LAYERS, ref_layer_name, refadgen_specs

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = tuple(refadgen_specs(get_preset("tiny")))
CASES = [(preset, component) for preset in PRESETS for component in COMPONENTS]


@pytest.fixture
def unet_spec(tiny_specs):
    return tiny_specs["unet"]


@pytest.fixture
def unet_feed(unet_spec):
    return unet_spec.sample_inputs(np.random.default_rng(0))


def raises_spec_error(spec, feed, tensor: str, **kwargs) -> str:
    """Validate `feed` expecting a SpecError about `spec.name`.`tensor`; return its message."""
    with pytest.raises(SpecError) as excinfo:
        spec.validate_inputs(feed, **kwargs)
    message = str(excinfo.value)
    assert (excinfo.value.component, excinfo.value.tensor) == (spec.name, tensor)
    assert message.startswith(f"{spec.name}.{tensor}: expected ")
    assert ", got " in message
    return message


@pytest.mark.parametrize("preset_name,component", CASES)
def test_validate_inputs_accepts_sample_inputs_and_binds_their_dims(preset_name, component):
    spec = refadgen_specs(get_preset(preset_name))[component]
    feed = spec.sample_inputs(np.random.default_rng(0))
    assert spec.validate_inputs(feed) == spec.env_at("opt")


@pytest.mark.parametrize("latent_h,latent_w", [(20, 16), (21, 13), (8, 64), (64, 9)])
def test_validate_inputs_binds_unet_token_counts_per_level(unet_spec, latent_h, latent_w):
    feed = unet_spec.sample_inputs(np.random.default_rng(0), unet_spec.env_at(latent_h=latent_h, latent_w=latent_w))
    env = unet_spec.validate_inputs(feed)
    assert (env["latent_h"], env["latent_w"]) == (latent_h, latent_w)
    assert env["tokens_l0"] == latent_h * latent_w
    for level in range(1, 4):
        stride = 2**level
        assert env[f"tokens_l{level}"] == math.ceil(latent_h / stride) * math.ceil(latent_w / stride)


def test_missing_input_is_named(unet_spec, unet_feed):
    del unet_feed["sample"]
    message = raises_spec_error(unet_spec, unet_feed, "inputs")
    assert "missing ['sample']" in message


def test_unexpected_input_is_named(unet_spec, unet_feed):
    unet_feed["mask"] = unet_feed["sample"][:, :1]
    message = raises_spec_error(unet_spec, unet_feed, "inputs")
    assert "unexpected ['mask']" in message


def test_float64_input_is_rejected_with_expected_dtype(unet_spec, unet_feed):
    unet_feed["sample"] = unet_feed["sample"].astype(np.float64)
    message = raises_spec_error(unet_spec, unet_feed, "sample")
    assert "float32" in message.split(", got ")[0]
    assert message.endswith("(2, 5, 20, 16) float64")


def test_wrong_rank_is_rejected(unet_spec, unet_feed):
    unet_feed["sample"] = unet_feed["sample"][0]
    message = raises_spec_error(unet_spec, unet_feed, "sample")
    assert "(B, 5, latent_h, latent_w) float32" in message
    assert message.endswith("got (5, 20, 16) float32")


def test_non_array_input_is_rejected(unet_spec, unet_feed):
    unet_feed["timestep"] = unet_feed["timestep"].tolist()
    message = raises_spec_error(unet_spec, unet_feed, "timestep")
    assert message.endswith("got list")


def test_inconsistent_batch_between_inputs_is_rejected(unet_spec, unet_feed):
    unet_feed["timestep"] = np.zeros(3, dtype=np.float32)
    message = raises_spec_error(unet_spec, unet_feed, "timestep")
    assert "B=2 as in the other inputs" in message
    assert message.endswith("got (3,) float32")


def test_latent_above_its_bound_is_rejected(unet_spec, tiny):
    too_big = tiny.max_side // tiny.vae_scale + 1
    feed = unet_spec.sample_inputs(np.random.default_rng(0), unet_spec.env_at(latent_h=too_big))
    message = raises_spec_error(unet_spec, feed, "sample")
    assert f"latent_h in [{tiny.min_side // tiny.vae_scale}, {tiny.max_side // tiny.vae_scale}]" in message
    assert f"got (2, 5, {too_big}, 16) float32" in message


def test_batch_above_its_bound_is_rejected(unet_spec, tiny):
    feed = unet_spec.sample_inputs(np.random.default_rng(0), unet_spec.env_at(B=tiny.max_batch + 1))
    message = raises_spec_error(unet_spec, feed, "sample")
    assert f"B in [1, {tiny.max_batch}]" in message


def test_image_size_off_the_vae_grid_is_rejected(tiny_specs, tiny):
    spec = tiny_specs["vae_encoder"]
    feed = spec.sample_inputs(np.random.default_rng(0), spec.env_at(height=tiny.default_height + 1))
    message = raises_spec_error(spec, feed, "image")
    assert f"height a multiple of {tiny.vae_scale}" in message


def test_ref_key_tokens_must_match_the_latent_size(unet_spec, unet_feed):
    # keys/values of a 24 x 16 reference fed to a 20 x 16 generation
    other = unet_spec.sample_inputs(np.random.default_rng(1), unet_spec.env_at(latent_h=24, latent_w=16))
    for kind in ("key", "value"):
        for i in range(NUM_REF_LAYERS):
            unet_feed[ref_layer_name(kind, i)] = other[ref_layer_name(kind, i)]
    message = raises_spec_error(unet_spec, unet_feed, "ref_key_00")
    assert "(B, tokens_l0, 32) float32 = (2, 320, 32)" in message
    assert "tokens_l0=320" in message
    assert message.endswith("got (2, 384, 32) float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_when_checked(unet_spec, unet_feed, bad):
    unet_feed["text_embeds"][1, 5, 3] = bad
    message = raises_spec_error(unet_spec, unet_feed, "text_embeds")
    assert message == "unet.text_embeds: expected finite values, got NaN or Inf"


def test_non_finite_values_are_accepted_when_not_checked(unet_spec, unet_feed):
    unet_feed["text_embeds"][1, 5, 3] = np.nan
    assert unet_spec.validate_inputs(unet_feed, check_values=False) == unet_spec.env_at("opt")


@pytest.mark.parametrize("component, tensor, bad, rule", [
    ("text_encoder", "input_ids", 10**9, "expected values in [0, 49407]"),
    ("text_encoder", "input_ids", -1, "expected values in [0, 49407]"),
    ("unet", "timestep", 1e9, "expected values in [0, 999]"),
    ("unet", "timestep", -5.0, "expected values in [0, 999]"),
])
def test_values_outside_the_spec_limits_are_refused_naming_the_tensor(tiny_specs, component, tensor, bad, rule):
    spec = tiny_specs[component]
    feed = spec.sample_inputs(np.random.default_rng(0))
    feed[tensor].flat[-1] = bad
    message = raises_spec_error(spec, feed, tensor)
    assert message.startswith(f"{component}.{tensor}: {rule}, got values in ["), message
    assert spec.validate_inputs(feed, check_values=False)  # a rule on values: only where values are checked


def test_limits_hold_what_the_runtime_feeds(tiny_specs, tiny):
    """Sample inputs, the vocabulary's last id and the schedule's first and last timesteps pass."""
    encoder, unet = tiny_specs["text_encoder"], tiny_specs["unet"]
    ids = encoder.sample_inputs(np.random.default_rng(0))
    ids["input_ids"][0, :2] = (0, tiny.text.vocab_size - 1)
    encoder.validate_inputs(ids)
    feed = unet.sample_inputs(np.random.default_rng(0))
    feed["timestep"][:] = (0, 999)
    unet.validate_inputs(feed)


def test_nan_in_float16_input_is_rejected(tiny):
    spec = refadgen_specs(tiny, Precision.FP16)["vae_decoder"]
    feed = spec.sample_inputs(np.random.default_rng(0))
    feed["latent"][0, 0, 0, 0] = np.nan
    raises_spec_error(spec, feed, "latent")


def test_validate_outputs_accepts_the_spec_shapes(unet_spec, unet_feed):
    env = unet_spec.validate_inputs(unet_feed)
    unet_spec.validate_outputs({"noise_pred": np.zeros((2, 4, 20, 16), dtype=np.float32)}, env)


@pytest.mark.parametrize(
    "outputs,got",
    [
        ({"noise_pred": np.zeros((2, 4, 16, 20), dtype=np.float32)}, "(2, 4, 16, 20) float32"),
        ({"noise_pred": np.zeros((2, 5, 20, 16), dtype=np.float32)}, "(2, 5, 20, 16) float32"),
        ({"noise_pred": np.zeros((2, 4, 20, 16), dtype=np.float16)}, "(2, 4, 20, 16) float16"),
    ],
    ids=["transposed", "channels", "dtype"],
)
def test_validate_outputs_rejects_wrong_shape_or_dtype(unet_spec, unet_feed, outputs, got):
    env = unet_spec.validate_inputs(unet_feed)
    with pytest.raises(SpecError) as excinfo:
        unet_spec.validate_outputs(outputs, env)
    message = str(excinfo.value)
    assert message.startswith("unet.noise_pred: expected (B, 4, latent_h, latent_w) float32 = (2, 4, 20, 16)")
    assert message.endswith(f"got {got}")


def test_validate_outputs_rejects_a_missing_output(unet_spec, unet_feed):
    env = unet_spec.validate_inputs(unet_feed)
    expected = r"^unet\.outputs: expected all of \['noise_pred'\], got missing \['noise_pred'\]$"
    with pytest.raises(SpecError, match=expected):
        unet_spec.validate_outputs({"sample": unet_feed["sample"]}, env)


def test_tiny_modules_return_what_their_specs_declare(tiny_specs, tiny_modules):
    from networks.common.runner import run_module

    for name, spec in tiny_specs.items():
        feed = spec.sample_inputs(np.random.default_rng(0), spec.env_at("min"))
        env = spec.validate_inputs(feed)
        spec.validate_outputs(run_module(tiny_modules[name], spec, feed), env)


def test_dynamic_axes_name_batch_and_spatial_axes_of_unet_inputs(unet_spec):
    axes = unet_spec.dynamic_axes()
    assert axes["sample"] == {0: "B", 2: "latent_h", 3: "latent_w"}
    assert axes["timestep"] == {0: "B"}
    assert axes["text_embeds"] == {0: "B"}
    assert axes["afm_scale"] == {0: "B"}
    for i, level in enumerate(get_preset("tiny").ref_layer_levels):
        for kind in ("key", "value"):
            assert axes[ref_layer_name(kind, i)] == {0: "B", 1: f"tokens_l{level}"}
    assert axes["noise_pred"] == {0: "B", 2: "latent_h", 3: "latent_w"}
    assert set(axes) == set(unet_spec.input_names) | set(unet_spec.output_names)


def test_unet_profile_spans_the_preset_bounds(unet_spec):
    # tiny: sides 64..512 px, default 160 x 128 px, batch 1..16; latents are 1/8 of that
    assert unet_spec.profile()["sample"] == ((1, 5, 8, 8), (2, 5, 20, 16), (16, 5, 64, 64))
    assert unet_spec.profile()["ref_key_06"] == ((1, 1, 64), (2, 6, 64), (16, 64, 64))


@pytest.mark.parametrize("preset_name,component", CASES)
def test_profile_is_ordered_and_equals_the_dim_bounds(preset_name, component):
    spec = refadgen_specs(get_preset(preset_name))[component]
    profile = spec.profile()
    assert set(profile) == set(spec.input_names)
    envs = {point: spec.env_at(point) for point in ("min", "opt", "max")}
    for t in spec.inputs:
        low, opt, high = profile[t.name]
        assert all(a <= b <= c for a, b, c in zip(low, opt, high)), t.name
        for axis, d in enumerate(t.shape):
            if isinstance(d, int):
                expected = (d, d, d)
            elif isinstance(spec.dim(d), Dim):
                expected = (spec.dim(d).min, spec.dim(d).opt, spec.dim(d).max)
            else:
                expected = tuple(spec.dim(d).value(envs[p]) for p in ("min", "opt", "max"))
            assert (low[axis], opt[axis], high[axis]) == expected, (t.name, axis)


@pytest.mark.parametrize("preset_name", PRESETS)
def test_profiles_chain_from_reference_unet_through_afm_kv_to_unet(preset_name):
    # an engine's max profile must admit what the previous engine produces at its max
    specs = refadgen_specs(get_preset(preset_name))
    reference, afm_kv, unet = specs["reference_unet"], specs["afm_kv"], specs["unet"]
    for index, point in enumerate(("min", "opt", "max")):
        produced = {t.name: reference.shape(t, reference.env_at(point)) for t in reference.outputs}
        assert produced == {name: shapes[index] for name, shapes in afm_kv.profile().items()}
        produced = {t.name: afm_kv.shape(t, afm_kv.env_at(point)) for t in afm_kv.outputs}
        assert produced == {name: unet.profile()[name][index] for name in produced}


def test_spec_hash_is_stable_across_calls_and_rebuilds(tiny):
    first = refadgen_specs(tiny)
    second = refadgen_specs(tiny)
    for name in COMPONENTS:
        assert first[name].spec_hash() == first[name].spec_hash() == second[name].spec_hash()


def test_spec_hash_is_stable_across_processes(tiny_specs):
    code = (
        "from runtime.specs.refadgen import refadgen_specs\n"
        "from runtime.presets import get_preset\n"
        "print(refadgen_specs(get_preset('tiny'))['unet'].spec_hash())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == tiny_specs["unet"].spec_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"max_side": 256},
        {"min_side": 128},
        {"default_height": 192},
        {"max_batch": 8},
        {"unet": dataclasses.replace(get_preset("tiny").unet, cross_attention_dim=64)},
        {"unet": dataclasses.replace(get_preset("tiny").unet, block_out_channels=(32, 64, 64, 64))},
    ],
    ids=["max_side", "min_side", "default_height", "max_batch", "cross_attention_dim", "block_out_channels"],
)
def test_spec_hash_changes_when_a_preset_dimension_changes(tiny, tiny_specs, change):
    changed = refadgen_specs(dataclasses.replace(tiny, **change))["unet"]
    assert changed.spec_hash() != tiny_specs["unet"].spec_hash()


def test_spec_hash_changes_with_precision(tiny, tiny_specs):
    fp16 = refadgen_specs(tiny, Precision.FP16)
    for name in COMPONENTS:
        assert fp16[name].spec_hash() != tiny_specs[name].spec_hash(), name


def test_fp16_specs_keep_index_and_scalar_inputs_at_their_own_dtype(tiny):
    unet = refadgen_specs(tiny, Precision.FP16)["unet"]
    assert unet.tensor("sample").dtype is DType.FLOAT16
    assert unet.tensor("noise_pred").dtype is DType.FLOAT16
    assert unet.tensor("timestep").dtype is DType.FLOAT32
    assert unet.tensor("afm_scale").dtype is DType.FLOAT32
    assert refadgen_specs(tiny, Precision.FP16)["text_encoder"].tensor("input_ids").dtype is DType.INT64


def test_sd15_reference_states_at_80x64_latents_match_the_paper():
    b = 2
    expected = (
        [(b, 5120, 320)] * 2 + [(b, 1280, 640)] * 2 + [(b, 320, 1280)] * 2
        + [(b, 80, 1280)]
        + [(b, 320, 1280)] * 3 + [(b, 1280, 640)] * 3 + [(b, 5120, 320)] * 3
    )
    specs = refadgen_specs(get_preset("sd15"))
    reference = specs["reference_unet"]
    env = reference.env_at(B=b, latent_h=80, latent_w=64)
    assert [reference.shape(t, env) for t in reference.outputs] == expected
    unet = specs["unet"]
    keys = [unet.shape(ref_layer_name("key", i), env) for i in range(NUM_REF_LAYERS)]
    values = [unet.shape(ref_layer_name("value", i), env) for i in range(NUM_REF_LAYERS)]
    assert keys == values == expected


def test_derived_dims_round_up_like_a_stride_2_convolution():
    tokens = DerivedDim("tokens", (("h", 1, 4), ("w", 1, 4)))
    assert tokens.value({"h": 9, "w": 8}) == 3 * 2
    image = DerivedDim("height", (("latent_h", 8, 1),))
    assert image.value({"latent_h": 13}) == 104


def test_dim_rejects_unordered_bounds():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("latent_h", 8, 4, 64)


def test_spec_rejects_an_output_with_an_unknown_dim():
    with pytest.raises(ValueError, match=r"^probe\.y: unknown dim 'H'$"):
        ComponentSpec(
            "probe",
            (TensorSpec("x", DType.FLOAT32, ("B",)),),
            (TensorSpec("y", DType.FLOAT32, ("B", "H")),),
            (Dim("B", 1, 1, 2),),
        )


def test_spec_rejects_an_input_with_an_unknown_dim():
    with pytest.raises(ValueError, match=r"^probe\.x: unknown dim 'H'$"):
        ComponentSpec("probe", (TensorSpec("x", DType.FLOAT32, ("B", "H")),), (), (Dim("B", 1, 1, 2),))


def test_spec_rejects_a_base_dim_no_input_binds():
    with pytest.raises(ValueError, match="base dim 'H' appears in no input"):
        ComponentSpec(
            "probe",
            (TensorSpec("x", DType.FLOAT32, ("B",)),),
            (TensorSpec("y", DType.FLOAT32, ("B", "H")),),
            (Dim("B", 1, 1, 2), Dim("H", 1, 1, 2)),
        )
