"""`adgen generate --server` checks a request against the preset the SERVER serves, read from its
pipeline model's config, not against its own --preset default.

The server is the real tritonserver with the pipeline model's config exactly as the generator
writes it for sd15 (canvas sides 256..1024, where tiny allows 64..512), but with a stub model
behind it that answers any request with a blank canvas of the requested size: what is checked is
the client's choice of bounds and whether the request reached the server (its statistics), not
the networks, so no sd15 graphs are built.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

from runtime.cli import main  # noqa: E402
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.presets import get_preset  # noqa: E402
from runtime.serving.repository import (  # noqa: E402
    CONFIG,
    VERSION,
    RepositoryOptions,
    pipeline_config,
    render,
)
from runtime.serving.server import TritonServer  # noqa: E402

pytestmark = pytest.mark.triton

SERVED = "sd15"
STUB_MODEL = '''import json

import numpy as np
import triton_python_backend_utils as pb


def _int(request, name, default):
    tensor = pb.get_input_tensor_by_name(request, name)
    return default if tensor is None else int(tensor.as_numpy()[0])


class TritonPythonModel:
    """Answers every request with a blank canvas of the requested size."""

    def execute(self, requests):
        responses = []
        for request in requests:
            width, height = _int(request, "width", 8), _int(request, "height", 8)
            report = json.dumps({"timings_s": {"total": 0.0}, "stub": True}).encode()
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("image", np.zeros((height, width, 3), np.uint8)),
                pb.Tensor("report", np.array([report], dtype=np.object_)),
            ]))
        return responses
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("served-preset") / "repository"
    config = pipeline_config(get_pipeline("refadgen"), get_preset(SERVED), RepositoryOptions(pipeline_instances=1))
    (repository / "refadgen" / VERSION).mkdir(parents=True)
    (repository / "refadgen" / CONFIG).write_text(render(config))
    (repository / "refadgen" / VERSION / "model.py").write_text(STUB_MODEL)
    started = TritonServer(repository).start(120)
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tritonserver exit code {code}"


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from PIL import Image

    rgba = np.zeros((160, 128, 4), dtype=np.uint8)
    rgba[40:120, 30:100] = 255
    path = tmp_path_factory.mktemp("served-preset-product") / "product.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _requests_served(server) -> int:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/refadgen/stats", timeout=30) as response:
        stats = json.load(response)["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]) + int(stats["fail"]["count"])


def _generate(server, product, out, *extra):
    return main(["generate", "--pipeline", "refadgen", "--product", str(product), "--prompt", "studio", "--quiet",
                 "--out", str(out), "--server", server.grpc_url, *extra])


@pytest.mark.parametrize("preset", [[], ["--preset", SERVED]])
def test_a_size_only_the_servers_preset_allows_is_sent(server, product, tmp_path, preset):
    from PIL import Image

    assert get_preset("tiny").max_side < 1024 <= get_preset(SERVED).max_side
    before = _requests_served(server)
    out = tmp_path / "ad.png"
    assert _generate(server, product, out, "--width", "1024", "--height", "768", *preset) == 0
    assert _requests_served(server) == before + 1
    assert Image.open(out).size == (1024, 768)


def test_a_size_outside_the_servers_preset_is_refused_before_sending(server, product, tmp_path, capsys):
    assert get_preset("tiny").min_side <= 128 < get_preset(SERVED).min_side
    before = _requests_served(server)
    code = _generate(server, product, tmp_path / "ad.png", "--width", "128", "--height", "256")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, error
    assert error.startswith("adgen: error: width: expected a multiple of 8 in [256, 1024]"), error
    assert f"preset {SERVED}, served at {server.grpc_url}" in error and "(got 128)" in error, error
    assert _requests_served(server) == before
    assert not (tmp_path / "ad.png").exists()


def test_an_explicit_preset_other_than_the_servers_is_refused(server, product, tmp_path, capsys):
    before = _requests_served(server)
    code = _generate(server, product, tmp_path / "ad.png", "--preset", "tiny")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, error
    assert error == (f"adgen: error: preset: the server at {server.grpc_url} serves refadgen at preset {SERVED}: "
                     f"give --preset {SERVED} or leave it out (got tiny)"), error
    assert _requests_served(server) == before
