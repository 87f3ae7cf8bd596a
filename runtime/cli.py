"""`adgen`: generate ads and export graphs from the command line.

    adgen generate --pipeline refadgen --product shoe.png --prompt "a sneaker on a wooden table" --out ad.png
    adgen export --pipeline refadgen --preset tiny --out build/
    adgen serve --pipeline refadgen --preset tiny       # tritonserver; then generate ... --server HOST:PORT
    adgen engines --onnx build/ --out engines/        # where TensorRT is installed
    adgen import refadgen --checkpoint mp_rank_00_model_states.pt --base SD --vae VAE --image-encoder ENC --out weights/

Errors a user can cause print one line naming the field and the rule, and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from runtime.errors import AdgenError, InputError
from runtime.pipelines import PIPELINES, get_pipeline
from runtime.pipelines.base import GenerateResult, PipelineDefinition
from runtime.pipelines.options import OPTIONS, add_option_arguments
from runtime.presets import PRESETS, get_preset
from runtime.serving.names import ADMIN_HEADER, ADMIN_KEY_ENV
from runtime.specs.core import Precision

BACKEND_CHOICES = ("onnxruntime", "torch", "triton", "tensorrt")
DEFAULT_PRESET = "tiny"


class TerminalProgress:
    """Progress on stderr: one updating line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def step(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            end = "\n" if done == total else ""
            print(f"\rdenoising {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif done == total:
            print(f"denoised {total} steps", file=sys.stderr, flush=True)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="refadgen", choices=tuple(PIPELINES), help="which pipeline (default refadgen)")
    _source_arguments(parser)
    parser.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    """Which networks: their sizes, where their weights come from, where their graphs are cached."""
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS), help=f"network sizes (default {DEFAULT_PRESET})")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder from `adgen import` (its configs set the networks' sizes); default: random init")
    parser.add_argument("--allow-random", action="append", default=[], metavar="PART",
                        help="with --weights: run PART randomly initialised where the folder has none (repeat per part)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the random initialisation (no --weights)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="exported-graph cache (default $ADGEN_CACHE or ~/.cache/adgen)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adgen", description="Ad-image diffusion runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make an ad image from a product photo", argument_default=argparse.SUPPRESS)
    _model_arguments(gen)
    gen.set_defaults(preset=None)  # not given: --server takes the server's preset, the rest DEFAULT_PRESET
    gen.add_argument("--out", type=Path, required=True, help="output PNG; the report goes beside it as .json")
    gen.add_argument("--backend", default="onnxruntime", choices=BACKEND_CHOICES)
    gen.add_argument("--graphs", type=Path, default=None, help="use this folder from `adgen export` instead of the cache")
    gen.add_argument("--engines", type=Path, default=None, help="tensorrt backend: a folder made by `adgen engines`")
    gen.add_argument("--fused-step", action="store_true", default=False,
                     help="run each denoising step as one guided-step graph (both guidance halves inside)")
    gen.add_argument("--cuda-graphs", action="store_true", default=False,
                     help="tensorrt and torch (--device cuda) backends: replay each shape set from a captured CUDA graph")
    gen.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    gen.add_argument("--url", default=None, help="--backend triton: the server (host:port gRPC, or http://host:port)")
    gen.add_argument("--server", default=None, help="run the whole pipeline in this Triton server (host:port gRPC, or http://...)")
    gen.add_argument("--precision", default="fp32", choices=tuple(p.value for p in Precision),
                     help="graphs' precision (fp16: float16 graphs from `adgen export --precision fp16`)")
    gen.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                     help="cpu (default); cuda: ONNX Runtime's CUDA provider with IO binding, or torch on cuda; "
                          "tensorrt: ONNX Runtime's TensorRT provider")
    gen.add_argument("--debug", action="store_true", default=False,
                     help="add this machine's Python, processor and library versions to the report")
    options = set().union(*(get_pipeline(name).options for name in PIPELINES))
    add_option_arguments(gen.add_argument_group("request (each pipeline reads some of these)"), options)

    exp = sub.add_parser("export", help="export a pipeline's components to ONNX with a parity report")
    _model_arguments(exp)
    exp.add_argument("--out", type=Path, required=True, help="new folder for the graphs, parity.json and manifest.json")
    exp.add_argument("--precision", default="fp32", choices=tuple(p.value for p in Precision),
                     help="fp16: float16 weights and ops, normalizations and softmax kept float32")
    exp.add_argument("--fused-step", action="store_true", default=False,
                     help="export the per-step component as one guided-step graph (2B batch and guidance inside)")
    exp.add_argument("--cleanup", default=None, choices=("none", "ort-basic", "onnxslim"),
                     help="graph clean-up before saving (default: the exporter's, see docs/export.md)")
    exp.add_argument(
        "--attention", default="ort", choices=("ort", "onnx"),
        help="ort: fused com.microsoft.MultiHeadAttention (ONNX Runtime); onnx: portable MatMul/Softmax (TensorRT, others)",
    )
    bench = sub.add_parser("bench", help="latency benchmark: scenarios of backend x placement x batch x concurrency")
    try:
        from benchmarks.harness import add_arguments as add_bench_arguments
    except ImportError:  # installed without the benchmarks package
        add_bench_arguments = None
    if add_bench_arguments:
        add_bench_arguments(bench)

    _import_arguments(sub.add_parser(
        "import", help="convert trained checkpoints into an adgen weights folder (the only command that reads pickles)"
    ))

    perf = sub.add_parser("perf-inputs", help="perf_analyzer --input-data JSON for a served model, from its spec")
    perf.add_argument("model", help="a served model: a pipeline (refadgen) or a component (refadgen_unet)")
    _source_arguments(perf)
    perf.add_argument("--steps", type=int, default=None, help="pipeline models: denoising steps of the request")
    perf.add_argument("--seed", type=int, default=0, help="component models: seed of the input values")
    perf.add_argument("--out", type=Path, required=True, help="JSON file to write")
    perf.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")

    srv = sub.add_parser("serve", help="serve pipelines with tritonserver until Ctrl-C")
    _serve_arguments(srv)

    eng = sub.add_parser("engines", help="build TensorRT engines from an `adgen export --attention onnx` folder")
    eng.add_argument("--onnx", type=Path, required=True, help="folder made by `adgen export --attention onnx`")
    eng.add_argument("--out", type=Path, required=True, help="engines folder (engines are keyed per GPU; existing ones are kept)")
    eng.add_argument("--weights", type=Path, default=None,
                     help="the weights folder the graphs were exported from (its configs set the architecture)")
    eng.add_argument("--sizes", default=None,
                     help="fixed ad canvases WxH[,WxH...]: one static-size profile each (default: the specs' dynamic range)")
    eng.add_argument("--fp16-tactics", action="store_true", default=False,
                     help="fp32 graphs: let TensorRT choose fp16 kernels (fp16 graphs are built strongly typed)")
    eng.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")
    return parser


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    """`adgen import FAMILY`: the checkpoints each family is released as (docs/weights.md)."""
    families = parser.add_subparsers(dest="family", required=True)
    refadgen = families.add_parser("refadgen", help="RefAdGen: the DeepSpeed file plus the diffusers/transformers folders")
    refadgen.add_argument("--checkpoint", type=Path, required=True,
                          help="DeepSpeed model states (mp_rank_00_model_states.pt): unet, ref_unet, proj, adapter_modules")
    refadgen.add_argument("--base", type=Path, required=True,
                          help="the SD 1.5-family diffusers folder it was trained on: tokenizer/, text_encoder/, unet/config.json")
    refadgen.add_argument("--vae", type=Path, required=True, help="VAE folder (sd-vae-ft-mse: config.json and weights at its root)")
    refadgen.add_argument("--image-encoder", type=Path, required=True,
                          help="IP-Adapter image encoder folder (transformers CLIPVisionModelWithProjection)")
    radm = families.add_parser("radm", help="RADM: detectron2's model_final.pth")
    radm.add_argument("--checkpoint", type=Path, required=True, help="model_final.pth ({'model': ...})")
    radm.add_argument("--text-encoder", type=Path, default=None,
                      help="CLIP text encoder folder (+ its tokenizer) for the selling points; RADM ships none")
    sd = families.add_parser("sd", help="Stable Diffusion 1.5: text encoder, tokenizer, VAE and U-Net (the poster's U-Net)")
    controlnet = families.add_parser("controlnet", help="an SD 1.5 ControlNet as the poster's ControlNet trunk")
    for family, what in ((sd, "diffusers folder, or one original-layout file (.safetensors / .ckpt)"),
                         (controlnet, "diffusers folder, or one original-layout file (.safetensors / .pth)")):
        family.add_argument("--checkpoint", type=Path, required=True, help=what)
        family.add_argument("--config", type=Path, default=None,
                            help="single files: a local diffusers folder of the same model for its configs "
                                 "(and, for sd, its tokenizer); nothing is downloaded")
    for family in (refadgen, radm, sd, controlnet):
        family.add_argument("--out", type=Path, required=True,
                            help="weights folder to write (an existing one gains the new parts)")
        family.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", action="append", choices=tuple(PIPELINES), help="repeat; default: every pipeline")
    _source_arguments(parser)
    parser.add_argument("--graphs", type=Path, default=None, help="use this folder from `adgen export` (one pipeline)")
    parser.add_argument("--tritonserver", type=Path, default=None, help="server binary (default: the one in nvidia-pytriton)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    for kind in ("http", "grpc", "metrics"):
        parser.add_argument(f"--{kind}-port", type=int, default=0, help=f"{kind} port (default: a free one)")
    parser.add_argument("--instances", type=int, default=4, help="requests each pipeline model runs at once (default 4)")
    parser.add_argument("--no-step-batching", dest="step_batching", action="store_false",
                        help="do not batch denoising steps of concurrent requests")
    parser.add_argument("--step-queue-delay-us", type=int, default=1000, help="how long a step waits for others (default 1000)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per component model (default: its own)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    # bounds: (flag, type, default, what it bounds); each must be > 0 (checked in _serve)
    for flag, kind, default, what in (
        ("--queue-size", int, 8, "whole requests that may wait in the front for a pipeline instance; past it: 503 at once"),
        ("--step-queue-size", int, 64, "clients' step calls Triton holds for the U-Net at once; the front refuses more"),
        ("--component-queue-size", int, 16,
         "clients' calls Triton holds for any other component model at once; the front refuses more"),
        ("--queue-timeout", float, 120.0, "seconds a request may wait in the front for a pipeline instance before a 503"),
        ("--resident-mib", float, 2048.0, "MiB of per-request invariants (text embeddings, AFM K/V, ...) each component "
         "model keeps, so a request's steps after the first carry only the latents and timestep"),
        ("--max-request-mib", float, 64.0, "largest request body (HTTP) or message (gRPC) accepted, in MiB"),
        ("--client-timeout", float, 10.0, "longest a client may pause while sending a request's headers or body, in "
         "seconds; past it the request is refused"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default {default:g})")
    parser.add_argument("--no-resident", dest="resident", action="store_false",
                        help="every step call carries the per-request invariants again")
    parser.add_argument("--watchdog-interval", type=float, default=5.0,
                        help="seconds between looks at the models' stub processes: a dead one, or one whose shared "
                             "memory grew past its bound, gets its model reloaded (0: off)")
    parser.add_argument("--admin-key-env", default=ADMIN_KEY_ENV,
                        help="environment variable holding the key that model-control, shared-memory, logging and "
                             f"trace endpoints require (header {ADMIN_HEADER}); unset or empty: a random key per start, "
                             "known only to this process")
    parser.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")


def parse_sizes(text: str | None) -> list[tuple[int, int]]:
    """`512x640,768x768` -> [(512, 640), (768, 768)] (width, height)."""
    if not text:
        return []
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not match:
            raise InputError("sizes", "expected WxH[,WxH...] such as 512x640", repr(item))
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def request_options(definition: PipelineDefinition, args: argparse.Namespace) -> dict:
    """The request options given on the command line, checked against what the pipeline reads."""
    given = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    foreign = sorted(set(given) - set(definition.options))
    if foreign:
        flags = ", ".join(OPTIONS[name][0][0] for name in foreign)
        raise InputError(foreign[0], f"{flags} is not an option of pipeline {definition.name}")
    for name in definition.required:
        if name not in given:
            raise InputError(name, f"{OPTIONS[name][0][0]} is required by pipeline {definition.name}")
    return given


def _generate(args: argparse.Namespace, progress: TerminalProgress) -> int:
    from runtime.api import load_pipeline, run, save_result

    definition = get_pipeline(args.pipeline)
    options = request_options(definition, args)
    if args.server is not None:
        result = _generate_in_server(definition, options, args)
    else:
        from runtime.artifacts.weights import WeightsSource
        from runtime.pipelines.processing import with_weights_default

        preset = args.preset or DEFAULT_PRESET
        weights = WeightsSource(path=Path(args.weights)) if args.weights else WeightsSource()
        options = with_weights_default(definition.name, definition.options, weights, options)
        prepared = definition.prepare(get_preset(preset), **options)
        if (args.backend == "triton") != (args.url is not None):
            raise InputError("url", "--backend triton needs --url host:port, and --url needs --backend triton")
        loaded = load_pipeline(
            pipeline=args.pipeline, preset=preset, backend=args.backend, weights=args.weights,
            init_seed=args.init_seed, cache_dir=args.cache_dir, graphs_dir=args.graphs, threads=args.threads,
            progress=progress.message, server_url=args.url, precision=args.precision, device=args.device,
            engines_dir=args.engines, cuda_graphs=args.cuda_graphs, fused_step=args.fused_step,
            allow_random=args.allow_random,
        )
        try:
            result = run(loaded, prepared, on_step=progress.step)
        finally:
            loaded.close()
    if args.debug:
        from runtime.api import machine_report

        result.report["machine"] = machine_report()
    image_path, report_path = save_result(result, args.out)
    random_parts = [p for p, status in result.report.get("weights_parts", {}).items() if status.startswith("random")]
    if args.weights is not None and random_parts:
        progress.message(f"note: {', '.join(random_parts)} ran randomly initialised (--allow-random)")
    timings = result.report["timings_s"]
    summary = f"wrote {image_path} and {report_path}: {timings['total']:.2f} s total"
    if "denoise_step" in timings:
        summary += f", {1000 * timings['denoise_step']['p50']:.1f} ms per step (p50)"
    progress.message(summary)
    return 0


def _generate_in_server(definition: PipelineDefinition, options: dict, args: argparse.Namespace) -> GenerateResult:
    """--server: the request checked against the preset the server serves (read from its
    pipeline model's config), then run there."""
    if args.url is not None:
        raise InputError("server", "--server runs the whole pipeline in the server; --url is for --backend triton")
    from runtime.serving.remote import PipelineClient

    with PipelineClient(args.server) as client:
        served = client.served_preset(definition)
        if args.preset is not None and args.preset != served.name:
            raise InputError(
                "preset", f"the server at {args.server} serves {definition.name} at preset {served.name}: "
                f"give --preset {served.name} or leave it out", args.preset,
            )
        try:
            definition.prepare(served, **options)  # refused here, with the server's bounds, before sending
        except InputError as e:
            raise InputError(e.field, f"{e.rule} (preset {served.name}, served at {args.server})", e.got) from None
        return client.generate(definition, options)


def _export(args: argparse.Namespace, progress: TerminalProgress) -> int:
    try:
        from export.graph_passes import Cleanup
        from export.onnx_export import DEFAULT_CLEANUP, export_pipeline
        from networks.common.guided import WithGuidedSteps
        from networks.registry import LazyModules
    except ImportError as e:
        raise AdgenError(f"export needs torch ({e.name} missing): pip install 'adgen[export]'") from e
    from runtime.artifacts.architecture import resolve_preset
    from runtime.artifacts.graphs import GraphKey
    from runtime.artifacts.weights import WeightsSource, parts_of
    from runtime.specs.core import AttentionKernel

    precision = Precision(args.precision)
    weights = WeightsSource(seed=args.init_seed, path=args.weights, allow_random=frozenset(args.allow_random))
    preset = resolve_preset(args.preset, weights)
    definition = get_pipeline(args.pipeline)
    weights.check(args.pipeline, parts_of(definition.specs(preset)))
    specs = definition.fused_specs(preset, precision) if args.fused_step else definition.specs(preset, precision)
    key = GraphKey.of(
        args.pipeline, preset.name, precision, specs, weights.fingerprint(preset.name), AttentionKernel(args.attention)
    )
    cleanup = Cleanup(args.cleanup) if args.cleanup else DEFAULT_CLEANUP
    # one full-size network in memory at a time; guided-step graphs wrap their step module
    modules = WithGuidedSteps(LazyModules(args.pipeline, preset, weights), specs)
    folder = export_pipeline(modules, specs, key, args.out, progress.message, cleanup=cleanup)
    progress.message(f"wrote {folder} (parity.json, manifest.json)")
    return 0


def _import(args: argparse.Namespace, progress: TerminalProgress) -> int:
    try:
        from export.importers import import_family
    except ImportError as e:
        raise AdgenError(f"import needs torch ({e.name} missing): pip install 'adgen[export]'") from e
    options = {k: v for k, v in vars(args).items() if k not in ("command", "family", "quiet")}
    summary = import_family(args.family, progress=progress.message, **options)
    print(summary.text(), flush=True)
    return 0


def _bench(args: argparse.Namespace, progress: TerminalProgress) -> int:
    from benchmarks.harness import bench

    return bench(args)


def _serve(args: argparse.Namespace, progress: TerminalProgress) -> int:
    import signal
    import time

    from runtime.serving.front import MIB, FrontLimits
    from runtime.serving.repository import RepositoryOptions
    from runtime.serving.resident import ResidentBounds
    from runtime.serving.serve import Service
    from runtime.serving.server import Ports

    pipelines = args.pipeline or list(PIPELINES)
    if args.graphs is not None and len(pipelines) != 1:
        raise InputError("graphs", "--graphs holds one pipeline's graphs: name it with --pipeline")
    if args.instances < 1:
        raise InputError("instances", "expected at least 1", args.instances)
    for name in ("queue_size", "step_queue_size", "component_queue_size"):
        if getattr(args, name) < 1:
            raise InputError(name, "expected at least 1", getattr(args, name))
    if not args.queue_timeout > 0:
        raise InputError("queue_timeout", "expected a number of seconds > 0", args.queue_timeout)
    if not args.resident_mib > 0:
        raise InputError("resident_mib", "expected a number of MiB > 0 (--no-resident: keep nothing)", args.resident_mib)
    if not args.max_request_mib > 0:
        raise InputError("max_request_mib", "expected a number of MiB > 0", args.max_request_mib)
    if not args.client_timeout > 0:
        raise InputError("client_timeout", "expected a number of seconds > 0", args.client_timeout)
    if args.watchdog_interval < 0:
        raise InputError("watchdog_interval", "expected seconds >= 0 (0: off)", args.watchdog_interval)
    admin_key = os.environ.get(args.admin_key_env) or None  # never printed; None: a random one
    options = RepositoryOptions(
        pipeline_instances=args.instances, step_batching=args.step_batching,
        step_queue_delay_us=args.step_queue_delay_us, threads=args.threads,
        pipeline_queue_size=args.queue_size, step_queue_size=args.step_queue_size,
        component_queue_size=args.component_queue_size, pipeline_queue_timeout_s=args.queue_timeout,
        resident=ResidentBounds(mib=args.resident_mib) if args.resident else None,
    )
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    service = Service(
        pipelines, args.preset, host=args.host, ports=ports, limits=FrontLimits(
            max_body_bytes=int(args.max_request_mib * MIB), header_timeout_s=args.client_timeout, body_idle_s=args.client_timeout,
        ),
        tritonserver=args.tritonserver, admin_key=admin_key, timeout_s=args.timeout,
        watchdog_interval_s=args.watchdog_interval, progress=progress.message,
        weights=args.weights, init_seed=args.init_seed, allow_random=args.allow_random, cache_dir=args.cache_dir, graphs_dir=args.graphs, options=options,
    )
    code = None
    try:
        service.start()
        print(f"serving {', '.join(pipelines)} ({args.preset}) with tritonserver pid {service.server.process.pid}", flush=True)
        print(f"  gRPC     {service.grpc_url}", flush=True)
        print(f"  HTTP     http://{service.http_url}", flush=True)
        print(f"  metrics  {service.metrics_url}", flush=True)
        print(f"  adgen generate --pipeline {pipelines[0]} --preset {args.preset} --product P --prompt T --out ad.png "
              f"--server {service.grpc_url}", flush=True)
        locked = "model-control, shared-memory, logging, trace: need header"
        if admin_key:
            print(f"  {locked} {ADMIN_HEADER} (${args.admin_key_env})", flush=True)
        else:
            print(f"  {locked} {ADMIN_HEADER} with a random key of this run (set ${args.admin_key_env} to choose it)",
                  flush=True)
        print("Ctrl-C stops it.", flush=True)
        while True:
            service.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        progress.message("stopping tritonserver")
    finally:
        code = service.stop()
        progress.message(f"tritonserver stopped (exit code {code})")
    return 0


def _engines(args: argparse.Namespace, progress: TerminalProgress) -> int:
    from runtime.artifacts.architecture import resolve_preset
    from runtime.artifacts.graphs import read_manifest
    from runtime.artifacts.weights import WeightsSource
    from runtime.errors import BackendError
    from runtime.specs.shared import canvas_env

    sizes = parse_sizes(args.sizes)
    try:
        manifest = read_manifest(args.onnx)
    except BackendError as e:
        raise InputError("onnx", "expected a folder made by `adgen export`", str(e)) from None
    weights = WeightsSource(path=args.weights)
    preset = resolve_preset(manifest.get("key", {}).get("preset", "?"), weights)
    canvases = [canvas_env(preset, w, h) for w, h in sizes]
    try:
        from export.tensorrt_build import build_engines
    except ImportError as e:
        raise AdgenError(f"engines needs the export extra ({e.name} missing): pip install 'adgen[export,tensorrt]'") from e

    # A folder exported with --fused-step holds a guided-step graph in place of the step.
    fused = any("guided_step_of" in c.get("spec", {}).get("constants", {}) for c in manifest.get("components", {}).values())

    def specs_for(pipeline: str, preset_name: str, precision: Precision):
        definition = get_pipeline(pipeline)
        size = resolve_preset(preset_name, weights)
        return definition.fused_specs(size, precision) if fused else definition.specs(size, precision)

    folder = build_engines(args.onnx, args.out, specs_for, canvases, args.fp16_tactics, progress.message)
    progress.message(f"wrote engines and engines.json to {folder}")
    return 0


def _perf_inputs(args: argparse.Namespace, progress: TerminalProgress) -> int:
    from runtime.artifacts.architecture import resolve_preset
    from runtime.artifacts.weights import WeightsSource
    from runtime.serving.perf_inputs import served_models, write_perf_input_data

    weights = WeightsSource(path=args.weights) if args.weights else WeightsSource()
    preset = resolve_preset(args.preset or DEFAULT_PRESET, weights)
    out = write_perf_input_data(args.model, preset, args.out, steps=args.steps, seed=args.seed)
    batch = " -b N" if served_models(preset)[args.model][1] is not None else ""  # components batch
    progress.message(f"wrote {out}; perf_analyzer -m {args.model}{batch} --input-data {out} -u HOST:GRPC_PORT -i grpc")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = TerminalProgress(quiet=args.quiet)
    try:
        commands = {"generate": _generate, "export": _export, "bench": _bench, "serve": _serve, "engines": _engines,
                    "import": _import, "perf-inputs": _perf_inputs}
        return commands[args.command](args, progress)
    except AdgenError as e:
        print(f"adgen: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("adgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
