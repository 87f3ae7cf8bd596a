"""What happens to a traced ONNX graph before it is saved: clean-up, fp16 conversion, and
saving with external data when it is too large for one protobuf.

- Clean-up (`Cleanup`): ONNX Runtime's offline optimizer at its basic level (constant folding,
  redundant-node elimination, standard-op fusions; the result is plain ONNX any runtime reads),
  or onnxslim, or nothing. `benchmarks/graph_cleanup.py` measures each on ONNX Runtime step time.
- fp16 (`to_float16`): every float initializer and op in float16, except the ops in
  `FP32_OPS` (normalizations and softmax: their reductions overflow or lose the small
  differences they exist to keep), which run in float32 between casts. Graph inputs and outputs
  take the dtype their spec declares (timestep and scales stay float32).
- External data: a graph whose weights pass `EXTERNAL_DATA_THRESHOLD` is written as
  `<component>.onnx` plus one `<component>.onnx.data` (protobuf cannot hold 2 GB; the fp32 SD 1.5
  U-Net is 3.4 GB).
"""

from __future__ import annotations

import shutil
import tempfile
from enum import Enum
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from runtime.errors import ExportError
from runtime.specs.core import ComponentSpec, DType

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf's hard limit is 2 GiB

# Kept in float32 inside fp16 graphs. GroupNorm exports as Reshape + InstanceNormalization at
# opset 17, LayerNorm as LayerNormalization; attention's softmax as Softmax (portable form).
FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax")

_ONNX_DTYPES = {DType.FLOAT32: TensorProto.FLOAT, DType.FLOAT16: TensorProto.FLOAT16,
                DType.INT64: TensorProto.INT64, DType.INT32: TensorProto.INT32}


class Cleanup(str, Enum):
    """Graph clean-up applied before saving."""

    NONE = "none"
    ORT_BASIC = "ort-basic"
    ONNXSLIM = "onnxslim"


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in `model` (raw or typed fields)."""
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def save_graph(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Write `model` to `path`; with its weights in `<path>.data` when they pass `threshold`.
    Returns whether external data was used. Clears `model`'s weights when it was (onnx moves
    them out of the proto while saving)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    external = weight_bytes(model) > threshold
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return external


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph at `path` with its external data (if any) read in."""
    return onnx.load(str(path), load_external_data=True)


def cleanup(model: onnx.ModelProto, how: Cleanup, scratch: Path) -> onnx.ModelProto:
    """`model` after clean-up `how`. `scratch` is an empty folder for ONNX Runtime's round trip."""
    if how is Cleanup.NONE:
        return model
    if how is Cleanup.ONNXSLIM:
        try:
            import onnxslim
        except ImportError as e:
            raise ExportError("clean-up onnxslim needs the onnxslim package: pip install onnxslim") from e
        return onnxslim.slim(model)
    return _ort_offline(model, scratch)


def _ort_offline(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """ONNX Runtime's basic-level optimizer, saved to a file. Basic only: extended and higher
    write ONNX Runtime contrib ops assigned to the CPU, and layout-level (NCHWc) rewrites are
    specific to this machine's CPU, neither of which another runtime or GPU should inherit."""
    import onnxruntime as ort

    source, target = scratch / "in.onnx", scratch / "out.onnx"
    save_graph(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "out.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types; say which pass failed
        raise ExportError(f"ONNX Runtime offline optimization failed: {e}") from e
    return load_graph(target)


def to_float16(model: onnx.ModelProto, spec: ComponentSpec, scratch: Path) -> onnx.ModelProto:
    """The float16 twin of a float32 graph; graph I/O dtypes follow `spec`. `scratch` is an
    empty folder for the shape-inference round trip of graphs past 2 GB."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = [t.name for t in spec.inputs + spec.outputs if t.dtype is DType.FLOAT32]
    # The converter needs every intermediate value typed to put casts around the float32 ops.
    # In-memory shape inference serialises the model, which fails past 2 GB: go through files.
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        source, typed = scratch / "untyped.onnx", scratch / "typed.onnx"
        save_graph(model, source)
        del model
        onnx.shape_inference.infer_shapes_path(str(source), str(typed))
        model = onnx.load(str(typed), load_external_data=False)
        onnx.load_external_data_for_model(model, str(scratch))
    else:
        model = onnx.shape_inference.infer_shapes(model)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
        disable_shape_infer=True,
    )
    _merge_duplicate_nodes(converted.graph)
    return converted


def _merge_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Drop repeated copies of a node. The converter inserts one Cast per float32 consumer of a
    value, all with the same name and output: a value feeding several LayerNorms (the
    resampler's input, at every depth) would otherwise give an invalid graph."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in graph.node:
        first = seen.get(node.name) if node.name else None
        if first is None:
            seen[node.name] = node
            keep.append(node)
        elif first.SerializeToString() != node.SerializeToString():
            raise ExportError(f"fp16 conversion produced two different nodes named {node.name!r}")
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def check_io_dtypes(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Raise ExportError unless every graph input and output has its spec dtype."""
    for kind, values, tensors in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        got = {v.name: v.type.tensor_type.elem_type for v in values}
        for t in tensors:
            if got.get(t.name) != _ONNX_DTYPES[t.dtype]:
                name = TensorProto.DataType.Name(got[t.name]) if t.name in got else "absent"
                raise ExportError(f"{spec.name}.{t.name}: graph {kind} is {name}, spec says {t.dtype.value}")


def scratch_folder(parent: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
