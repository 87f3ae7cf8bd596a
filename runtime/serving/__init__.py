"""Serving behind Triton Inference Server.

`repository` generates the model repository from the specs (through Triton's protobuf
model-config schema) and `config_check` refuses, at generation, a config tritonserver would not
load; `triton_models` holds the Python-backend models that repository points at (one per
component, hosting its ONNX Runtime session, and one BLS model per pipeline running the same
orchestrator as the in-process runtime); `server` starts and stops the real `tritonserver` and
`serve` prepares what it serves; `client` is the triton backend (a connection, typed and retried
errors) and `remote` calls a pipeline model from a client; `watchdog` reloads models whose stub
died. `protocol` declares, once, the tensors of a pipeline model's request and response, and
`names` the config parameter keys, the admin header and the shared-memory prefixes.

Nothing here is imported by `import runtime`: it needs tritonclient (the `triton` extra).
"""
