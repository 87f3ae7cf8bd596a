"""Component specs: the one contract per exported component.

A `ComponentSpec` names every input and output tensor, its dtype and its shape, where a shape
entry is either a fixed int or the name of a symbolic dim. Base dims carry min/opt/max bounds
(and a granularity); derived dims are computed from base dims (latent -> image size, latent ->
attention token count). ONNX dynamic axes, sample inputs, feed and output validation (and, in
later layers, TensorRT profiles and Triton configs) are all derived from here; no other file
restates a tensor name or shape.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from runtime.errors import SpecError

if TYPE_CHECKING:
    from runtime.presets import Preset


class DType(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT64 = "int64"
    INT32 = "int32"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.value)

    @property
    def is_float(self) -> bool:
        return self in (DType.FLOAT32, DType.FLOAT16)


class Precision(str, Enum):
    """Numeric precision of an exported graph, with the parity tolerance that goes with it."""

    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def float_dtype(self) -> DType:
        return DType.FLOAT32 if self is Precision.FP32 else DType.FLOAT16

    @property
    def tolerance(self) -> "Tolerance":
        return _TOLERANCES[self]


class AttentionKernel(str, Enum):
    """How attention is written into an exported graph.

    ONNX: portable MatMul/Softmax/MatMul (any runtime; TensorRT fuses it itself).
    ORT: ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (ONNX Runtime only).
    """

    ONNX = "onnx"
    ORT = "ort"


@dataclass(frozen=True)
class Tolerance:
    """An output passes parity when max|a - b| <= atol + rtol * max|b|."""

    atol: float
    rtol: float

    def bound(self, reference_scale: float) -> float:
        return self.atol + self.rtol * reference_scale


_TOLERANCES = {
    Precision.FP32: Tolerance(atol=1e-4, rtol=1e-4),
    Precision.FP16: Tolerance(atol=1e-2, rtol=1e-2),
}


@dataclass(frozen=True)
class Dim:
    """A symbolic dim with inclusive bounds; `multiple` is its granularity."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    def check(self, value: int) -> str | None:
        if value < self.min or value > self.max:
            return f"{self.name} in [{self.min}, {self.max}]"
        if value % self.multiple:
            return f"{self.name} a multiple of {self.multiple}"
        return None


