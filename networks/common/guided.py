"""The torch side of runtime/specs/guided.py: a per-step module wrapped into one guided step."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

from runtime.specs.core import ComponentSpec


class GuidedStep(nn.Module):
    """forward(*step inputs with shared ones at B and per-half ones at 2B, guidance (B,)) ->
    the step's outputs at B: `uncond + guidance * (cond - uncond)` per output."""

    def __init__(self, step: nn.Module, guided: ComponentSpec):
        super().__init__()
        self.step = step
        shared = set(guided.constants["shared_inputs"])
        self.duplicate = [name in shared for name in guided.input_names[:-1]]

    def forward(self, *inputs: torch.Tensor):
        *step_inputs, guidance = inputs
        args = [torch.cat([x, x]) if dup else x for x, dup in zip(step_inputs, self.duplicate, strict=True)]
        result = self.step(*args)
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        guided = []
        for out in outputs:
            cond, uncond = out.chunk(2)  # (2B, ...) -> (B, ...) twice
            g = guidance.to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
            guided.append(uncond + g * (cond - uncond))
        return tuple(guided) if len(guided) > 1 else guided[0]


class WithGuidedSteps(Mapping[str, nn.Module]):
    """`modules` plus a GuidedStep for every spec that declares `guided_step_of`."""

    def __init__(self, modules: Mapping[str, nn.Module], specs: Mapping[str, ComponentSpec]):
        self.modules = modules
        self.guided = {name: spec for name, spec in specs.items() if "guided_step_of" in spec.constants}

    def __getitem__(self, name: str) -> nn.Module:
        spec = self.guided.get(name)
        if spec is None:
            return self.modules[name]
        return GuidedStep(self.modules[spec.constants["guided_step_of"]], spec).eval()

    def __iter__(self) -> Iterator[str]:
        yield from self.modules
        yield from self.guided

    def __len__(self) -> int:
        return len(self.modules) + len(self.guided)

    def release(self) -> None:
        """Free the held network of a lazy mapping (networks.build.LazyModules)."""
        release = getattr(self.modules, "release", None)
        if release is not None:
            release()
