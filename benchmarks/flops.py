"""FLOPs per component call, counted by torch's FLOP counter on meta tensors (no compute, no
memory: sd15 counts in a second), and the device peak that MFU is measured against."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from runtime.specs.core import ComponentSpec

# Dense fp16/bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; what MFU divides by.
GPU_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def component_flops(
    pipeline: str, preset, specs: Mapping[str, ComponentSpec], envs: Mapping[str, Mapping[str, int]]
) -> dict[str, int]:
    """FLOPs of one call of each component at the dims in `envs[component]`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from networks.registry import build_modules

    with torch.device("meta"):
        modules = build_modules(pipeline, preset)
    flops = {}
    for name, spec in specs.items():
        env = envs[name]
        args = [torch.empty(spec.shape(t, env), dtype=getattr(torch, t.dtype.value), device="meta") for t in spec.inputs]
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            modules[name](*args)
        flops[name] = int(counter.get_total_flops())
    return flops


def device_peak(device: str) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for MFU: a data-sheet peak for known GPUs, else measured fp32 GEMM."""
    for key, peak in GPU_PEAKS.items():
        if key in device:
            return peak, f"{key} dense fp16 data-sheet peak"
    return measured_gemm_peak(), "measured fp32 GEMM peak (2048^3 matmul, best of 10)"


def measured_gemm_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM FLOP/s of this machine: torch's (oneDNN/MKL) matmul when torch is present, else numpy's."""
    try:
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
    except ImportError:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best