@dataclass(frozen=True)
class DerivedDim:
    """A dim computed from base dims: the product over `factors` of ceil(base * mul / div).

    Covers image = 8 x latent, and attention tokens = ceil(h / 2^k) * ceil(w / 2^k) (a stride-2
    convolution with padding 1 maps n to ceil(n / 2)).
    """

    name: str
    factors: tuple[tuple[str, int, int], ...]

    def value(self, env: Mapping[str, int]) -> int:
        return math.prod(-(-env[base] * mul // div) for base, mul, div in self.factors)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    shape: tuple[int | str, ...]
    invariant: bool = False  # constant for every step of one request: compute once, reuse
    value_range: tuple[float, float] | None = None  # where sample inputs are drawn (default: `limits`, else [-1, 1])
    # Values outside [lo, hi] are refused at a server's boundary (`validate_inputs(check_values=True)`):
    # token ids within the vocabulary, timesteps within the schedule, masks within [0, 1]. A rule on
    # values, not on the graph's I/O, so it is not part of the spec hash (graphs stay cached).
    limits: tuple[float, float] | None = None
    doc: str = ""

    def describe(self) -> str:
        return f"({', '.join(str(d) for d in self.shape)}) {self.dtype.value}"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim | DerivedDim, ...]
    doc: str = ""
    constants: dict[str, object] = field(default_factory=dict)  # recorded in the hash, e.g. token counts

    def __post_init__(self) -> None:
        names = [d.name for d in self.dims]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate dim names {names}")
        known = set(names)
        for tensor in self.inputs + self.outputs:
            for d in tensor.shape:
                if isinstance(d, str) and d not in known:
                    raise ValueError(f"{self.name}.{tensor.name}: unknown dim {d!r}")
        bound_by_inputs = {d for t in self.inputs for d in t.shape if isinstance(d, str) and self._is_base(d)}
        for dim in self.dims:
            if isinstance(dim, Dim) and dim.name not in bound_by_inputs:
                raise ValueError(f"{self.name}: base dim {dim.name!r} appears in no input, so it cannot be bound")

    def _is_base(self, name: str) -> bool:
        return isinstance(self.dim(name), Dim)

    def dim(self, name: str) -> Dim | DerivedDim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def env_at(self, point: str = "opt", **overrides: int) -> dict[str, int]:
        """Values of every dim at its min/opt/max bound, with base-dim overrides."""
        env = {d.name: getattr(d, point) for d in self.dims if isinstance(d, Dim)}
        env.update(overrides)
        for d in self.dims:
            if isinstance(d, DerivedDim):
                env[d.name] = d.value(env)
        return env

    def shape(self, tensor: str | TensorSpec, env: Mapping[str, int]) -> tuple[int, ...]:
        t = self.tensor(tensor) if isinstance(tensor, str) else tensor
        return tuple(d if isinstance(d, int) else env[d] for d in t.shape)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX `dynamic_axes`: every symbolic axis of every input and output, by dim name."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in self.inputs + self.outputs
            if any(isinstance(d, str) for d in t.shape)
        }

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input: the optimization profile of this component."""
        envs = [self.env_at(p) for p in ("min", "opt", "max")]
        return {t.name: tuple(self.shape(t, e) for e in envs) for t in self.inputs}  # type: ignore[misc]

    def sample_inputs(self, rng: np.random.Generator, env: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        env = dict(env) if env is not None else self.env_at("opt")
        feed = {}
        for t in self.inputs:
            shape = self.shape(t, env)
            if t.dtype in (DType.INT64, DType.INT32):
                lo, hi = t.value_range or ((t.limits[0], t.limits[1] + 1) if t.limits else (0, 2))  # [lo, hi)
                feed[t.name] = rng.integers(int(lo), int(hi), size=shape).astype(t.dtype.numpy)
            else:
                lo, hi = t.value_range or t.limits or (-1.0, 1.0)
                feed[t.name] = rng.uniform(lo, hi, size=shape).astype(t.dtype.numpy)
        return feed

    def validate_inputs(self, feed: Mapping[str, np.ndarray], check_values: bool = True) -> dict[str, int]:
        """Check names, dtypes, shapes and bounds of a feed (and, with `check_values`, that floats
        are finite and every tensor with `limits` lies within them); return the bound dim values."""
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise SpecError(self.name, "inputs", f"exactly {list(self.input_names)}", f"missing {missing}, unexpected {extra}")
        env: dict[str, int] = {}
        for t in self.inputs:
            self._bind(t, feed[t.name], env, base_only=True)
        for d in self.dims:
            if isinstance(d, DerivedDim):
                env[d.name] = d.value(env)
        for t in self.inputs:
            self._check(t, feed[t.name], env)
            if check_values:
                self._check_values(t, feed[t.name])
        return env

    def validate_values(self, feed: Mapping[str, np.ndarray], names: Iterable[str]) -> None:
        """The value checks of `validate_inputs` (finite floats, `limits`) on the inputs `names` of
        a feed whose names, dtypes and shapes were validated."""
        for t in self.inputs:
            if t.name in names:
                self._check_values(t, feed[t.name])

    def _check_values(self, t: TensorSpec, array: np.ndarray) -> None:
        if t.dtype.is_float and not np.isfinite(array).all():
            raise SpecError(self.name, t.name, "finite values", "NaN or Inf")
        if t.limits is not None and array.size:
            lo, hi = array.min(), array.max()
            if lo < t.limits[0] or hi > t.limits[1]:
                expected = f"values in [{_number(t.limits[0])}, {_number(t.limits[1])}]"
                raise SpecError(self.name, t.name, expected, f"values in [{_number(lo)}, {_number(hi)}]")

    def validate_outputs(self, outputs: Mapping[str, np.ndarray], env: Mapping[str, int]) -> None:
        """Check that a backend returned every output with the spec's name, dtype and shape."""
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise SpecError(self.name, "outputs", f"all of {list(self.output_names)}", f"missing {missing}")
        for t in self.outputs:
            self._check(t, outputs[t.name], env)

    def _bind(self, t: TensorSpec, array: np.ndarray, env: dict[str, int], base_only: bool) -> None:
        got = describe_array(array)
        if not isinstance(array, np.ndarray) or array.ndim != len(t.shape):
            raise SpecError(self.name, t.name, t.describe(), got)
        for axis, d in enumerate(t.shape):
            if isinstance(d, str) and self._is_base(d):
                value = int(array.shape[axis])
                if env.setdefault(d, value) != value:
                    raise SpecError(self.name, t.name, f"{t.describe()} with {d}={env[d]} as in the other inputs", got)
                problem = self.dim(d).check(value)  # type: ignore[union-attr]
                if problem:
                    raise SpecError(self.name, t.name, f"{t.describe()} with {problem}", got)

    def _check(self, t: TensorSpec, array: np.ndarray, env: Mapping[str, int]) -> None:
        got = describe_array(array)
        expected = self.shape(t, env)
        if not isinstance(array, np.ndarray) or array.dtype != t.dtype.numpy or tuple(array.shape) != expected:
            bound = ", ".join(f"{k}={v}" for k, v in env.items() if k in t.shape)
            raise SpecError(self.name, t.name, f"{t.describe()} = {expected} ({bound})", got)

    def at_float32(self) -> "ComponentSpec":
        """This spec with every float tensor float32: the I/O of the float32 torch reference that
        graphs of every precision are traced from and compared against."""
        def widen(t: TensorSpec) -> TensorSpec:
            return replace(t, dtype=DType.FLOAT32) if t.dtype.is_float else t

        return replace(self, inputs=tuple(map(widen, self.inputs)), outputs=tuple(map(widen, self.outputs)))

    def cast_inputs(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feed` with float arrays cast to their input's spec dtype (float16 graphs take float16
        latents); integer tensors and names the spec lacks pass through for validation to judge."""
        out = dict(feed)
        for t in self.inputs:
            a = out.get(t.name)
            if isinstance(a, np.ndarray) and t.dtype.is_float and a.dtype.kind == "f" and a.dtype != t.dtype.numpy:
                out[t.name] = a.astype(t.dtype.numpy)
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "dims": [asdict(d) | {"kind": type(d).__name__} for d in self.dims],
            "constants": self.constants,
        }

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _tensor_dict(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape), "invariant": t.invariant}


def _number(value: object) -> str:
    """An integral value without a fraction (`999`, not `999.0`); others as Python writes them."""
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else repr(number)


def describe_array(array: object) -> str:
    if isinstance(array, np.ndarray):
        return f"{tuple(array.shape)} {array.dtype}"
    return type(array).__name__


def specs_hash(specs: Mapping[str, ComponentSpec]) -> str:
    joined = "".join(f"{name}:{specs[name].spec_hash()};" for name in sorted(specs))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


SpecBuilder = Callable[["Preset", Precision], ComponentSpec]


def build_specs(builders: Sequence[SpecBuilder], preset: "Preset", precision: Precision) -> dict[str, ComponentSpec]:
    """One spec per builder, keyed by the spec's own name, in the builders' order."""
    specs = [build(preset, precision) for build in builders]
    return {spec.name: spec for spec in specs}
