"""One check over a built `ModelConfig` message: what tritonserver 2.51 would refuse at load, and
what would load but mean nothing, fails at generation as a `ConfigError` naming model and field.

The rules are keyed by message type, and every message of the config is visited (nested ones,
repeated ones, map values), so a field added to the generator later is checked the same way
wherever a checked type appears. Triton's rules follow its core's model_config_utils
(ValidateModelConfig, ValidateIOShape, ValidateInstanceGroup); the others are marked as adgen's
own: a config Triton takes but silently changes or ignores.
"""

from __future__ import annotations

from typing import Callable, Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from runtime.errors import ConfigError
from runtime.pipelines import PIPELINES
from runtime.presets import PRESETS
from runtime.serving.names import PARAMETER_PREFIX, ConfigKey
from runtime.serving.resident import ResidentBounds
from runtime.specs.core import Precision

WILDCARD_DIM = -1
# platform -> the backend that runs it (Triton: "unexpected 'platform' and 'backend' pair")
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}

Rule = Callable[[mc.ModelConfig, str, Message], None]


def check_config(config: mc.ModelConfig) -> mc.ModelConfig:
    """`config` if every rule holds; else the first broken rule as a ConfigError."""
    for path, message in _messages(config, ""):
        for rule in RULES.get(message.DESCRIPTOR.full_name, ()):
            rule(config, path, message)
    return config


