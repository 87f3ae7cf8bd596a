"""Calling a component module with a spec-keyed numpy feed: the one torch call path shared by
the torch backend and the export parity check."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from runtime.specs.core import ComponentSpec


def run_module(module: nn.Module, spec: ComponentSpec, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `module` on `feed` (spec input order) and key its outputs by spec output name.

    Float inputs move to the module's device and parameter dtype (a float16 module on CUDA
    takes float16); outputs come back as the spec's dtypes."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    args = []
    for t in spec.inputs:
        x = torch.from_numpy(np.ascontiguousarray(feed[t.name])).to(device)
        args.append(x.to(dtype) if t.dtype.is_float else x)
    with torch.inference_mode():
        result = module(*args)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if len(outputs) != len(spec.outputs):
        raise RuntimeError(f"{spec.name}: module returned {len(outputs)} outputs, spec has {len(spec.outputs)}")
    return {
        t.name: out.detach().to("cpu").numpy().astype(t.dtype.numpy, copy=False)
        for t, out in zip(spec.outputs, outputs)
    }
