"""`adgen serve`: export (or find) each pipeline's graphs, write the run-time repository, start
the server.

The run-time repository is the committed one (same generator, same specs) with the run-time
parameters filled: the graph folder of each pipeline, the folder `runtime` is imported from
(this process's, so the server runs the code the client runs) and the weights.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from runtime.artifacts.architecture import resolve_preset
from runtime.artifacts.graphs import GraphSource, ensure_graphs
from runtime.artifacts.weights import WeightsSource, parts_of
from runtime.pipelines import get_pipeline
from runtime.serving.repository import RepositoryOptions, write_repository
from runtime.serving.server import (
    WORKDIR_PREFIX,
    Installation,
    Ports,
    TritonServer,
    bundled_installation,
    given_installation,
)

RUNTIME_ROOT = Path(__file__).resolve().parents[2]


def write_runtime_repository(
    out: Path,
    pipelines: Sequence[str],
    preset: str,
    weights: Path | None = None,
    init_seed: int = 0,
    allow_random: Sequence[str] = (),
    cache_dir: Path | None = None,
    graphs_dir: Path | None = None,
    options: RepositoryOptions = RepositoryOptions(),
    progress: Callable[[str], None] | None = None,
) -> Path:

    source_weights = WeightsSource(seed=init_seed, path=weights, allow_random=frozenset(allow_random))
    size = resolve_preset(preset, source_weights)
    for name in pipelines:
        definition = get_pipeline(name)
        source_weights.check(name, parts_of(definition.specs(size)))
        source = GraphSource(
            pipeline=name, preset=size, weights=source_weights, precision=options.precision,
            cache_root=cache_dir, graphs_dir=graphs_dir,
        )
        folder = ensure_graphs(definition.specs(size, options.precision), source, progress)
        filled = replace(
            options,
            graphs_dir=str(Path(folder).resolve()),
            runtime_root=str(RUNTIME_ROOT),
            weights=str(weights.resolve()) if weights else "",
            init_seed=init_seed,
        )
        write_repository(out, size, [name], filled)
    return out


def start_server(
    pipelines: Sequence[str],
    preset: str,
    tritonserver: Path | None = None,
    host: str = "127.0.0.1",
    ports: Ports | None = None,
    timeout_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
    admin_key: str | None = None,
    **repository: Any,
) -> TritonServer:
    """A started, ready server for `pipelines` at `preset`; stop it with `.stop()`. `repository`
    takes what `write_runtime_repository` does (weights, init_seed, allow_random, cache_dir, graphs_dir, options)."""
    installation: Installation = given_installation(tritonserver) if tritonserver else bundled_installation()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    try:
        folder = write_runtime_repository(workdir / "repository", pipelines, preset, progress=progress, **repository)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = TritonServer(
        folder, installation, host=host, ports=ports, workdir=workdir, remove_workdir=True, admin_key=admin_key
    )
    return server.start(timeout_s, progress)  # stops the server and removes workdir if it fails
