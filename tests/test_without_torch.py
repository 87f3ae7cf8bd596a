"""Torch-free tests pass on a runtime-only install: a subset of them runs in a subprocess with
ADGEN_TESTS_WITHOUT_TORCH=1 (tests/environment.py hides torch and the rest of the export
extra) and must pass, not skip, while tests that need torch skip there instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from environment import WITHOUT_TORCH

REPO = Path(__file__).resolve().parents[1]

# At least one from each file that used to skip as a whole where torch is missing.
MUST_PASS = (
    "tests/test_schedulers.py::test_sd15_defaults",
    "tests/test_schedulers.py::test_batch_items_are_independent[dpm++]",
    "tests/test_schedulers.py::test_step_before_set_timesteps[ddim]",
    "tests/test_weights.py::test_folder_fingerprint_separates_file_boundaries",
    "tests/test_weights.py::test_fingerprint_refuses_a_pickled_folder",
    "tests/test_weights.py::test_random_init_fingerprint_depends_on_seed_and_preset",
    "tests/test_presets.py::test_unknown_preset_is_an_input_error_naming_the_presets",
    "tests/test_presets.py::test_every_preset_default_canvas_lies_in_its_bounds_on_the_vae_grid[sd15]",
    "tests/test_export.py::test_cache_key_changes_with_weights_and_specs",
    "tests/test_export_fp16.py::test_missing_provider_names_what_is_available",
    "tests/test_export_fp16.py::test_precision_changes_spec_hashes_and_cache_key",
    "tests/test_poster_networks.py::test_poster_unet_takes_exactly_the_controlnet_residuals",
    "tests/test_bench.py::test_report_refuses_records_it_cannot_read",
    "tests/test_specs.py::test_validate_inputs_accepts_sample_inputs_and_binds_their_dims[tiny-unet]",
)
# Each needs torch (or diffusers) by another route: the `torch` fixture, a fixture chain down
# to the tiny networks, a helper's importorskip.
MUST_SKIP = (
    "tests/test_presets.py::test_sd15_sizes_equal_stable_diffusion_15",
    "tests/test_layout_networks.py::test_fpn_level_rule",
    "tests/test_export.py::test_manifest_records_key_spec_hashes_and_versions",
    "tests/test_weights.py::test_missing_folder_is_a_weights_error",
    "tests/test_schedulers.py::test_alphas_cumprod_match_diffusers[linear]",
)


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test id (file::name) -> (passed, skipped, failure or error; message), from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname").replace(".", "/") + ".py"
        ends = [child for child in case if child.tag in ("skipped", "failure", "error")]
        outcomes[f"{path}::{case.get('name')}"] = (ends[0].tag, ends[0].get("message", "")) if ends else ("passed", "")
    return outcomes


def test_torch_free_tests_pass_with_torch_hidden(tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *MUST_PASS, *MUST_SKIP],
        cwd=REPO, env={**os.environ, WITHOUT_TORCH: "1"}, capture_output=True, text=True, timeout=300,
    )
    assert junit.exists(), proc.stdout + proc.stderr
    outcomes = _outcomes(junit)
    report = proc.stdout[-3000:]
    assert {test: outcomes.get(test, ("missing",))[0] for test in MUST_PASS} == dict.fromkeys(MUST_PASS, "passed"), report
    assert {test: outcomes.get(test, ("missing",))[0] for test in MUST_SKIP} == dict.fromkeys(MUST_SKIP, "skipped"), report
    for test in MUST_SKIP:  # skipped because the blocker hid a package, not for another reason
        assert f"{WITHOUT_TORCH}=1 hides it" in outcomes[test][1], (test, outcomes[test][1])
    assert proc.returncode == 0, report
