"""Every pipeline through the served path: ONE real tritonserver (the one bundled in
nvidia-pytriton) serves refadgen, background, layout and poster at tiny on loopback, and each
gets a request through `PipelineClient` (the BLS path: the pipeline's own orchestrator inside the
server, its components BLS calls to the component models).

Tolerance: none. The server runs the same exported graphs on the same ONNX Runtime CPU kernels,
with the same batch per call and the same numpy orchestrator as the in-process pipeline, and BLS
passes tensors in their spec dtypes, so the images are bit-identical; any difference is a bug in
transport. The selling points travel as the `text` BYTES tensor (non-ASCII included) and must come
back as the report's text elements.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

from runtime.api import generate, load_pipeline  # noqa: E402
from runtime.inputs.images import load_product, place_on_canvas  # noqa: E402
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.serving.client import NO_RETRY  # noqa: E402
from runtime.serving.remote import PipelineClient  # noqa: E402
from runtime.serving.repository import RepositoryOptions  # noqa: E402
from runtime.serving.serve import start_server  # noqa: E402

pytestmark = pytest.mark.triton

STEPS = 2
TEXTS = ["Breathable mesh", "40% off", "Neu: leicht wie nie ✓"]
# Per pipeline, on top of its example options (product, and background's reference): the request.
REQUESTS = {
    "refadgen": {"prompt": "a sneaker on a wooden table", "steps": STEPS, "seed": 3},
    "background": {"category": "sneakers", "steps": STEPS, "seed": 4},
    "layout": {"text": TEXTS, "layout_steps": STEPS, "seed": 5},
    "poster": {"prompt": "a sneaker in a bright studio", "text": TEXTS, "steps": STEPS, "layout_steps": STEPS, "seed": 6},
}
COMPOSITED = ("refadgen", "background", "poster")  # the image is the product pasted on a generated one


@pytest.fixture(scope="module")
def server(cache_root):
    started = start_server(list(REQUESTS), "tiny", cache_dir=cache_root, timeout_s=600,
                           options=RepositoryOptions(pipeline_instances=1))
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tritonserver exit code {code}"  # 0 only if every client closed its connections
    assert not started.leftover_regions()


@pytest.fixture(scope="module")
def requests(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("served-pipelines")
    made = {}
    for name, options in REQUESTS.items():
        (folder / name).mkdir()
        made[name] = {**get_pipeline(name).example_options(folder / name, tiny), **options}
    return made


@pytest.mark.parametrize("pipeline", list(REQUESTS))
def test_served_pipeline_gives_the_in_process_image(pipeline, server, requests, cache_root):
    options = requests[pipeline]
    with PipelineClient(server.grpc_url, retry=NO_RETRY) as client:
        served = client.generate(get_pipeline(pipeline), options)
    local = load_pipeline(pipeline, preset="tiny", backend="onnxruntime", cache_dir=cache_root)
    try:
        expected = generate(local, **options)
    finally:
        local.close()

    assert served.image.dtype == np.uint8 and served.image.shape == expected.image.shape
    assert np.array_equal(served.image, expected.image), np.abs(served.image.astype(int) - expected.image).max()
    report = served.report
    assert (report["pipeline"], report["preset"], report["backend"]) == (pipeline, "tiny", "triton-bls")
    assert report["server"]["model"] == pipeline and report["seed"] == options["seed"]
    assert (report["width"], report["height"]) == (expected.report["width"], expected.report["height"])
    if pipeline in COMPOSITED:
        placed, _ = place_on_canvas(load_product(options["product"]), report["width"], report["height"])
        assert placed.mask.any()
        assert np.array_equal(served.image[placed.mask], placed.rgb[placed.mask]), "product pixels changed"
    if "text" in options:
        # the selling points crossed the wire as UTF-8 BYTES and the server planned a box for each
        assert report["layout"] == expected.report["layout"]
        texts = [e["text"] for e in report["layout"]["elements"] if e["class"] == "text"]
        assert sorted(texts) == sorted(TEXTS), texts
    if pipeline == "poster":
        assert [t["text"] for t in report["typeset"]] == TEXTS
        assert report["typeset"] == expected.report["typeset"]
