"""One prepared GPU run: everything this project claims about GPUs, measured by one command that
finishes within a time budget (9 minutes by default) and writes JSON and a Markdown table.

    python -m benchmarks.gpu_check --out gpu-check             # a machine with one NVIDIA GPU: sd15, fp16, cuda
    python -m benchmarks.gpu_check --dry-run --out gpu-check   # any machine: tiny, fp32, torch on the CPU

The dry run walks the same code at tiny sizes (CI runs it: tests/test_gpu_check.py), so the GPU
run cannot rot between the rare occasions a GPU is at hand. Its figures mean nothing.

Checks, in order, each skipped (with the reason) when the budget left is below its estimate, and
each recorded as ok / skipped / failed without stopping the others:
  1. `pytest -m gpu` over the test files that carry the mark;
  2. the RefAdGen guided denoising step (U-Net with the AFM's reference keys/values, both guidance
     halves in one call) at the preset's canvas (sd15: 512x640): torch eager, the same module
     replayed from CUDA graphs, ONNX Runtime's CUDA provider where onnxruntime-gpu is installed
     (on the dry run: its CPU provider), with MFU against the device's dense fp16 peak;
  3. the VAE decoder: eager and CUDA graphs;
  4. a full 30-step RefAdGen request end to end (eager and CUDA graphs, same networks), MFU;
  5. torch.compile of the guided step (last: compiling takes minutes), where time is left.
Peak device memory (torch's allocator) is recorded per check.

Wheels a GPU machine without network lacks (diffusers, transformers at this project's pins, this
project) are prepared here by one command; docs/performance.md has the lines that install them
there:

    bash benchmarks/gpu_wheels.sh .whl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.harness import own_peak_rss_mb
from benchmarks.measure import interleaved, provenance, seconds_stats
from runtime.backends.devices import Device
from runtime.specs.core import Precision
from runtime.specs.guided import guided_name

PIPELINE = "refadgen"
STEP = guided_name("unet")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    preset: str
    precision: Precision
    device: Device
    steps: int = 30  # denoising steps of the end-to-end request
    iterations: int = 20  # timed calls per variant (component checks)
    warmup: int = 3
    requests: int = 3  # timed end-to-end requests per variant
    budget_s: float = 540.0  # the whole run, setup included


GPU_PLAN = Plan("sd15", Precision.FP16, Device.CUDA)
DRY_PLAN = Plan("tiny", Precision.FP32, Device.CPU, iterations=3, warmup=1, requests=1, budget_s=300.0)


class Skip(Exception):
    """A check that cannot run here; the message says why."""


@dataclass
class Section:
    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    peak_device_mib: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per variant: figures
    details: dict[str, Any] = field(default_factory=dict)


class Run:
    """Runs checks against one deadline and collects their sections."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.started = time.monotonic()
        self.sections: list[Section] = []

    def left_s(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def check(self, name: str, needs_s: float, body: Callable[[Section], None]) -> Section:
        section = Section(name)
        self.sections.append(section)
        if self.left_s() < needs_s:
            section.status, section.reason = "skipped", f"needs ~{needs_s:.0f} s, {max(0.0, self.left_s()):.0f} s left"
            return section
        torch = _torch_cuda()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        try:
            body(section)
        except Skip as e:
            section.status, section.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - a failed check is recorded; the others still run
            section.status, section.reason = "failed", f"{type(e).__name__}: {e}"
            section.details["traceback"] = traceback.format_exc(limit=8)
        section.seconds = round(time.monotonic() - started, 3)
        if torch is not None:
            section.peak_device_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(f"[{section.status}] {name} ({section.seconds:.1f} s){': ' + section.reason if section.reason else ''}",
              file=sys.stderr, flush=True)
        return section


def _torch_cuda():
    """torch when it is imported and sees a CUDA device, else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def _sync() -> None:
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- checks


def gpu_test_files() -> list[str]:
    """Test files that carry `pytest.mark.gpu` (files that do not are never imported: they may
    need packages a GPU machine lacks, such as the Triton server)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def check_pytest(section: Section, timeout_s: float) -> None:
    files = gpu_test_files()
    if not files:
        raise RuntimeError("no test file carries pytest.mark.gpu")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *files]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pytest -m gpu ran past {timeout_s:.0f} s") from e
    summary = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    section.details.update(command=" ".join(command[1:]), returncode=done.returncode, summary=summary[0],
                           output_tail=done.stdout[-3000:] + done.stderr[-1000:])
    section.rows.append({"variant": "pytest -m gpu", "result": summary[0]})
    # exit code 5 (no test selected) fails too: the mark must select something
    if done.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {summary[0]}")


