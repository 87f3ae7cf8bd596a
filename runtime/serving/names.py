"""Names the serving side shares, defined once: the `adgen_*` parameters of a generated model
config, the admin header with its environment variable, and the prefixes of the shared-memory
regions adgen creates.

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
    GRAPHS_DIR = "adgen_graphs_dir"  # folder from `adgen export` ("" in the committed repository)
    ROOT = "adgen_root"  # folder `runtime` is imported from ("" = the installed package)
    PROVIDER = "adgen_provider"  # ONNX Runtime execution provider of a component model
    THREADS = "adgen_threads"  # ONNX Runtime intra-op threads (0 = its default)
    WEIGHTS = "adgen_weights"  # weights folder ("" = random init): architecture, tokenizer
    INIT_SEED = "adgen_init_seed"  # seed of the random init when there are no weights

    def __str__(self) -> str:  # the key itself, in messages and f-strings on every Python
        return self.value


def read_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The parameters of a model config in its JSON form (what the server's config endpoint and a
    Python model's `args["model_config"]` give): key -> string value."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def config_weights(parameters: Mapping[str, str]) -> WeightsSource:
    """The weights a model config names (read_parameters' output)."""
    folder = parameters.get(ConfigKey.WEIGHTS)
    return WeightsSource(seed=int(parameters.get(ConfigKey.INIT_SEED) or 0), path=Path(folder) if folder else None)


def config_preset(parameters: Mapping[str, str]) -> Preset:
    """The sizes a model config was generated at: its preset, with its weights folder's architecture."""
    return resolve_preset(parameters[ConfigKey.PRESET], config_weights(parameters))


# Endpoints that change or expose the server (load/unload models, register shared memory, set log
# or trace files) answer only requests carrying this header with the operator's key.
ADMIN_HEADER = "adgen-admin-key"
ADMIN_KEY_ENV = "ADGEN_ADMIN_KEY"  # where `adgen serve` and the clients read the key by default
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton 2.51 expects restricted gRPC headers under it

# /dev/shm names: a server's Python-backend regions start with SERVER_REGION_PREFIX<pid>_<id>_,
# a client connection's with CLIENT_REGION_PREFIX<pid>_<n>.
SERVER_REGION_PREFIX = "adgen_"
CLIENT_REGION_PREFIX = "adgen_client_"
