"""ONNX graphs -> TensorRT engines, one per component, keyed per GPU (`adgen engines`).

NOT EXECUTED on this project's machines (no GPU, and TensorRT cannot be installed there).
Written against the TensorRT 10 Python API; its tests are marked `tensorrt` and run wherever
`import tensorrt` works. The key, manifest and profile logic it uses (runtime/artifacts/engines.py) is
tested everywhere.

For each component: parse the graph from its file (so `<graph>.onnx.data` is found beside
it), add the optimization profiles derived from its spec, build with a timing cache named per
GPU + CUDA + TensorRT version, and write `<key>.plan` with a manifest beside it. fp16 graphs
(float16 with normalizations and softmax in float32, see export/graph_passes.py) are built
STRONGLY_TYPED, so TensorRT keeps exactly those types; fp32 graphs are built in fp32, or with
TensorRT free to pick fp16 kernels when `fp16_tactics` is set.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from runtime.artifacts.engines import (
    EngineKey,
    Profile,
    engine_keys,
    engine_path,
    timing_cache_path,
    write_index,
    write_manifest,
)
from runtime.artifacts.graphs import GraphKey, check_manifest, graph_path, read_manifest
from runtime.errors import BackendError, ExportError
from runtime.specs.core import AttentionKernel, ComponentSpec, Precision

Progress = Callable[[str], None]
DEFAULT_WORKSPACE = 8 << 30


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(
            "`adgen engines` needs TensorRT (pip install 'adgen[tensorrt]' on a machine with an NVIDIA GPU); "
            "it is not importable here"
        ) from e
    return trt


def build_engine(
    onnx_file: Path,
    key: EngineKey,
    profile_set: Sequence[Profile],
    out: Path,
    timing_cache: Path,
    fp16_tactics: bool = False,
    workspace: int = DEFAULT_WORKSPACE,
) -> float:
    """Build one engine into `out` (a `.plan`); returns the build time in seconds."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = key.precision is Precision.FP16
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{key.component}: TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16_tactics and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    for profile in profile_set:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise ExportError(f"{key.component}: TensorRT build failed (see the log above)")
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(serialized)
    tmp.rename(out)
    timing_cache.write_bytes(config.get_timing_cache().serialize())
    return seconds


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    specs_for: Callable[[str, str, Precision], Mapping[str, ComponentSpec]],
    canvases: Sequence[Mapping[str, int]] = (),
    fp16_tactics: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Build engines for every component of the ONNX folder `onnx_dir` into `out_dir`.

    `specs_for(pipeline, preset, precision)` gives the current specs: the folder's manifest
    must match them (stale graphs are refused, as everywhere). Graphs must use portable
    attention (`adgen export --attention onnx`): TensorRT has no ONNX Runtime contrib ops.
    An engine already in `out_dir` under the same key (its manifest checked) is kept.
    """
    trt = _trt()
    from runtime.artifacts.engines import check_engine
    from runtime.backends.tensorrt import query_gpu

    say = progress or (lambda message: None)
    manifest = read_manifest(Path(onnx_dir))
    recorded = manifest.get("key", {})
    if recorded.get("attention") != AttentionKernel.ONNX.value:
        raise ExportError(
            f"{onnx_dir}: graphs have attention={recorded.get('attention')!r}; TensorRT needs 'onnx' "
            f"(re-export with `adgen export --attention onnx`)"
        )
    precision = Precision(recorded["precision"])
    specs = specs_for(recorded["pipeline"], recorded["preset"], precision)
    graphs = GraphKey.of(
        recorded["pipeline"], recorded["preset"], precision, specs, recorded["weights"], AttentionKernel.ONNX
    )
    check_manifest(Path(onnx_dir), graphs, specs)
    gpu = query_gpu()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing = timing_cache_path(out_dir, gpu, trt.__version__)
    built = {}
    for name, (key, profile_set) in engine_keys(specs, graphs, gpu, trt.__version__, canvases).items():
        target = engine_path(out_dir, key)
        try:
            check_engine(target, key)
            say(f"{name}: {target.name} is up to date")
            built[name] = target.name
            continue
        except BackendError:
            pass  # absent or stale: build it
        say(f"{name}: building {target.name} ({len(profile_set)} profile(s))")
        seconds = build_engine(graph_path(Path(onnx_dir), name), key, profile_set, target, timing, fp16_tactics)
        write_manifest(
            target, key, profile_set, canvases,
            {"build_seconds": round(seconds, 3), "cuda": gpu.cuda, "timing_cache": timing.name, "fp16_tactics": fp16_tactics},
        )
        say(f"{name}: {seconds:.1f} s, {target.stat().st_size / 1e6:.1f} MB")
        built[name] = target.name
    write_index(out_dir, graphs, canvases, built)
    return out_dir
