"""Per-step latency of a pipeline's denoiser, backends side by side in one run.

    python -m benchmarks.step_latency --preset small --backend onnxruntime --backend torch --iterations 20

Each iteration runs one guided step (batch 2 per request) on every backend in turn, alternating
the order, so machine noise hits all backends alike; warm-up iterations are dropped. ONNX
Runtime's pool threads do not spin unless --spin: spinning steals the cores of the backend
that runs next and inflates the ratio. Prints medians and the ratio to
the first backend, and appends JSON lines (machine, versions, git commit, spec hash, raw samples)
to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.measure import append_jsonl, interleaved, provenance, seconds_stats
from runtime.artifacts.weights import WeightsSource
from runtime.backends import load_components
from runtime.backends.base import ModelSource
from runtime.backends.devices import Device
from runtime.pipelines import get_pipeline
from runtime.presets import PRESETS, get_preset
from runtime.specs.core import Precision
from runtime.specs.guided import guided_name

STEP_COMPONENT = {"refadgen": "unet", "background": "background_unet"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="refadgen", choices=tuple(STEP_COMPONENT))
    parser.add_argument("--preset", default="small", choices=tuple(PRESETS))
    parser.add_argument("--backend", action="append", choices=("onnxruntime", "torch", "tensorrt"), help="repeat to compare")
    parser.add_argument("--engines", type=Path, help="tensorrt backend: a folder made by `adgen engines`")
    parser.add_argument("--requests", type=int, default=1, help="requests per step (network batch = 2 x requests)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="intra-op threads for every backend (default: each library's)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads busy-wait (unfair when interleaved)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="fp16: float16 graphs (onnxruntime) / half module on cuda (torch)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                        help="cuda: ONNX Runtime CUDA provider with IO binding, torch on cuda")
    parser.add_argument("--fused-step", action="store_true", help="time the fused guided-step graph (one call per step)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    backends = args.backend or ["onnxruntime", "torch"]
    if args.threads:
        import torch  # noqa: PLC0415 - only when torch is among the backends' dependencies anyway

        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    precision = Precision(args.precision)
    definition = get_pipeline(args.pipeline)
    specs = definition.fused_specs(preset, precision) if args.fused_step else definition.specs(preset, precision)
    name = guided_name(STEP_COMPONENT[args.pipeline]) if args.fused_step else STEP_COMPONENT[args.pipeline]
    spec = specs[name]
    source = ModelSource(
        args.pipeline, preset, WeightsSource(), cache_root=args.cache_dir, threads=args.threads, spin=args.spin,
        precision=precision, device=Device(args.device), engines_dir=args.engines,
    )
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    runners = {b: load_components(b, specs, source, say)[name] for b in backends}

    env = spec.env_at("opt", B=args.requests if args.fused_step else 2 * args.requests)
    feed = spec.sample_inputs(np.random.default_rng(0), env)
    samples = interleaved({b: (lambda b=b: runners[b].run(feed)) for b in backends}, args.warmup, args.iterations)

    stats = {b: seconds_stats(samples[b]) for b in backends}
    base = stats[backends[0]]["p50_s"]
    print(f"{args.pipeline} {name} step ({precision.value}, {args.device}), preset {preset.name}, batch {env['B']}, latent {env['latent_h']}x{env['latent_w']}, "
          f"{args.iterations} iterations after {args.warmup} warm-up")
    print(f"{'backend':<12} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'speed vs ' + backends[0]:>16}")
    for b, st in stats.items():
        print(f"{b:<12} {1000 * st['p50_s']:9.2f} {1000 * st['p90_s']:9.2f} {1000 * st['min_s']:9.2f} {base / st['p50_s']:15.2f}x")
    records = [{
        "benchmark": "step_latency", "pipeline": args.pipeline, "component": name, "preset": preset.name, "backend": b,
        "precision": precision.value, "device": args.device, "fused_step": args.fused_step, "batch": env["B"],
        "latent": [env["latent_h"], env["latent_w"]], "threads": args.threads, **st, "spec_hash": spec.spec_hash(),
        **provenance(),
    } for b, st in stats.items()]
    append_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
