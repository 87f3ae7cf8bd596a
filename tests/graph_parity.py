"""Parity as the tests compute it: an exported graph run by ONNX Runtime against the float32
torch module on the same inputs, held to the precision's tolerance.

It shares nothing with the exporter's own check (`export.onnx_export.compare_graph`) nor with
the parity.json that check writes, which exists only when the check passed: reading it back
cannot fail. Inputs are drawn as export draws them (the spec's sample inputs, or the module's
`parity_feed` where it has one: the layout head takes real backbone features) but from other
seeds, so the graph is judged on values its export never saw.

Importing this module needs no torch; calling `graph_errors` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from runtime.artifacts.graphs import PARITY
from runtime.specs.core import ComponentSpec, Precision

SEED = 1000  # export draws from seeds 1, 2, ...


@dataclass(frozen=True)
class OutputError:
    """One output of one feed: the largest |graph - torch| and the bound it must stay under."""

    component: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    reference_scale: float  # max |torch|
    bound: float
    cosine: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.bound

    def __str__(self) -> str:
        return (f"{self.component}.{self.output} at {self.shape}: max abs {self.max_abs:.3e} "
                f"(bound {self.bound:.3e}), cosine {self.cosine:.6f}")


def default_envs(spec: ComponentSpec) -> list[dict[str, int]]:
    """Two shapes: every dim at opt, and every dim at min with a batch of one."""
    return [spec.env_at("opt"), spec.env_at("min", B=1)]


def draw_feeds(module, spec: ComponentSpec, envs: Sequence[Mapping[str, int]], seed: int = SEED) -> list[dict[str, np.ndarray]]:
    draw = getattr(module, "parity_feed", None)
    feeds = []
    for i, env in enumerate(envs):
        rng = np.random.default_rng(seed + i)
        feeds.append(draw(spec, dict(env), rng) if draw else spec.sample_inputs(rng, env))
    return feeds


def graph_errors(
    path: Path,
    module,
    spec: ComponentSpec,
    precision: Precision,
    envs: Sequence[Mapping[str, int]] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> list[OutputError]:
    """Run the graph at `path` and `module` on each feed (drawn at `envs`, default `default_envs`)
    and measure every output. The graph gets the feed in the spec's dtypes (float16 for an fp16
    spec), the module the same values widened to float32."""
    from networks.common.runner import run_module

    if feeds is None:
        feeds = draw_feeds(module, spec, envs if envs is not None else default_envs(spec))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = spec.at_float32()
    tolerance = precision.tolerance
    errors = []
    for feed in feeds:
        env = spec.validate_inputs(feed)
        got = dict(zip(spec.output_names, session.run(list(spec.output_names), dict(feed))))
        spec.validate_outputs(got, env)
        expected = run_module(module, reference, reference.cast_inputs(feed))
        for name in spec.output_names:
            a, b = got[name].astype(np.float64), expected[name].astype(np.float64)
            scale = float(np.abs(b).max())
            norms = float(np.linalg.norm(a) * np.linalg.norm(b))
            errors.append(OutputError(
                spec.name, name, tuple(a.shape), float(np.abs(a - b).max()), scale, tolerance.bound(scale),
                float((a * b).sum() / norms) if norms else float(np.array_equal(a, b)),
            ))
    return errors


MIN_COSINE = {Precision.FP32: 0.9999, Precision.FP16: 0.999}  # beside the max-abs bound: the direction agrees


def assert_graph_matches_module(path: Path, module, spec: ComponentSpec, precision: Precision, **kwargs) -> list[OutputError]:
    """`graph_errors`, failing with every output past its bound or below the precision's cosine
    similarity; returns them all for further checks."""
    errors = graph_errors(path, module, spec, precision, **kwargs)
    failed = [str(e) for e in errors if not e.passed or e.cosine <= MIN_COSINE[precision]]
    assert not failed, f"{spec.name} ({precision.value}) disagrees with torch:\n" + "\n".join(failed)
    return errors


REPORT_OUTPUT_FIELDS = {"output": str, "max_abs": float, "max_rel": float, "cosine": float, "bound": float, "passed": bool}


def assert_parity_report_format(folder: Path, specs: Mapping[str, ComponentSpec], precision: Precision) -> None:
    """parity.json as a report: one entry per component with its precision, the shapes it was
    checked at and one consistent record per output. Not a parity check (see the module docstring)."""
    report = json.loads((folder / PARITY).read_text())
    assert list(report) == list(specs)
    for name, spec in specs.items():
        entry = report[name]
        assert (entry["component"], entry["precision"]) == (name, precision.value)
        assert len(entry["shapes"]) == 2 and all(isinstance(v, int) for s in entry["shapes"].values() for v in s)
        assert [o["output"] for o in entry["outputs"]] == list(spec.output_names)
        for output in entry["outputs"]:
            assert {k: type(v) for k, v in output.items()} == REPORT_OUTPUT_FIELDS, output
            assert output["passed"] == (output["max_abs"] <= output["bound"]), output
            assert output["bound"] >= precision.tolerance.atol, output
        assert entry["passed"] == all(o["passed"] for o in entry["outputs"])