class Networks:
    """The RefAdGen components on the torch backend, built once (random weights: nothing is
    fetched), and the same modules replayed from CUDA graphs."""

    def __init__(self, plan: Plan, say: Callable[[str], None]):
        from runtime.artifacts.weights import WeightsSource
        from runtime.backends import load_components
        from runtime.backends.base import ModelSource
        from runtime.pipelines import get_pipeline
        from runtime.presets import get_preset

        self.plan = plan
        self.preset = get_preset(plan.preset)
        self.definition = get_pipeline(PIPELINE)
        self.specs = self.definition.fused_specs(self.preset, plan.precision)
        self.source = ModelSource(PIPELINE, self.preset, WeightsSource(), precision=plan.precision, device=plan.device)
        started = time.perf_counter()
        self.eager = load_components("torch", self.specs, self.source, say)
        self.build_s = time.perf_counter() - started
        self.graphed = None
        if plan.device is Device.CUDA:
            from runtime.backends.torch import TorchComponent

            self.graphed = {name: TorchComponent(c.spec, c.module, threading.Lock(), cuda_graphs=True)
                            for name, c in self.eager.items()}

    def variants(self, name: str) -> dict[str, Any]:
        runs = {"torch eager": self.eager[name]}
        if self.graphed is not None:
            runs["torch CUDA graphs"] = self.graphed[name]
        return runs

    def feed(self, name: str, **dims: int) -> dict[str, np.ndarray]:
        spec = self.specs[name]
        return spec.sample_inputs(np.random.default_rng(0), spec.env_at("opt", **dims))


def time_variants(section: Section, plan: Plan, runs: dict[str, Any], feed: dict, flops: int | None,
                  peak: tuple[float, str]) -> None:
    """Time `runs` (components) interleaved on one feed; rows with p50, ratio to the first, MFU;
    each variant's output compared with the first's."""
    outputs = {}
    for name, component in runs.items():
        outputs[name] = component.run(feed)
        _sync()
    calls = {name: (lambda c=component: (c.run(feed), _sync())) for name, component in runs.items()}
    samples = interleaved(calls, plan.warmup, plan.iterations)
    first = next(iter(runs))
    base = float(np.median(samples[first]))
    for name in runs:
        stats = seconds_stats(samples[name])
        row = {"variant": name, "p50_ms": 1000 * stats["p50_s"], "p90_ms": 1000 * stats["p90_s"],
               "min_ms": 1000 * stats["min_s"], "speedup": base / stats["p50_s"],
               "max_abs_diff": _max_diff(outputs[first], outputs[name])}
        if flops:
            row["tflops"] = flops / stats["p50_s"] / 1e12
            row["mfu"] = flops / stats["p50_s"] / peak[0]
        section.rows.append(row)
    section.details.update(flops=flops, peak_flops=peak[0], peak_source=peak[1],
                           samples_ms={n: [1000 * s for s in v] for n, v in samples.items()})


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) for k in a)


def step_flops(networks: Networks, name: str, batch: int) -> int | None:
    """FLOPs of one call of a per-call component (the guided step: the U-Net at 2B plus the
    guidance combine, counted as the U-Net's)."""
    from benchmarks.flops import component_flops

    base = "unet" if name == STEP else name
    specs = networks.definition.specs(networks.preset, networks.plan.precision)
    spec = specs[base]
    env = spec.env_at("opt", B=batch)
    return component_flops(PIPELINE, networks.preset, {base: spec}, {base: env})[base]