def _messages(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    """(path, message) for `message` and every message set inside it; repeated items are labelled
    by their name where they have one (`input[sample]`), else by index; map values by key."""
    yield path, message
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        name = _join(path, field.name)
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key, item in value.items():
                    yield from _messages(item, f"{name}[{key}]")
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            for index, item in enumerate(value):
                yield from _messages(item, f"{name}[{getattr(item, 'name', '') or index}]")
        else:
            yield from _messages(value, name)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _fail(config: mc.ModelConfig, path: str, field: str, rule: str, got: object) -> None:
    raise ConfigError(config.name, _join(path, field), rule, got)


def _model(config: mc.ModelConfig, path: str, message: mc.ModelConfig) -> None:
    if not config.name:
        _fail(config, path, "name", "must be set: the model's folder name (Triton: must specify 'name')", repr(""))
    if not config.backend and not config.platform:
        _fail(config, path, "backend", "a model must name a backend or a platform", repr(""))
    if config.platform:
        expected = PLATFORM_BACKENDS.get(config.platform)
        if expected is None:
            _fail(config, path, "platform", f"expected one of {sorted(PLATFORM_BACKENDS)}", repr(config.platform))
        if config.backend not in ("", expected):
            _fail(config, path, "backend", f"platform {config.platform} runs on backend {expected} (or leave it empty)",
                  repr(config.backend))
    if config.max_batch_size < 0:
        _fail(config, path, "max_batch_size", "must be >= 0 (0: the model does not batch)", config.max_batch_size)
    if not config.instance_group:
        _fail(config, path, "instance_group", "must have at least one instance group", "none")
    seen: dict[str, str] = {}
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            if tensor.name and tensor.name in seen:
                # adgen's: a request names tensors, so two with one name cannot both be meant
                owner = "an input" if seen[tensor.name] == "input" else "an output"
                _fail(config, path, f"{kind}[{tensor.name}].name",
                      f"must differ from every other input and output name ({owner} has it)", repr(tensor.name))
            seen[tensor.name] = kind
    for key, value in config.parameters.items():
        _parameter(config, path, key, value.string_value)
    if config.backend == "python" and config.dynamic_batching.HasField("default_queue_policy"):
        # adgen's: on 2.51 any queue policy turns off the batcher's prefetching and stalls calls
        # ~0.5 s (runtime/serving/admission.py); the fronts keep the bounds instead
        _fail(config, path, "dynamic_batching.default_queue_policy",
              "must be absent: Triton 2.51 stalls calls 0.5 s with one; adgen serve's fronts bound the queues", "set")


def _parameter(config: mc.ModelConfig, path: str, key: str, value: str) -> None:
    """adgen's: our parameters are read by our models; a misspelt key or a value they cannot
    parse would fail the model's load (or, worse, be ignored)."""
    field = f"parameters[{key}]"
    if not key:
        _fail(config, path, field, "parameter keys must not be empty", repr(key))
    if not key.startswith(PARAMETER_PREFIX):
        return  # Triton's own or another tool's
    try:
        known = ConfigKey(key)
    except ValueError:
        _fail(config, path, field, f"unknown adgen parameter: expected one of {[k.value for k in ConfigKey]}", repr(key))
    check = PARAMETER_VALUES.get(known)
    if check is not None and not check[0](value):
        _fail(config, path, field, check[1], repr(value))


def _is_int(text: str, minimum: int | None = None) -> bool:
    try:
        number = int(text)
    except ValueError:
        return False
    return minimum is None or number >= minimum


PARAMETER_VALUES: dict[ConfigKey, tuple[Callable[[str], bool], str]] = {
    ConfigKey.PIPELINE: (lambda v: v in PIPELINES, f"expected one of {sorted(PIPELINES)}"),
    ConfigKey.PRESET: (lambda v: v in PRESETS, f"expected one of {sorted(PRESETS)}"),
    ConfigKey.PRECISION: (lambda v: v in {p.value for p in Precision}, f"expected one of {[p.value for p in Precision]}"),
    ConfigKey.SPEC_HASH: (bool, "expected the spec's hash"),
    ConfigKey.SPECS_HASH: (bool, "expected the specs' hash"),
    ConfigKey.THREADS: (lambda v: _is_int(v, 0), "expected an integer >= 0 (0: ONNX Runtime's default)"),
    ConfigKey.BATCH_CALLS: (lambda v: v in ("0", "1"), "expected 0 or 1"),
    ConfigKey.INIT_SEED: (lambda v: _is_int(v, 0), "expected an integer >= 0"),
    ConfigKey.RESIDENT: (lambda v: _is_resident(v), "expected \"\" or \"entries,MiB,ttl_s\", each > 0"),
}


def _is_resident(text: str) -> bool:
    try:
        ResidentBounds.parse(text)
    except ValueError:
        return False
    return True


def _tensor(config: mc.ModelConfig, path: str, tensor: mc.ModelInput | mc.ModelOutput) -> None:
    """Triton's ValidateIOShape."""
    if not tensor.name:
        _fail(config, path, "name", "must be set", repr(""))
    if tensor.data_type == mc.TYPE_INVALID:
        _fail(config, path, "data_type", "must be set", mc.DataType.Name(tensor.data_type))
    if not tensor.dims:
        _fail(config, path, "dims", "must have at least one dim ([1] for a scalar, reshaped to [])", "[]")
    if any(d < 1 and d != WILDCARD_DIM for d in tensor.dims):
        _fail(config, path, "dims", "each dim must be >= 1, or -1 for a variable size", list(tensor.dims))
    if not tensor.HasField("reshape"):
        return
    reshape = list(tensor.reshape.shape)
    if not reshape and config.max_batch_size == 0:
        _fail(config, path, "reshape.shape", "may be empty only in a batching model (max_batch_size > 0): "
              "a non-batching model has no scalar tensors", "[]")
    if any(d < 1 and d != WILDCARD_DIM for d in reshape):
        _fail(config, path, "reshape.shape", "each dim must be >= 1, or -1 for a variable size", reshape)
    if not _same_elements(list(tensor.dims), reshape):
        _fail(config, path, "reshape.shape", f"must hold as many elements as dims {list(tensor.dims)} "
              "(the parts between variable dims too)", reshape)


def _same_elements(dims: list[int], reshape: list[int]) -> bool:
    """Triton's rule: an empty reshape takes one element; otherwise the runs between variable
    dims have equal products, run by run ([2, 4, -1, 6] -> [8, -1, 1, 6])."""
    if not reshape:
        return dims.count(WILDCARD_DIM) == 0 and _product(dims) == 1
    return _runs(dims) == _runs(reshape)


def _runs(dims: list[int]) -> list[int]:
    runs, current = [], 1
    for d in dims:
        if d == WILDCARD_DIM:
            runs.append(current)
            current = 1
        else:
            current *= d
    return runs + [current]


def _product(dims: list[int]) -> int:
    result = 1
    for d in dims:
        result *= d
    return result


def _dynamic_batching(config: mc.ModelConfig, path: str, batching: mc.ModelDynamicBatching) -> None:
    for size in batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            _fail(config, path, "preferred_batch_size", f"each must be in [1, max_batch_size {config.max_batch_size}]",
                  list(batching.preferred_batch_size))


def _queue_policy(config: mc.ModelConfig, path: str, policy: mc.ModelQueuePolicy) -> None:
    """adgen's: Triton reads 0 as 'unbounded' / 'no timeout'; a queue policy here exists to bound
    the queue and time requests out (503 at once instead of piling up)."""
    if policy.max_queue_size < 1:
        _fail(config, path, "max_queue_size", "must be >= 1: 0 is an unbounded queue", policy.max_queue_size)
    if policy.default_timeout_microseconds < 1:
        _fail(config, path, "default_timeout_microseconds",
              "must be >= 1 µs: Triton 2.51 applies queue timeouts only with a non-zero default",
              policy.default_timeout_microseconds)


def _instance_group(config: mc.ModelConfig, path: str, group: mc.ModelInstanceGroup) -> None:
    if group.count < 1:
        # Triton replaces a count < 1 by its default (1, or 2 for ONNX Runtime): not what was asked
        _fail(config, path, "count", "must be >= 1", group.count)
    if group.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL) and group.gpus:
        _fail(config, path, "gpus", f"must be empty for {mc.ModelInstanceGroup.Kind.Name(group.kind)}", list(group.gpus))


RULES: dict[str, tuple[Rule, ...]] = {
    mc.ModelConfig.DESCRIPTOR.full_name: (_model,),
    mc.ModelInput.DESCRIPTOR.full_name: (_tensor,),
    mc.ModelOutput.DESCRIPTOR.full_name: (_tensor,),
    mc.ModelDynamicBatching.DESCRIPTOR.full_name: (_dynamic_batching,),
    mc.ModelQueuePolicy.DESCRIPTOR.full_name: (_queue_policy,),
    mc.ModelInstanceGroup.DESCRIPTOR.full_name: (_instance_group,),
}
