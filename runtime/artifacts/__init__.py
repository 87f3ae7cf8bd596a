"""What is built once and reused, and how it is found and checked: exported ONNX graphs (`graphs`:
the cache and its manifests), TensorRT engines (`engines`) and weights folders (`weights`)."""
