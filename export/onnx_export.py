"""torch -> ONNX for every component of a pipeline, with a parity check and a manifest.

`export_pipeline` writes `<component>.onnx` (plus `<component>.onnx.data` past 1.8 GB of
weights) for each spec, `parity.json` (per output: max absolute error, max relative error,
cosine similarity against the float32 torch module, pass/fail at the precision's tolerance)
and `manifest.json` (the cache key, spec hashes, graph sizes, export times, peak memory,
library versions). It writes into a
temporary folder renamed into place only when every component passed parity.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from export.graph_passes import (
    EXTERNAL_DATA_THRESHOLD,
    FP32_OPS,
    Cleanup,
    check_io_dtypes,
    load_graph,
    remove_folder,
    save_graph,
    scratch_folder,
    to_float16,
)
from export.graph_passes import cleanup as apply_cleanup
from networks.common.attention import export_attention_as
from networks.common.runner import run_module
from runtime.artifacts.graphs import MANIFEST, PARITY, GraphKey, graph_bytes, graph_path
from runtime.errors import ExportError, ParityError
from runtime.specs.core import AttentionKernel, ComponentSpec, Dim, Precision

Progress = Callable[[str], None]
LIBRARIES = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "numpy", "onnxslim")
DEFAULT_CLEANUP = Cleanup.NONE


@dataclass(frozen=True)
class OutputParity:
    output: str
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|
    cosine: float
    bound: float
    passed: bool


@dataclass(frozen=True)
class ComponentParity:
    component: str
    precision: str
    shapes: dict[str, list[int]]
    outputs: list[OutputParity]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def worst(self) -> OutputParity:
        return max(self.outputs, key=lambda o: o.max_abs / o.bound)


def trace_env(spec: ComponentSpec) -> dict[str, int]:
    """Dims to trace at: opt, nudged to an odd multiple of each dim's granularity.

    Tracing the U-Net at an odd latent size records its upsampling with explicit output sizes,
    so the graph serves every size in bounds (at even sizes it would bake in a factor of 2).
    """
    overrides = {}
    for d in spec.dims:
        if isinstance(d, Dim) and d.name != "B" and (d.opt // d.multiple) % 2 == 0:
            bumped = d.opt + d.multiple
            overrides[d.name] = bumped if bumped <= d.max else d.opt - d.multiple
    return spec.env_at("opt", **overrides)


def export_component(
    module: nn.Module, spec: ComponentSpec, path: Path, opset: int, attention: AttentionKernel = AttentionKernel.ORT
) -> None:
    feed = spec.sample_inputs(np.random.default_rng(0), trace_env(spec))
    args = tuple(torch.from_numpy(feed[name]) for name in spec.input_names)
    with warnings.catch_warnings(), torch.inference_mode(), export_attention_as(attention):
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


@dataclass(frozen=True)
class ParityCase:
    """One parity input: the env, the feed (in the graph's dtypes) and the torch outputs."""

    env: dict[str, int]
    feed: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def reference_cases(module: nn.Module, spec: ComponentSpec, envs: list[Mapping[str, int]] | None = None) -> list[ParityCase]:
    """The float32 module's outputs on random inputs at each env (default: opt, and B=1 at min).
    Computed before the graph is converted, so the module can be freed first. A module whose
    inputs come from another network can say how to draw realistic ones with a `parity_feed(spec,
    env, rng)` attribute (the RADM head: features from the backbone)."""
    envs = envs or [spec.env_at("opt"), spec.env_at("min", B=1)]
    reference = spec.at_float32()
    draw = getattr(module, "parity_feed", None) or (lambda spec, env, rng: spec.sample_inputs(rng, env))
    cases = []
    for i, env in enumerate(envs):
        feed = draw(spec, env, np.random.default_rng(1 + i))
        # The float32 module sees the very values the graph sees (float16 inputs widened).
        cases.append(ParityCase(dict(env), feed, run_module(module, reference, reference.cast_inputs(feed))))
    return cases


def check_parity(
    module: nn.Module, spec: ComponentSpec, path: Path, precision: Precision, envs: list[Mapping[str, int]] | None = None
) -> ComponentParity:
    """Compare the graph at `path` with `module` on random inputs at each env (default: opt, and B=1 at min).

    The reference is always the float32 module; an fp16 graph is held to the fp16 tolerance.
    """
    return compare_graph(spec, path, precision, reference_cases(module, spec, envs))


def compare_graph(spec: ComponentSpec, path: Path, precision: Precision, cases: list[ParityCase]) -> ComponentParity:
    """Run the graph at `path` on each case's feed and judge it against the case's outputs."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types; name the component and graph
        raise ExportError(f"{spec.name}: ONNX Runtime cannot load the exported graph {path}: {e}") from e
    tol = precision.tolerance
    worst: dict[str, OutputParity] = {}
    shapes: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        got = dict(zip(spec.output_names, session.run(list(spec.output_names), case.feed)))
        for name in spec.output_names:
            a, b = got[name].astype(np.float64), case.expected[name].astype(np.float64)
            if a.shape != b.shape:
                raise ParityError(f"{spec.name}.{name}: ONNX shape {a.shape} != torch shape {b.shape} at {case.env}")
            scale = float(np.abs(b).max()) if b.size else 0.0
            max_abs = float(np.abs(a - b).max()) if b.size else 0.0
            denom = float(np.linalg.norm(a) * np.linalg.norm(b))
            cosine = float((a * b).sum() / denom) if denom else 1.0
            bound = tol.bound(scale)
            result = OutputParity(name, max_abs, max_abs / scale if scale else 0.0, cosine, bound, max_abs <= bound)
            previous = worst.get(name)
            if previous is None or result.max_abs / result.bound > previous.max_abs / previous.bound:
                worst[name] = result
        shapes[f"env{i}"] = [case.env[d.name] for d in spec.dims if isinstance(d, Dim)]
    return ComponentParity(spec.name, precision.value, shapes, [worst[n] for n in spec.output_names])


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            found[lib] = "absent"
    return found


def export_pipeline(
    modules: Mapping[str, nn.Module],
    specs: Mapping[str, ComponentSpec],
    key: GraphKey,
    out_dir: Path,
    progress: Progress | None = None,
    cleanup: Cleanup = DEFAULT_CLEANUP,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export every spec'd component into `out_dir` (created; must not exist yet) and return it.

    One component at a time: trace the float32 module and compute its reference outputs, free
    the network (`modules.release()` where the mapping has it, as `networks.build.LazyModules`
    does), clean the graph up, convert it to `key.precision`, save it (external data past
    `external_data_threshold` bytes), check parity, and drop the graph before the next.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        components, parity = {}, {}
        for i, (name, spec) in enumerate(specs.items(), 1):
            say(f"[{i}/{len(specs)}] {name}: exporting ({key.precision.value})")
            started = time.perf_counter()
            path = graph_path(tmp, name)
            scratch = scratch_folder(tmp, name)
            try:
                module = modules[name]
                traced = trace_graph(module, spec, key, scratch)
                started_ref = time.perf_counter()
                cases = reference_cases(module, spec)
                reference_s = time.perf_counter() - started_ref
                # Only the traced graph and the reference outputs go on: the network is freed
                # before conversion and the ONNX Runtime session (full-size graphs, bounded RAM).
                del module
                if hasattr(modules, "release"):
                    modules.release()
                gc.collect()
                external = finish_graph(traced, spec, path, key, scratch, cleanup, external_data_threshold)
                del traced
                gc.collect()
            finally:
                remove_folder(scratch)
            exported = time.perf_counter() - started - reference_s
            started = time.perf_counter()
            result = compare_graph(spec, path, key.precision, cases)
            checked = time.perf_counter() - started + reference_s
            del cases
            worst = result.worst()
            say(
                f"[{i}/{len(specs)}] {name}: {exported:.1f} s, {graph_bytes(path) / 1e6:.1f} MB"
                f"{' (external data)' if external else ''}, parity max abs {worst.max_abs:.2e} "
                f"cosine {min(o.cosine for o in result.outputs):.6f} ({worst.output}) {'ok' if result.passed else 'FAILED'}"
            )
            parity[name] = asdict(result) | {"passed": result.passed}
            components[name] = {
                "spec_hash": spec.spec_hash(),
                "bytes": graph_bytes(path),
                "external_data": external,
                "export_seconds": round(exported, 3),
                "parity_seconds": round(checked, 3),
                "peak_rss_bytes": peak_rss_bytes(),
                "spec": spec.to_dict(),
            }
            if not result.passed:
                (tmp / PARITY).write_text(json.dumps(parity, indent=2))
                raise ParityError(
                    f"{name}.{worst.output}: ONNX vs torch max abs error {worst.max_abs:.3e} exceeds "
                    f"{worst.bound:.3e} for {key.precision.value}"
                )
        (tmp / PARITY).write_text(json.dumps(parity, indent=2))
        manifest = {
            "key": key.to_dict(), "components": components, "versions": library_versions(),
            "cleanup": cleanup.value, "fp32_ops": list(FP32_OPS) if key.precision is Precision.FP16 else [],
            "created": time.time(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_graph(
    module: nn.Module,
    spec: ComponentSpec,
    path: Path,
    key: GraphKey,
    cleanup: Cleanup = DEFAULT_CLEANUP,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> bool:
    """Trace `module` at float32, clean up, convert to `key.precision`, save to `path`.
    Returns whether the weights went to `<path>.data`."""
    scratch = scratch_folder(path.parent, spec.name)
    try:
        return finish_graph(trace_graph(module, spec, key, scratch), spec, path, key, scratch, cleanup, external_data_threshold)
    finally:
        remove_folder(scratch)


def trace_graph(module: nn.Module, spec: ComponentSpec, key: GraphKey, scratch: Path):
    """The float32 ONNX graph of `module`, loaded (with its weights) from a trace in `scratch`."""
    traced = scratch / "traced" / "traced.onnx"  # past 2 GB the exporter scatters one file per weight here
    traced.parent.mkdir()
    try:
        export_component(module, spec.at_float32(), traced, key.opset, key.attention)
    except Exception as e:  # the exporter raises many types; name the component
        raise ExportError(f"{spec.name}: ONNX export failed: {e}") from e
    model = load_graph(traced)
    remove_folder(traced.parent)
    return model


def finish_graph(
    model,
    spec: ComponentSpec,
    path: Path,
    key: GraphKey,
    scratch: Path,
    cleanup: Cleanup = DEFAULT_CLEANUP,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> bool:
    """Clean up, convert to `key.precision`, check I/O dtypes and save `model` to `path`."""
    model = apply_cleanup(model, cleanup, _empty(scratch / "cleanup"))
    if key.precision is Precision.FP16:
        model = to_float16(model, spec, _empty(scratch / "fp16"))
    check_io_dtypes(model, spec)
    return save_graph(model, path, external_data_threshold)


def _empty(folder: Path) -> Path:
    folder.mkdir()
    return folder


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
