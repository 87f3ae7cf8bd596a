"""Bad input at every entry: the Python API, `adgen generate`, the pipeline model in Triton (HTTP
with the raw bytes, gRPC through `PipelineClient`) and the component models in Triton (tensors
sent straight to them). Each class gets a typed error naming the field and the rule (HTTP 400 /
INVALID_ARGUMENT over Triton); every outcome goes into the session's tally (conftest.py).

Prompts and negative prompts are the texts covered here; selling points (layout and poster) meet
the server in test_triton_pipelines.py.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.inputs.tokenizer import MAX_PROMPT_CHARS
from runtime.pipelines import get_pipeline
from runtime.pipelines.options import OPTIONS
from runtime.serving.names import ADMIN_HEADER, GRPC_HEADER_PREFIX

H, W = 160, 128


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0.5 setgray 0 0 16 16 rectfill showpage\n%%EOF\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-inputs")
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(7).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    rgba[40:120, 30:100, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "good.png")
    (d / "text.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "good.png").read_bytes()[:300])
    frames = [Image.new("RGB", (W, H), (255, 0, 0)), Image.new("RGB", (W, H), (0, 0, 255))]
    frames[0].save(d / "animated.png", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(d / "still.gif")
    (d / "product.eps").write_bytes(EPS)
    # 100-odd bytes whose header claims 6000 x 6000: refused unread (the data cannot hold that)
    (d / "liar.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 6000, 6000, 8, 0, 0, 0, 0))
                                 + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    # ~100 KB whose header claims 60000 x 60000 pixels: refused from the header, never decoded
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                 + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100_000)) + _png_chunk(b"IEND", b""))
    Image.new("F", (W, H), 1.0).save(d / "float.tif")
    Image.new("L", (W, H), 100).save(d / "gray.png")
    Image.new("CMYK", (W, H), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((H, W), 30000, dtype=np.uint16)).save(d / "gray16.png")
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[40:120, 30:100] = 255
    Image.fromarray(mask, "L").save(d / "mask.png")
    Image.new("L", (64, 64), 255).save(d / "small_mask.png")
    empty = rgba.copy()
    empty[..., 3] = 0
    Image.fromarray(empty, "RGBA").save(d / "empty_alpha.png")
    full = rgba.copy()
    full[..., 3] = 255
    Image.fromarray(full, "RGBA").save(d / "full_alpha.png")
    Image.new("RGB", (W, H), (9, 9, 9)).save(d / "rgb.png")
    return {p.stem: p for p in d.iterdir()}


# case -> (options given the files, field, rule the message must contain); None: accepted by conversion
CASES: dict[str, tuple[Callable[[dict], dict], str | None, str | None]] = {
    "unreadable (text named .png)": (lambda f: {"product": f["text"]}, "product", "is not a recognized image file"),
    "empty file": (lambda f: {"product": f["empty"]}, "product", "is not a recognized image file"),
    "truncated": (lambda f: {"product": f["truncated"]}, "product", "truncated or corrupt"),
    "animated": (lambda f: {"product": f["animated"]}, "product", "expected a still image"),
    "decompression bomb": (lambda f: {"product": f["bomb"]}, "product", "too many pixels"),
    "header claims more pixels than its data": (lambda f: {"product": f["liar"]}, "product", "holds less data than"),
    "TIFF (not decoded)": (lambda f: {"product": f["float"]}, "product", "expected PNG, JPEG or WebP"),
    "GIF (not decoded)": (lambda f: {"product": f["still"]}, "product", "expected PNG, JPEG or WebP"),
    "EPS (never reaches Ghostscript)": (lambda f: {"product": f["product"]}, "product", "expected PNG, JPEG or WebP"),
    "grayscale without mask": (lambda f: {"product": f["gray"]}, "product", "expected an RGBA image"),
    "CMYK without mask": (lambda f: {"product": f["cmyk"]}, "product", "expected an RGBA image"),
    "CMYK with mask": (lambda f: {"product": f["cmyk"], "mask": f["mask"]}, None, None),
    "16-bit grayscale with mask": (lambda f: {"product": f["gray16"], "mask": f["mask"]}, None, None),
    "empty mask": (lambda f: {"product": f["empty_alpha"]}, "mask", "is empty"),
    "full mask": (lambda f: {"product": f["full_alpha"]}, "mask", "covers the whole image"),
    "mask of another size": (lambda f: {"product": f["rgb"], "mask": f["small_mask"]}, "mask", "expected the product's size"),
    "width not a multiple of 8": (lambda f: {"width": 100, "height": 160}, "width", "multiple of 8"),
    "height out of bounds": (lambda f: {"width": 128, "height": 4096}, "height", "multiple of 8 in"),
    "steps zero": (lambda f: {"steps": 0}, "steps", "expected an integer in [1, 500]"),
    "steps too many": (lambda f: {"steps": 100_000}, "steps", "expected an integer in [1, 500]"),
    "guidance out of range": (lambda f: {"guidance": 100.0}, "guidance", "expected a number in"),
    "guidance NaN": (lambda f: {"guidance": float("nan")}, "guidance", "expected a number in"),
    "afm scale negative": (lambda f: {"afm_scale": -1.0}, "afm_scale", "expected a number in"),
    "seed negative": (lambda f: {"seed": -1}, "seed", "expected an integer in"),
    "prompt empty": (lambda f: {"prompt": "   "}, "prompt", "not empty text"),
    "prompt too long": (lambda f: {"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "prompt", f"at most {MAX_PROMPT_CHARS}"),
    "prompt control character": (lambda f: {"prompt": "shoe\x07"}, "prompt", "control characters"),
    "negative prompt control character": (lambda f: {"negative_prompt": "blur\x1b[2J"}, "negative_prompt", "control characters"),
}


def _options(case: str, files: dict[str, Path]) -> dict[str, Any]:
    options = {"product": files["good"], "prompt": "a sneaker on a table", "steps": 1, "seed": 0}
    options.update(CASES[case][0](files))
    return options


def _judge(tally, entry: str, case: str, message: str | None, field: str | None, rule: str | None,
           typed: bool, image: np.ndarray | None = None) -> None:
    """Record and assert: an error starting `field: ` holding `rule` from a typed exception, or
    (conversion cases) an image."""
    if field is None:
        ok = message is None and image is not None and image.shape == (H, W, 3)
        tally.record(entry, case, "converted" if ok else "unexpected", str(message))
        assert ok, message
        return
    ok = typed and message is not None and f"{field}: " in message and rule in message
    tally.record(entry, case, "clear" if ok else "unexpected", str(message))
    assert ok, f"{entry} / {case}: expected '{field}: ...{rule}...', got {message!r} (typed={typed})"


@pytest.mark.parametrize("case", list(CASES))
def test_python_api(case, files, ort_pipeline, bad_input_tally):
    from runtime.api import generate

    _, field, rule = CASES[case]
    try:
        result = generate(ort_pipeline, **_options(case, files))
    except InputError as e:
        _judge(bad_input_tally, "api", case, str(e), field, rule, typed=e.field == field)
    else:
        _judge(bad_input_tally, "api", case, None, field, rule, typed=False, image=result.image)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
def test_cli(case, files, tiny_graphs, cache_root, tmp_path, capsys, bad_input_tally):
    from runtime.cli import main

    argv = ["generate", "--pipeline", "refadgen", "--preset", "tiny", "--quiet", "--cache-dir", str(cache_root),
            "--out", str(tmp_path / "ad.png")]
    for name, value in _options(case, files).items():
        argv += [OPTIONS[name][0][0], str(value)]
    code = main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    _, field, rule = CASES[case]
    _judge(bad_input_tally, "cli", case, last, field, rule, typed=code == 2 and last.startswith(f"adgen: error: {field}: "))
    assert not (tmp_path / "ad.png").exists()


@pytest.fixture(scope="module")
def server(tiny_graphs, cache_root):
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    from runtime.serving.repository import RepositoryOptions
    from runtime.serving.serve import start_server

    started = start_server(["refadgen"], "tiny", cache_dir=cache_root, timeout_s=300,
                           options=RepositoryOptions(pipeline_instances=2))
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0 and not started.leftover_regions()


def _http_infer(server, model: str, feed: dict[str, np.ndarray]) -> tuple[str, str, dict]:
    """(status, message, outputs) of one request with binary tensors; the client is closed after
    (an idle keep-alive would hold up the server's shutdown)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from runtime.serving.client import http_inputs

    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        try:
            result = client.infer(model, http_inputs(feed))
        except InferenceServerException as e:
            return str(e.status()), e.message(), {}
        return "200", "", {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    finally:
        client.close()


@pytest.mark.triton
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_model_over_http(case, files, server, bad_input_tally):
    from runtime.serving.protocol import encode_request

    _, field, rule = CASES[case]
    status, message, outputs = _http_infer(server, "refadgen", encode_request(get_pipeline("refadgen"), _options(case, files)))
    if field is None:
        _judge(bad_input_tally, "triton-http", case, message or None, None, None, typed=False,
               image=outputs.get("image") if status == "200" else None)
    else:
        _judge(bad_input_tally, "triton-http", case, message, field, rule, typed=status == "400")
        assert "adgen-request-" not in message and "/tmp" not in message, "a server path in the answer"


@pytest.mark.triton
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
def test_pipeline_model_over_grpc(case, files, server, bad_input_tally):
    from runtime.errors import ServerRequestError
    from runtime.serving.client import NO_RETRY
    from runtime.serving.remote import PipelineClient

    _, field, rule = CASES[case]
    with PipelineClient(server.grpc_url, retry=NO_RETRY) as client:
        try:
            client.generate(get_pipeline("refadgen"), _options(case, files))
            message, typed = None, False
        except ServerRequestError as e:
            message, typed = str(e), e.status == "StatusCode.INVALID_ARGUMENT"
    _judge(bad_input_tally, "triton-grpc", case, message, field, rule, typed=typed)


RAW_CASES = {
    # a field that looks like a server path is only ever file *contents*
    "path as product": ({"product": b"/etc/passwd"}, "product", "is not a recognized image file"),
    "prompt not UTF-8": ({"prompt": b"\xff\xfe shoe"}, "prompt", "expected UTF-8 text"),
    "product over the size cap": (None, "product", "expected at most"),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_pipeline_model_raw_fields(case, files, server, bad_input_tally):
    from runtime.serving.protocol import MAX_FILE_BYTES

    values, field, rule = RAW_CASES[case]
    if values is None:
        values = {"product": b"\x89PNG" + bytes(MAX_FILE_BYTES)}
    feed = {"product": files["good"].read_bytes(), "prompt": b"a sneaker", **values}
    status, message, _ = _http_infer(server, "refadgen", {k: np.array([v], dtype=np.object_) for k, v in feed.items()})
    _judge(bad_input_tally, "triton-http", case, message, field, rule, typed=status == "400")


def _component_cases(specs) -> dict[str, tuple[str, dict[str, np.ndarray], str, str]]:
    unet, decoder = specs["unet"], specs["vae_decoder"]
    rng = np.random.default_rng(0)
    good = unet.sample_inputs(rng, unet.env_at("min"))
    latent = decoder.sample_inputs(rng, decoder.env_at("min"))
    ids = specs["text_encoder"].sample_inputs(rng, specs["text_encoder"].env_at("min"))
    return {
        "NaN": ("unet", dict(good, sample=np.full_like(good["sample"], np.nan)), "unet.sample", "expected finite values"),
        "Inf": ("vae_decoder", dict(latent, latent=np.full_like(latent["latent"], np.inf)), "vae_decoder.latent",
                "expected finite values"),
        "wrong dtype": ("unet", dict(good, sample=good["sample"].astype(np.float64)), "sample", "FP64"),
        "shape out of bounds": ("unet", unet.sample_inputs(rng, unet.env_at("min", latent_h=4)), "unet.sample",
                                "latent_h in [8, 64]"),
        "wrong rank": ("unet", dict(good, sample=good["sample"][:, :, 0]), "sample", "shape"),
        "timestep past the schedule": ("unet", dict(good, timestep=np.full_like(good["timestep"], 1e9)), "unet.timestep",
                                       "expected values in [0, 999]"),
        "negative timestep": ("unet", dict(good, timestep=np.full_like(good["timestep"], -5.0)), "unet.timestep",
                              "expected values in [0, 999]"),
        "token id past the vocabulary": ("text_encoder", dict(ids, input_ids=np.full_like(ids["input_ids"], 10**9)),
                                         "text_encoder.input_ids", "expected values in [0, "),
        "negative token id": ("text_encoder", dict(ids, input_ids=np.full_like(ids["input_ids"], -1)),
                              "text_encoder.input_ids", "expected values in [0, "),
    }


@pytest.mark.triton
@pytest.mark.parametrize("case", ["NaN", "Inf", "wrong dtype", "shape out of bounds", "wrong rank", "timestep past the schedule",
                                  "negative timestep", "token id past the vocabulary", "negative token id"])
def test_component_model_tensors(case, server, tiny_specs, bad_input_tally):
    from runtime.serving.protocol import model_name, to_wire

    component, feed, field, rule = _component_cases(tiny_specs)[case]
    status, message, _ = _http_infer(server, model_name("refadgen", component), to_wire(tiny_specs[component], feed))
    ok = status == "400" and field in message and rule in message
    bad_input_tally.record("triton-component", case, "clear" if ok else "unexpected", f"{status}: {message}")
    assert ok, (status, message)


# (status, message) -> error class, as Triton 2.51 answers (statuses observed against the real
# server: a Python model's INVALID_ARG error, an exception in execute, an unknown model, an unloaded
# model, a restricted endpoint, a full queue, a queue timeout, a killed stub, a client deadline).
UNHEALTHY = "Stub process 'refadgen_unet_0_0' is not healthy."
UNLOADED = "Request for unknown model: 'refadgen' has no available versions"
UNKNOWN = "Request for unknown model: 'refadgne' is not found"
QUEUE_FULL = "[request id: <id_unknown>] Exceeds maximum queue size"


@pytest.mark.parametrize("message, status, kind, retriable", [
    # decided by the status alone
    ("product: is not a recognized image file", "400", "ServerRequestError", False),
    ("product: is not a recognized image file", "StatusCode.INVALID_ARGUMENT", "ServerRequestError", False),
    (f"This API is restricted, expecting header '{ADMIN_HEADER}'", "403", "ServerAccessError", False),
    (UNKNOWN, "404", "ServerRequestError", False),
    (UNKNOWN, "StatusCode.NOT_FOUND", "ServerRequestError", False),
    (UNKNOWN, "400", "ServerRequestError", False),
    ("refadgen: BackendError: unet failed", "500", "ServerError", False),
    ("Failed to process the request(s) for model 'refadgen_0_0', message: RuntimeError: boom", "StatusCode.INTERNAL",
     "ServerError", False),
    (QUEUE_FULL, "503", "ServerBusyError", True),
    ("Request timeout expired", "503", "ServerBusyError", True),
    ("anything the server says", "503", "ServerBusyError", True),
    ("Received message larger than max (16777299 vs. 16777216)", "StatusCode.RESOURCE_EXHAUSTED", "ServerRequestError", False),
    ("too many calls", "StatusCode.RESOURCE_EXHAUSTED", "ServerBusyError", True),
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", "ServerError", False),
    # the status is ambiguous: the message decides
    (UNLOADED, "404", "ServerUnavailableError", True),
    (UNLOADED, "StatusCode.NOT_FOUND", "ServerUnavailableError", True),
    ("Request for unknown model: 'refadgen' is not ready", "400", "ServerUnavailableError", True),  # 2.51: not ready is 400
    (UNHEALTHY, "500", "ServerUnavailableError", True),
    (UNHEALTHY, "StatusCode.INTERNAL", "ServerUnavailableError", True),
    # a pipeline model whose component is being reloaded (its BLS call failed): 500 from the pipeline
    (f"refadgen: refadgen_unet: {UNLOADED}", "500", "ServerUnavailableError", True),
    (QUEUE_FULL, "StatusCode.UNAVAILABLE", "ServerBusyError", True),
    ("Request timeout expired", "StatusCode.UNAVAILABLE", "ServerBusyError", True),
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
     "StatusCode.UNAVAILABLE", "ServerUnavailableError", True),
    ("Socket closed", "StatusCode.UNAVAILABLE", "ServerUnavailableError", True),
    (f"This protocol is restricted, expecting header '{GRPC_HEADER_PREFIX}{ADMIN_HEADER}'", "StatusCode.UNAVAILABLE",
     "ServerAccessError", False),
    # the status wins over words in the message (a request's own text echoed in a 400)
    ("prompt: expected no control characters (got 'is restricted, expecting header\x07')", "400",
     "ServerRequestError", False),
    (f"refadgen: {QUEUE_FULL}", "500", "ServerError", False),
    # no status: the message is all there is
    (UNHEALTHY, "", "ServerUnavailableError", True),
    (QUEUE_FULL, "", "ServerBusyError", True),
    ("unexpected", "", "ServerError", False),
])
def test_server_errors_are_typed_and_only_transient_ones_retried(message, status, kind, retriable):
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    from runtime.serving.client import classify

    error = classify("refadgen", InferenceServerException(message, status=status or None))
    assert type(error).__name__ == kind and error.retriable is retriable and error.status == status
    assert str(error).startswith(f"refadgen: {message}")


def test_connection_errors_and_timeouts():
    pytest.importorskip("tritonclient.grpc")
    from runtime.serving.client import RetryPolicy, classify

    assert classify("m", ConnectionRefusedError(111, "Connection refused")).retriable
    assert not classify("m", TimeoutError("timed out")).retriable  # the request may still be running
    policy = RetryPolicy(attempts=5, base_s=0.5, cap_s=2.0)
    for retry in range(6):
        assert 0.25 * 2**min(retry, 2) <= policy.delay(retry) <= min(2.0, 0.5 * 2**retry)
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
