"""The tensors of a pipeline model's request and response, derived from the option catalog.

A pipeline model takes the same request as `adgen generate`: each option the pipeline reads
(`PipelineDefinition.options`, defined once in `runtime.pipelines.options.OPTIONS`) becomes one
input tensor of shape (1,), typed by the option's kind, required when the pipeline requires it;
a repeatable text option (`--text` given several times) is one BYTES tensor of shape (n,).
A file option (the product photo, its mask) travels as the file's bytes, never as a path: the
server writes the bytes to a private temporary file and runs the pipeline's own `prepare` on it,
so every image check of the command line applies in the server too.

The response is the same for every pipeline: `image` (H, W, 3) uint8, `report` (1,) BYTES
holding the JSON report and `png` (1,) BYTES, the image as a PNG file; the model computes only
the outputs a request asks for (all three when it names none). The wire format, with curl and
tritonclient examples, is docs/wire-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.errors import BackendError, InputError
from runtime.inputs.files import read_capped
from runtime.inputs.images import png_bytes
from runtime.pipelines.base import PipelineDefinition
from runtime.pipelines.options import OPTIONS
from runtime.specs.core import ComponentSpec, Dim

IMAGE_OUTPUT = "image"
REPORT_OUTPUT = "report"
PNG_OUTPUT = "png"
# A request tensor carrying a file is refused above this size (Triton 2.51 has no input cap).
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_TEXTS = 64  # a repeatable text tensor's longest accepted shape; the pipeline sets its own lower limit


def model_name(pipeline: str, component: str) -> str:
    """The Triton model serving `component` of `pipeline`."""
    return f"{pipeline}_{component}"


def batch_dim(spec: ComponentSpec) -> Dim | None:
    """The dim every input and output leads with, if there is one: Triton's batch dimension."""
    leading = {t.shape[0] if t.shape else None for t in spec.inputs + spec.outputs}
    if len(leading) != 1:
        return None
    (name,) = leading
    if not isinstance(name, str):
        return None
    dim = spec.dim(name)
    return dim if isinstance(dim, Dim) else None


def batch_only(spec: ComponentSpec) -> frozenset[str]:
    """Tensors whose only dim is the batch, (B,): Triton needs one more dim on the wire, so they
    travel as (B, 1) and the config reshapes them back to (B,) for the model."""
    batch = batch_dim(spec)
    if batch is None:
        return frozenset()
    return frozenset(t.name for t in spec.inputs + spec.outputs if t.shape == (batch.name,))


