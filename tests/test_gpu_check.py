"""benchmarks/gpu_check.py's dry run (tiny, fp32, torch on the CPU): the prepared GPU run walks
the same code here, so it cannot rot between the occasions a GPU is at hand."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_dry_run_writes_every_check_to_json_and_markdown(tmp_path, torch):
    from benchmarks.gpu_check import main

    assert main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1200"]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["name"]: s for s in record["sections"]}
    assert list(sections) == ["pytest -m gpu", "build networks", "guided U-Net+AFM step", "VAE decode",
                              "30-step request", "guided step, onnxruntime", "guided step, torch.compile"]
    assert record["plan"]["preset"] == "tiny" and record["plan"]["device"] == "cpu"
    # the gpu tests were found and run; on the CPU every one of them skips
    assert "skipped" in sections["pytest -m gpu"]["details"]["summary"]
    assert "passed" not in sections["pytest -m gpu"]["details"]["summary"]
    for name in ("guided U-Net+AFM step", "VAE decode", "30-step request", "guided step, onnxruntime"):
        assert sections[name]["status"] == "ok", (name, sections[name]["reason"])
        for row in sections[name]["rows"]:
            assert row["p50_ms"] > 0 and 0 < row["mfu"] < 1, (name, row)
    request = sections["30-step request"]
    assert request["details"]["steps"] == 30 and 0 < request["rows"][0]["stages_s"]["denoise_step_p50"] < request["rows"][0]["stages_s"]["denoise_step"]
    onnx = {row["variant"]: row for row in sections["guided step, onnxruntime"]["rows"]}
    assert onnx["onnxruntime CPU"]["max_abs_diff"] < 1e-3  # the exported graph computes the module's step
    assert sections["guided step, torch.compile"]["status"] == "skipped"
    assert "CUDA only" in sections["guided step, torch.compile"]["reason"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + sum(max(1, len(s["rows"])) for s in record["sections"])  # header + a row per variant


def test_a_check_past_the_budget_is_skipped_with_the_time_left(tmp_path, torch):
    from benchmarks.gpu_check import DRY_PLAN, Plan, Run

    run = Run(Plan(**{**DRY_PLAN.__dict__, "budget_s": 5.0}))
    ran = []
    skipped = run.check("heavy", 60, lambda s: ran.append(s))
    failed = run.check("broken", 0, lambda s: 1 / 0)
    assert not ran and skipped.status == "skipped" and skipped.reason.startswith("needs ~60 s")
    assert failed.status == "failed" and "ZeroDivisionError" in failed.reason
