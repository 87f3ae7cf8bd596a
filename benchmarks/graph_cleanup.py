"""Effect of graph clean-up on ONNX Runtime CPU step time: every option on the same traced
graph, sessions interleaved in one run.

    python -m benchmarks.graph_cleanup --preset small --component unet --iterations 20

Traces the component once (float32), applies each clean-up (none, ORT basic offline
optimizer, onnxslim), and for each reports node count, file size, session load time,
max |difference| from the un-cleaned graph, and step time (p50, p90) with the order of the
sessions rotated every iteration. Appends JSON lines (machine, versions, git commit, spec hash,
raw samples) to --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import append_jsonl, interleaved, provenance, seconds_stats
from runtime.artifacts.weights import WeightsSource
from runtime.pipelines import get_pipeline
from runtime.presets import PRESETS, get_preset
from runtime.specs.core import AttentionKernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="refadgen")
    parser.add_argument("--preset", default="small", choices=tuple(PRESETS))
    parser.add_argument("--component", default="unet")
    parser.add_argument("--attention", default="ort", choices=("ort", "onnx"))
    parser.add_argument("--cleanup", action="append", choices=("none", "ort-basic", "onnxslim"), help="repeat; default all")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from export.graph_passes import Cleanup, cleanup, load_graph, save_graph
    from export.onnx_export import export_component
    from networks.registry import LazyModules

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    preset = get_preset(args.preset)
    spec = get_pipeline(args.pipeline).specs(preset)[args.component]
    options = [Cleanup(c) for c in (args.cleanup or [c.value for c in Cleanup])]
    work = Path(tempfile.mkdtemp(prefix="adgen-cleanup-"))
    say(f"tracing {args.component} ({preset.name})")
    traced = work / "traced.onnx"
    export_component(LazyModules(args.pipeline, preset, WeightsSource())[args.component], spec, traced, 17,
                     AttentionKernel(args.attention))
    base = load_graph(traced)
    sessions, info = {}, {}
    for option in options:
        started = time.perf_counter()
        scratch = work / f"scratch-{option.value}"
        scratch.mkdir()
        model = cleanup(copy.deepcopy(base), option, scratch)
        cleanup_s = time.perf_counter() - started
        path = work / f"{option.value}.onnx"
        save_graph(model, path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what the runtime uses
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if args.threads:
            so.intra_op_num_threads = args.threads
        started = time.perf_counter()
        sessions[option] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        info[option] = {"nodes": len(model.graph.node), "bytes": path.stat().st_size,
                        "cleanup_s": cleanup_s, "load_s": time.perf_counter() - started}
        say(f"{option.value}: {info[option]['nodes']} nodes, {info[option]['bytes'] / 1e6:.1f} MB")

    env = spec.env_at("opt")
    feed = spec.sample_inputs(np.random.default_rng(0), env)
    reference = sessions[options[0]].run(None, feed)
    for option in options:
        out = sessions[option].run(None, feed)
        info[option]["max_abs_vs_" + options[0].value] = max(float(np.abs(a - b).max()) for a, b in zip(out, reference))
    samples = interleaved({o: (lambda o=o: sessions[o].run(None, feed)) for o in options}, args.warmup, args.iterations)

    stats = {o: seconds_stats(samples[o]) for o in options}
    base_p50 = stats[options[0]]["p50_s"]
    print(f"{args.component} ({preset.name}, attention {args.attention}), batch {env['B']}, latent {env['latent_h']}x{env['latent_w']}, "
          f"ORT CPU, {args.iterations} iterations after {args.warmup} warm-up")
    print(f"{'cleanup':<10} {'nodes':>6} {'MB':>7} {'load s':>7} {'p50 ms':>8} {'p90 ms':>8} {'vs ' + options[0].value:>9} {'max|d|':>9}")
    for option, st in stats.items():
        i = info[option]
        print(f"{option.value:<10} {i['nodes']:>6} {i['bytes'] / 1e6:>7.1f} {i['load_s']:>7.2f} {1000 * st['p50_s']:>8.2f} "
              f"{1000 * st['p90_s']:>8.2f} {base_p50 / st['p50_s']:>8.3f}x {i['max_abs_vs_' + options[0].value]:>9.2e}")
    records = [{
        "benchmark": "graph_cleanup", "pipeline": args.pipeline, "component": args.component, "preset": preset.name,
        "attention": args.attention, "cleanup": option.value, **info[option], **st, "batch": env["B"],
        "latent": [env["latent_h"], env["latent_w"]], "threads": args.threads, "spec_hash": spec.spec_hash(), **provenance(),
    } for option, st in stats.items()]
    append_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
