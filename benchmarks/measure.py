"""What every benchmark here shares: where a figure was measured (machine, versions, commit),
timing several candidates interleaved so none always runs in the same position, and the JSON
lines the report reads."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "transformers", "tritonclient")


def machine_info() -> dict[str, Any]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "device": device_name(),
        "versions": versions,
    }


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def git_commit() -> str:
    """The checkout's short commit, `-dirty` when tracked files changed."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=here).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved(runs: Mapping[str, Callable[[], object]], warmup: int, iterations: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, `iterations` after `warmup`; every round starts one
    candidate later, so each takes each position in turn (a shared, noisy machine favours none)."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iterations):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            started = time.perf_counter()
            runs[name]()
            if i >= warmup:
                samples[name].append(time.perf_counter() - started)
    return samples


def seconds_stats(samples: list[float]) -> dict[str, Any]:
    """p50, p90 and min of one candidate's samples (seconds), and the samples themselves."""
    s = np.asarray(samples)
    return {"p50_s": float(np.median(s)), "p90_s": float(np.percentile(s, 90)), "min_s": float(s.min()),
            "samples_s": s.tolist()}


def provenance() -> dict[str, Any]:
    """The fields every record carries: commit, machine and time."""
    return {"git_commit": git_commit(), "machine": machine_info(), "time": time.time()}


def append_jsonl(path: str | Path | None, records: Iterable[dict]) -> None:
    """Append one JSON line per record to `path` (nothing when no path was given)."""
    if not path:
        return
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