def check_onnxruntime(section: Section, networks: Networks, plan: Plan, cache: Path,
                      flops: int | None, peak: tuple[float, str]) -> None:
    """The guided step on ONNX Runtime next to torch eager: CUDA provider with IO binding on a GPU
    (needs onnxruntime-gpu), the CPU provider on the dry run."""
    import onnxruntime as ort

    from runtime.backends import load_components

    if plan.device is Device.CUDA and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime-gpu not installed (onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())})")
    source = replace(networks.source, cache_root=cache, spin=False)  # idle pool threads would steal torch's cores
    ort_step = load_components("onnxruntime", {STEP: networks.specs[STEP]}, source, None)[STEP]
    label = "onnxruntime CUDA" if plan.device is Device.CUDA else "onnxruntime CPU"
    time_variants(section, plan, {"torch eager": networks.eager[STEP], label: ort_step},
                  networks.feed(STEP, B=1), flops, peak)


def check_request(section: Section, networks: Networks, plan: Plan, work: Path, peak: tuple[float, str]) -> None:
    """A full request (all stages, `plan.steps` guided steps) on eager and graphed components."""
    from benchmarks.flops import component_flops

    definition, preset = networks.definition, networks.preset
    options = {**definition.example_options(work, preset), definition.steps_option: plan.steps}
    prepared = definition.prepare(preset, **options)
    runners = {"torch eager": definition.create(networks.eager, preset, networks.source.weights)}
    if networks.graphed is not None:
        runners["torch CUDA graphs"] = definition.create(networks.graphed, preset, networks.source.weights)
    images, timings = {}, {}

    def request(name: str) -> None:
        result = definition.run(runners[name], prepared)
        images[name] = np.asarray(result.image, dtype=np.float32)
        timings.setdefault(name, []).append(result.report["timings_s"])

    for name in runners:  # first requests: captures, tokenizer, lazy state
        request(name)
    timings.clear()
    samples = interleaved({name: (lambda n=name: request(n)) for name in runners}, 0, plan.requests)

    specs = definition.specs(preset, plan.precision)
    plan_calls = definition.call_plan(1, plan.steps)
    envs = {name: specs[name].env_at("opt", B=call.batch) for name, call in plan_calls.items()}
    per_call = component_flops(PIPELINE, preset, {n: specs[n] for n in plan_calls}, envs)
    total = sum(per_call[name] * call.calls for name, call in plan_calls.items())
    first = next(iter(runners))
    base = float(np.median(samples[first]))
    for name in runners:
        stats = seconds_stats(samples[name])
        # repeated stages (the denoising steps) as their total and per-step median
        stages: dict[str, float] = {}
        for stage, value in timings[name][-1].items():
            if isinstance(value, dict):
                stages[stage], stages[f"{stage}_p50"] = value["total"], value["p50"]
            else:
                stages[stage] = value
        section.rows.append({
            "variant": name, "p50_ms": 1000 * stats["p50_s"], "min_ms": 1000 * stats["min_s"],
            "speedup": base / stats["p50_s"], "images_per_s": 1 / stats["p50_s"],
            "tflops": total / stats["p50_s"] / 1e12, "mfu": total / stats["p50_s"] / peak[0],
            "max_abs_diff": float(np.abs(images[first] - images[name]).max()), "stages_s": stages,
        })
    section.details.update(steps=plan.steps, flops=total, canvas=[options.get("width"), options.get("height")],
                           samples_ms={n: [1000 * s for s in v] for n, v in samples.items()})


def check_compile(section: Section, networks: Networks, plan: Plan, flops: int | None, peak: tuple[float, str]) -> None:
    if plan.device is not Device.CUDA:
        raise Skip("torch.compile is timed on CUDA only (on the CPU it needs a C++ toolchain and minutes)")
    import torch

    from networks.common.runner import run_module
    from runtime.backends.base import Component

    eager = networks.eager[STEP]
    compiled_module = torch.compile(eager.module, mode="max-autotune-no-cudagraphs", dynamic=False)

    class Compiled(Component):
        def _run(self, feed):
            return run_module(compiled_module, self.spec, feed, eager.held)

    started = time.perf_counter()
    compiled = Compiled(eager.spec)
    compiled.run(networks.feed(STEP, B=1))
    _sync()
    section.details["compile_s"] = time.perf_counter() - started
    time_variants(section, plan, {"torch eager": eager, "torch.compile": compiled}, networks.feed(STEP, B=1), flops, peak)


