"""Where a backend runs: the device a user names, and what it means for each backend.

`Device.CPU` is the default everywhere. `Device.CUDA` is ONNX Runtime's CUDA execution provider
(with IO binding, see onnxruntime_backend) or torch on `cuda`; `Device.TENSORRT` is ONNX
Runtime's TensorRT execution provider with CUDA behind it for the nodes TensorRT does not take.
Torch-free and onnxruntime-free: the resolution takes the list of available providers.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Sequence

from runtime.errors import BackendError
from runtime.specs.core import Precision

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"  # ONNX Runtime's TensorRT execution provider

    @property
    def on_gpu(self) -> bool:
        return self is not Device.CPU

    @property
    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime providers in priority order; CPU last takes what the others do not."""
        return {
            Device.CPU: (CPU_EP,),
            Device.CUDA: (CUDA_EP, CPU_EP),
            Device.TENSORRT: (TENSORRT_EP, CUDA_EP, CPU_EP),
        }[self]

    @property
    def torch_device(self) -> str:
        return "cpu" if self is Device.CPU else "cuda"


def resolve_providers(
    wanted: Sequence[str],
    available: Sequence[str],
    precision: Precision,
    engine_cache: Path | None = None,
) -> list[str | tuple[str, dict]]:
    """ONNX Runtime's `providers=` argument for `wanted`, with per-provider options.

    Raises BackendError naming what is missing and what this installation has: a CUDA device
    asked of the CPU-only `onnxruntime` wheel must fail at load, not fall back to the CPU
    silently.
    """
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = " (install onnxruntime-gpu in place of onnxruntime: pip install 'adgen[gpu]')" if CPU_EP in available and len(available) <= 2 else ""
        raise BackendError(f"onnxruntime providers {missing} not available here (have {list(available)}){hint}")
    resolved: list[str | tuple[str, dict]] = []
    for name in wanted:
        if name == TENSORRT_EP:
            options: dict[str, object] = {"trt_fp16_enable": precision is Precision.FP16}
            if engine_cache is not None:
                # ONNX Runtime keys its cached engines by graph and GPU itself.
                options |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(engine_cache),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(engine_cache),
                }
            resolved.append((name, options))
        elif name == CUDA_EP:
            # Exhaustive cuDNN convolution search once per shape: the step shape repeats.
            resolved.append((name, {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}))
        else:
            resolved.append(name)
    return resolved