def to_wire(spec: ComponentSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    flat = batch_only(spec)
    return {n: a.reshape(a.shape + (1,)) if n in flat and a.ndim == 1 else a for n, a in arrays.items()}


def from_wire(spec: ComponentSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    flat = batch_only(spec)
    return {n: a.reshape(a.shape[:1]) if n in flat and a.ndim == 2 and a.shape[1] == 1 else a for n, a in arrays.items()}


class OptionKind(str, Enum):
    FILE = "file"
    TEXT = "text"
    TEXTS = "texts"  # a repeatable text option: shape (n,)
    INT = "int"
    FLOAT = "float"

    @property
    def triton_dtype(self) -> str:
        """The KServe v2 datatype of the tensor carrying an option of this kind."""
        return {"file": "BYTES", "text": "BYTES", "texts": "BYTES", "int": "INT64", "float": "FP64"}[self.value]


def option_kind(name: str) -> OptionKind:
    """The kind of option `name`, read from its argparse `type` in the catalog."""
    kind = OPTIONS[name][1].get("type")
    if OPTIONS[name][1].get("action") == "append":
        if kind is not None and kind is not str:
            raise TypeError(f"option {name}: only repeatable text options have a tensor kind")
        return OptionKind.TEXTS
    if kind is Path:
        return OptionKind.FILE
    if kind is int:
        return OptionKind.INT
    if kind is float:
        return OptionKind.FLOAT
    if kind is None or kind is str:
        return OptionKind.TEXT
    raise TypeError(f"option {name}: no tensor kind for argparse type {kind!r}")


@dataclass(frozen=True)
class RequestTensor:
    name: str
    kind: OptionKind
    required: bool


def request_tensors(definition: PipelineDefinition) -> tuple[RequestTensor, ...]:
    """The inputs of `definition`'s pipeline model, in catalog order."""
    names = sorted(definition.options, key=list(OPTIONS).index)
    return tuple(RequestTensor(n, option_kind(n), n in definition.required) for n in names)


def encode_request(definition: PipelineDefinition, options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Client side: request options (as `adgen generate` takes them) -> input arrays."""
    tensors = {t.name: t for t in request_tensors(definition)}
    unknown = sorted(set(options) - set(tensors))
    if unknown:
        raise InputError(unknown[0], f"is not an option of pipeline {definition.name}")
    feed = {}
    for name, value in options.items():
        if value is None:
            continue
        kind = tensors[name].kind
        if kind is OptionKind.FILE:
            feed[name] = np.array([read_capped(value, name, MAX_FILE_BYTES, "a file")], dtype=np.object_)
        elif kind is OptionKind.TEXT:
            feed[name] = np.array([str(value).encode("utf-8")], dtype=np.object_)
        elif kind is OptionKind.TEXTS:
            if isinstance(value, (str, bytes)) or not value:
                raise InputError(name, "expected a non-empty list of texts", repr(value))
            feed[name] = np.array([str(v).encode("utf-8") for v in value], dtype=np.object_)
        elif kind is OptionKind.INT:
            feed[name] = np.array([value], dtype=np.int64)
        else:
            feed[name] = np.array([value], dtype=np.float64)
    return feed


def decode_request(
    definition: PipelineDefinition, arrays: Mapping[str, np.ndarray | None], folder: Path
) -> dict[str, Any]:
    """Server side: input arrays -> request options; file options are written under `folder`."""
    options: dict[str, Any] = {}
    for t in request_tensors(definition):
        array = arrays.get(t.name)
        if array is None:
            if t.required:
                raise InputError(t.name, f"is required by pipeline {definition.name}")
            continue
        if t.kind is OptionKind.TEXTS:
            options[t.name] = _texts(t.name, array)
            continue
        if array.shape != (1,):
            raise InputError(t.name, "expected a tensor of shape (1,)", tuple(array.shape))
        value = array[0]
        if t.kind in (OptionKind.FILE, OptionKind.TEXT):
            if not isinstance(value, (bytes, np.bytes_)):
                raise InputError(t.name, "expected a BYTES tensor", type(value).__name__)
            if t.kind is OptionKind.FILE:
                if len(value) > MAX_FILE_BYTES:
                    raise InputError(t.name, f"expected at most {MAX_FILE_BYTES} bytes", len(value))
                path = folder / t.name
                path.write_bytes(bytes(value))
                options[t.name] = path
            else:
                try:
                    options[t.name] = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(t.name, "expected UTF-8 text") from None
        elif t.kind is OptionKind.INT:
            options[t.name] = int(value)
        else:
            options[t.name] = float(value)
    return options


def _texts(name: str, array: np.ndarray) -> list[str]:
    if array.ndim != 1 or not 1 <= len(array) <= MAX_TEXTS:
        raise InputError(name, f"expected a tensor of shape (n,) with 1 <= n <= {MAX_TEXTS}", tuple(array.shape))
    texts = []
    for value in array:
        if not isinstance(value, (bytes, np.bytes_)):
            raise InputError(name, "expected a BYTES tensor", type(value).__name__)
        try:
            texts.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(name, "expected UTF-8 text") from None
    return texts


RESPONSE_OUTPUTS = (IMAGE_OUTPUT, REPORT_OUTPUT, PNG_OUTPUT)


def encode_response(
    image: np.ndarray, report: Mapping[str, Any], outputs: Sequence[str] = RESPONSE_OUTPUTS
) -> dict[str, np.ndarray]:
    """The response tensors named in `outputs` (a PNG is encoded only when asked for)."""
    encoders = {
        IMAGE_OUTPUT: lambda: image,
        REPORT_OUTPUT: lambda: np.array([json.dumps(report).encode()], dtype=np.object_),
        PNG_OUTPUT: lambda: np.array([png_bytes(image)], dtype=np.object_),
    }
    return {name: encoders[name]() for name in outputs if name in encoders}


def decode_response(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    image, report = outputs[IMAGE_OUTPUT], outputs[REPORT_OUTPUT]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BackendError(f"server returned {IMAGE_OUTPUT} {image.shape} {image.dtype}, expected (H, W, 3) uint8")
    if report.shape != (1,):
        raise BackendError(f"server returned {REPORT_OUTPUT} of shape {report.shape}, expected (1,)")
    return image, json.loads(bytes(report[0]).decode())