# ---------------------------------------------------------------------------------------- report


def markdown(plan: Plan, sections: list[Section], meta: dict[str, Any]) -> str:
    lines = [
        f"# GPU check: {meta['device']}, preset {plan.preset}, {plan.precision.value}",
        "",
        f"commit {meta['git_commit']}, torch {meta['versions'].get('torch', '-')}, "
        f"onnxruntime {meta['versions'].get('onnxruntime-gpu') or meta['versions'].get('onnxruntime', '-')}; "
        f"MFU against {meta['peak_source']} ({meta['peak_flops'] / 1e12:.3g} TFLOP/s). "
        f"{'DRY RUN: these figures mean nothing.' if plan.device is Device.CPU else ''}",
        "",
        "| check | variant | p50 ms | min ms | vs first | TFLOP/s | MFU | max abs diff | peak device MiB | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in sections:
        rows = s.rows or [{"variant": "-"}]
        for row in rows:
            lines.append("| " + " | ".join([
                s.name, str(row.get("variant", "-")), _fmt(row.get("p50_ms")), _fmt(row.get("min_ms")),
                _fmt(row.get("speedup"), "{:.2f}x"), _fmt(row.get("tflops"), "{:.3g}"), _fmt(row.get("mfu"), "{:.1%}"),
                _fmt(row.get("max_abs_diff"), "{:.2g}"), _fmt(s.peak_device_mib, "{:.0f}"),
                s.status + (f": {s.reason}" if s.reason else "") + (f" ({row['result']})" if "result" in row else ""),
            ]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, fp32, torch on the CPU (what CI runs)")
    parser.add_argument("--budget-s", type=float, help="the whole run's time budget (default: 540 on a GPU, 300 dry)")
    parser.add_argument("--no-pytest", action="store_true", help="leave out `pytest -m gpu`")
    args = parser.parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget_s:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget_s})
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(plan)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            say(f"torch {torch.__version__} sees no CUDA device: use --dry-run on a machine without one")
            return 2
    if not args.no_pytest:
        run.check("pytest -m gpu", 30, lambda s: check_pytest(s, timeout_s=min(180.0, run.left_s() - 60)))

    from benchmarks.flops import device_peak
    from benchmarks.measure import device_name

    networks: list[Networks] = []
    run.check("build networks", 60, lambda s: networks.append(Networks(plan, say)))
    peak = device_peak(device_name())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if networks:
            nets = networks[0]
            run.sections[-1].details["build_s"] = nets.build_s
            flops_step = step_flops(nets, STEP, 2)
            flops_vae = step_flops(nets, "vae_decoder", 1)
            run.check("guided U-Net+AFM step", 20, lambda s: time_variants(
                s, plan, nets.variants(STEP), nets.feed(STEP, B=1), flops_step, peak))
            run.check("VAE decode", 10, lambda s: time_variants(
                s, plan, nets.variants("vae_decoder"), nets.feed("vae_decoder", B=1), flops_vae, peak))
            run.check(f"{plan.steps}-step request", 30, lambda s: check_request(s, nets, plan, work, peak))
            run.check("guided step, onnxruntime", 150, lambda s: check_onnxruntime(
                s, nets, plan, work / "cache", flops_step, peak))
            run.check("guided step, torch.compile", 200, lambda s: check_compile(s, nets, plan, flops_step, peak))

    origin = provenance()
    meta = {**origin, "device": device_name(), "versions": origin["machine"]["versions"],
            "peak_flops": peak[0], "peak_source": peak[1], "peak_host_rss_mib": own_peak_rss_mb(),
            "total_s": round(time.monotonic() - run.started, 1)}
    record = {"benchmark": "gpu_check", "plan": {**asdict(plan), "precision": plan.precision.value,
                                                  "device": plan.device.value}, **meta,
              "sections": [asdict(s) for s in run.sections]}
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    table = markdown(plan, run.sections, meta)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    failed = [s.name for s in run.sections if s.status == "failed"]
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
