"""docs/wire-format.md against a real `adgen serve` (all four pipelines, tiny, loopback): its curl
commands and its tritonclient script, extracted from the page and run exactly as written (only
the addresses and the examples folder come from the environment, as the page says), must give an
ad per pipeline; its tables must list each pipeline model's inputs as the protocol derives them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

from benchmarks.served import REPO, serve  # noqa: E402
from runtime.pipelines import PIPELINES, get_pipeline  # noqa: E402
from runtime.serving.protocol import request_tensors  # noqa: E402

DOC = REPO / "docs" / "wire-format.md"
CURL_SECTION = "## curl"
CLIENT_SECTION = "## tritonclient"


def _blocks(language: str, section: str) -> list[str]:
    """The fenced `language` blocks of the page's `section` (up to the next `## ` heading)."""
    text = DOC.read_text()
    part = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", part, flags=re.S)


def test_the_page_lists_each_models_inputs_as_the_protocol_derives_them():
    rows = dict(re.findall(r"^\| `(\w+)` \| (\*\*product\*\*.*) \|$", DOC.read_text(), flags=re.M))
    assert sorted(rows) == sorted(PIPELINES)
    for name, listed in rows.items():
        expected = [f"**{t.name}**" if t.required else t.name for t in request_tensors(get_pipeline(name))]
        assert [item.strip() for item in listed.split(",")] == expected, name


@pytest.fixture(scope="module")
def served(tiny_export, cache_root):
    for pipeline in PIPELINES:
        tiny_export(pipeline)
    started = serve(cache_root, pipelines=tuple(PIPELINES), extra=("--instances", "1"))
    try:
        assert started.ready, started.log()
        yield started
    finally:
        started.stop()


def _environment(served) -> dict[str, str]:
    return {**os.environ, "HTTP": served.http_url, "GRPC": served.grpc_url, "EXAMPLES": str(REPO / "examples")}


def _is_ad(path: Path, size: tuple[int, int] = (128, 160)) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.format == "PNG" and im.size == size and np.asarray(im.convert("RGB")).std() > 0


def test_curl_commands_as_written(served, tmp_path):
    script = "\n".join(_blocks("bash", CURL_SECTION))
    assert "curl" in script and script.count("infer_png ") >= 3
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=_environment(served),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for pipeline in PIPELINES:
        assert _is_ad(tmp_path / f"{pipeline}.png"), pipeline
        report = (tmp_path / f"{pipeline}.json").read_text()
        assert '"name":"report"' in report.replace(" ", ""), report[:300]


def test_tritonclient_script_as_written(served, tmp_path):
    (script,) = _blocks("python", CLIENT_SECTION)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_environment(served),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for pipeline in PIPELINES:
        assert _is_ad(tmp_path / f"{pipeline}-client.png"), pipeline
    assert done.stdout.count(" -> ") == len(PIPELINES), done.stdout
