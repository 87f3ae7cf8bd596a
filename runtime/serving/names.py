"""Names the serving side shares, defined once: the `adgen_*` parameters of a generated model
config, the host file beside it, the admin and cancellation headers, the prefixes of the
shared-memory regions adgen creates, and the fragments of Triton 2.51's error messages that say
more than their status.

The config parameters are written by `repository`, read inside the server by `triton_models`
(and the generated `model.py`), and from outside by `client` and `watchdog`. Nothing here needs
tritonclient, so the command line can import it to build its parser.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from runtime.artifacts.architecture import resolve_preset
from runtime.artifacts.weights import WeightsSource
from runtime.presets import Preset

PARAMETER_PREFIX = "adgen_"  # every ConfigKey starts with it; the config check refuses unknown ones


class ConfigKey(str, Enum):
    """A `parameters { key: ... }` entry of a generated model config (values are strings)."""

    PIPELINE = "adgen_pipeline"  # the pipeline the model belongs to
    PRESET = "adgen_preset"  # the size preset its specs were generated for
    PRECISION = "adgen_precision"
    COMPONENT = "adgen_component"  # component models only
    SPEC_HASH = "adgen_spec_hash"  # component models: the component spec's hash
    SPECS_HASH = "adgen_specs_hash"  # pipeline models: the hash of all the pipeline's specs
    PROVIDER = "adgen_provider"  # ONNX Runtime execution provider of a component model
    THREADS = "adgen_threads"  # ONNX Runtime intra-op threads (0 = its default)
    BATCH_CALLS = "adgen_batch_calls"  # component models: "1" runs the requests of one execution as one call
    INIT_SEED = "adgen_init_seed"  # seed of the random init when there are no weights
    RESIDENT = "adgen_resident"  # component models: "entries,MiB,ttl_s" of the per-request invariants kept ("" none)

    def __str__(self) -> str:  # the key itself, in messages and f-strings on every Python
        return self.value


# This host's folders are no business of a client: they live in HOST_FILE beside a model's
# config.pbtxt (which Triton serves to anyone), never in the config.
HOST_FILE = "host.json"


class HostKey(str, Enum):
    """An entry of a model's HOST_FILE (values are strings; a missing file means all empty)."""

    ROOT = "runtime_root"  # folder `runtime` is imported from ("" = the installed package)
    GRAPHS_DIR = "graphs_dir"  # component models: folder from `adgen export`
    WEIGHTS = "weights"  # weights folder ("" = random init): the architecture, the tokenizer, the weights
    CANCEL_DIR = "cancel_dir"  # pipeline models: where the front marks requests whose client left

    def __str__(self) -> str:
        return self.value


def read_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The parameters of a model config in its JSON form (what the server's config endpoint and a
    Python model's `args["model_config"]` give): key -> string value."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def config_weights(parameters: Mapping[str, str], host: Mapping[str, str]) -> WeightsSource:
    """The weights of a model: its config's seed (read_parameters' output) and the weights folder
    its host file names (a path: never in the config, which clients can read)."""
    folder = host.get(HostKey.WEIGHTS.value)
    return WeightsSource(seed=int(parameters.get(ConfigKey.INIT_SEED) or 0), path=Path(folder) if folder else None)


def config_preset(parameters: Mapping[str, str], host: Mapping[str, str]) -> Preset:
    """The sizes a model was generated at: its config's preset, with its weights folder's architecture."""
    return resolve_preset(parameters[ConfigKey.PRESET], config_weights(parameters, host))


# Endpoints that change or expose the server (load/unload models, register shared memory, set log
# or trace files) answer only requests carrying this header with the operator's key.
ADMIN_HEADER = "adgen-admin-key"
ADMIN_KEY_ENV = "ADGEN_ADMIN_KEY"  # where `adgen serve` and the clients read the key by default
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton 2.51 expects restricted gRPC headers under it

# The HTTP front gives each inference request a random token in this header (Triton forwards it to
# the model as a request parameter) and, when the client disconnects, creates a file of that name in
# the pipeline models' HostKey.CANCEL_DIR: gRPC cancels natively, HTTP/1.1 has no other way.
CANCEL_HEADER = "adgen-cancel-token"

# Fragments of Triton 2.51 error messages, consulted only where the status leaves the meaning open
# (observed; lower case): a model loading, unloading or gone; a restricted endpoint without the key; a
# Python stub that died; a full queue or a request that waited past its queue timeout; a request
# without inputs its model's config requires.
NOT_READY_MESSAGES = ("has no available versions", "is not ready")
RESTRICTED_MESSAGE = "is restricted, expecting header"
STUB_DEAD_MESSAGE = "is not healthy"
QUEUE_MESSAGES = ("exceeds maximum queue size", "request timeout expired")
MISSING_INPUTS_MESSAGE = "missing required input(s)"  # a request without inputs the config requires
# adgen's fronts say this while tritonserver is down (restarting)
NOT_ANSWERING_MESSAGE = "the inference server is not answering"

# /dev/shm names: a server's Python-backend regions start with SERVER_REGION_PREFIX<pid>_<id>_,
# a client connection's with CLIENT_REGION_PREFIX<pid>_<n>.
SERVER_REGION_PREFIX = "adgen_"
CLIENT_REGION_PREFIX = "adgen_client_"
