"""The fused guided-step graph, derived from any per-step spec.

A pipeline's per-step denoiser runs on 2B samples under classifier-free guidance (conditional
half first, unconditional second) and the loop combines the halves. The guided step takes the
B per-request inputs once, duplicates the ones both halves share inside the graph, runs the 2B
batch and returns `uncond + guidance * (cond - uncond)`: one call per step, the guidance scale a
tensor input. Inputs that differ between the halves (text embeddings, RefAdGen's reference
keys/values, a ControlNet's per-half conditioning) stay 2B. A step module that fuses several
networks (U-Net + ControlNet with its conditioning scale as an input) is wrapped the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from runtime.specs.core import ComponentSpec, DerivedDim, Dim, DType, TensorSpec

BATCH = "B"
DOUBLE_BATCH = "B2"
GUIDANCE = "guidance"


def guided_name(step: str) -> str:
    return f"guided_{step}"


def guided_step_spec(step: ComponentSpec, shared: Sequence[str], guidance_range: tuple[float, float] = (1.0, 10.0)) -> ComponentSpec:
    """The guided-step spec of `step`; `shared` names the inputs both halves take unchanged.

    `guidance_range` is where sample inputs (parity checks) draw the scale from: the error of
    the guided output is the error of (cond - uncond) times the scale, so a parity check at 30
    would judge fp16 by a setting nobody generates with. Requests may use up to the
    pipeline's own limit."""
    unknown = sorted(set(shared) - set(step.input_names))
    if unknown:
        raise ValueError(f"{step.name}: shared inputs {unknown} are not inputs of the step")
    batch = step.dim(BATCH)
    if not isinstance(batch, Dim) or batch.max < 2:
        raise ValueError(f"{step.name}: needs a batch dim {BATCH!r} of at least 2 for the two guidance halves")

    def per_request(t: TensorSpec) -> TensorSpec:
        return t if not t.shape or t.shape[0] != BATCH else replace(t, shape=(BATCH, *t.shape[1:]))

    def per_half(t: TensorSpec) -> TensorSpec:
        if not t.shape or t.shape[0] != BATCH:
            raise ValueError(f"{step.name}.{t.name}: per-half inputs need the batch first")
        return replace(t, shape=(DOUBLE_BATCH, *t.shape[1:]), doc=(t.doc + " " if t.doc else "") + "conditional B then unconditional B")

    inputs = tuple(per_request(t) if t.name in shared else per_half(t) for t in step.inputs)
    inputs += (TensorSpec(GUIDANCE, DType.FLOAT32, (BATCH,), value_range=guidance_range, doc="classifier-free guidance scale per request"),)
    requests = Dim(BATCH, 1, max(1, batch.opt // 2), batch.max // 2)
    dims = (requests, DerivedDim(DOUBLE_BATCH, ((BATCH, 2, 1),)), *(d for d in step.dims if d.name != BATCH))
    return ComponentSpec(
        name=guided_name(step.name),
        inputs=inputs,
        outputs=step.outputs,
        dims=dims,
        doc=f"One guided step of {step.name}: 2B batch and the guidance combination inside the graph.",
        constants={**step.constants, "guided_step_of": step.name, "shared_inputs": list(shared)},
    )


def with_guided_step(specs: Mapping[str, ComponentSpec], step: str, shared: Sequence[str]) -> dict[str, ComponentSpec]:
    """`specs` with `step` replaced (in place, order kept) by its guided-step spec."""
    return {
        (guided_name(name) if name == step else name): (guided_step_spec(spec, shared) if name == step else spec)
        for name, spec in specs.items()
    }
