"""Every component of the pipelines on ONNX Runtime and torch eager, side by side in one run.

    python -m benchmarks.component_backends --preset small --out results.jsonl
    python -m benchmarks.component_backends --preset small --pipeline layout --profile layout_head

For each component, at its spec's `opt` dims with the batch it gets in one request (the call
plan), the two backends are timed interleaved (order rotating, ONNX Runtime's threads not
spinning, both at the library's default thread count). Prints p50 per backend and ORT/torch;
`--profile NAME` also runs ONNX Runtime's profiler on that component and prints the node types
that take the most time. Appends JSON lines (machine, versions, commit, raw samples) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.measure import append_jsonl, interleaved, provenance, seconds_stats
from runtime.artifacts.weights import WeightsSource
from runtime.backends import load_components
from runtime.backends.base import ModelSource
from runtime.pipelines import PIPELINES, get_pipeline
from runtime.presets import PRESETS, get_preset


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def profile_ops(component, feed: dict[str, np.ndarray], runs: int = 3, top: int = 8) -> list[tuple[str, float]]:
    """(node type, share of kernel time) of `runs` calls under ONNX Runtime's profiler."""
    import onnxruntime as ort

    session = component.session
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.intra_op_num_threads = session.get_session_options().intra_op_num_threads
        profiled = ort.InferenceSession(session._model_path, options, providers=session.get_providers())
        for _ in range(runs):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    by_type: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kind = event["args"].get("op_name", "?")
            by_type[kind] = by_type.get(kind, 0.0) + event["dur"]
    total = sum(by_type.values()) or 1.0
    return sorted(((k, v / total) for k, v in by_type.items()), key=lambda kv: -kv[1])[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=tuple(PRESETS))
    parser.add_argument("--pipeline", action="append", choices=tuple(PIPELINES), help="repeat; default all")
    parser.add_argument("--component", action="append", help="only these components (repeat)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--profile", action="append", default=[], help="ORT profile of this component (repeat)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    print("| pipeline | component | batch | onnxruntime p50 ms | torch p50 ms | ORT / torch |")
    print("|---|---|---:|---:|---:|---:|")
    records = []
    for pipeline in args.pipeline or list(PIPELINES):
        definition = get_pipeline(pipeline)
        specs = definition.specs(preset)
        names = [n for n in specs if not args.component or n in args.component]
        if not names:
            continue
        specs = {n: specs[n] for n in names}
        source = ModelSource(pipeline, preset, WeightsSource(), cache_root=args.cache_dir, spin=False)
        backends = {b: load_components(b, specs, source, say) for b in ("onnxruntime", "torch")}
        plan = definition.call_plan(1, 1)
        for name, spec in specs.items():
            env = spec.env_at("opt", B=plan[name].batch if name in plan else 1)
            feed = spec.sample_inputs(np.random.default_rng(0), env)
            calls = {b: (lambda c=components[name]: c.run(feed)) for b, components in backends.items()}
            samples = interleaved(calls, args.warmup, args.iterations)
            stats = {b: seconds_stats(s) for b, s in samples.items()}
            ratio = stats["onnxruntime"]["p50_s"] / stats["torch"]["p50_s"]
            print(f"| {pipeline} | {name} | {env['B']} | {1000 * stats['onnxruntime']['p50_s']:.1f} | "
                  f"{1000 * stats['torch']['p50_s']:.1f} | {ratio:.2f} |", flush=True)
            record = {"benchmark": "component_backends", "pipeline": pipeline, "component": name,
                      "preset": preset.name, "batch": env["B"], "ort_over_torch": ratio,
                      "backends": stats, "spec_hash": spec.spec_hash(), **provenance()}
            if name in args.profile:
                record["ort_profile"] = profile_ops(backends["onnxruntime"][name], feed)
                for kind, share in record["ort_profile"]:
                    print(f"|  | {name} ORT profile | | {kind} | {share:.1%} | |")
            records.append(record)
        for components in backends.values():
            for component in components.values():
                component.close()
    append_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
