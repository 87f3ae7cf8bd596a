"""Calling a component module with a spec-keyed numpy feed: the one torch call path shared by
the torch backend and the export parity check."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from runtime.specs import ComponentSpec


def run_module(module: nn.Module, spec: ComponentSpec, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `module` on `feed` (spec input order) and key its outputs by spec output name."""
    args = [torch.from_numpy(np.ascontiguousarray(feed[name])) for name in spec.input_names]
    with torch.inference_mode():
        result = module(*args)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if len(outputs) != len(spec.outputs):
        raise RuntimeError(f"{spec.name}: module returned {len(outputs)} outputs, spec has {len(spec.outputs)}")
    return {name: out.numpy() for name, out in zip(spec.output_names, outputs)}
