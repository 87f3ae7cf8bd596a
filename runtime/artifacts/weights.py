"""Where weights come from, and the fingerprint that keys every cache built from them.

Torch-free: the runtime keys its ONNX cache by this fingerprint without building networks.
A weights folder holds diffusers/transformers sub-folders (`text_encoder/`, `vae/`, optional
`tokenizer/`) and one `<pipeline>.safetensors` per pipeline holding its own parts under their
component names (`refadgen.safetensors`: `unet.*`, `reference_unet.*`, `image_encoder.*`;
`background.safetensors`; `layout.safetensors`; `poster.safetensors`).
Only safetensors are read: pickled checkpoints (.bin, .ckpt, .pt, .pth) are refused, never
unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import WeightsError

# Bump when random initialisation changes, so caches of old random graphs are not reused.
RANDOM_INIT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
REFADGEN_FILE = "refadgen.safetensors"  # `unet.*`, `reference_unet.*`, `image_encoder.*`
BACKGROUND_FILE = "background.safetensors"  # `background_unet.*`, `style_branch.*`
LAYOUT_FILE = "layout.safetensors"  # RADM: `layout_backbone.*`, `layout_head.*`
POSTER_FILE = "poster.safetensors"  # `plannet.*`, `render_cond.*`, `controlnet.*`, `poster_unet.*`, `image_encoder.*`


@dataclass(frozen=True)
class WeightsSource:
    """Random initialisation from `seed`, or the local folder `path`."""

    seed: int = 0
    path: Path | None = None

    def describe(self, with_path: bool = True) -> str:
        """The folder (only its name without `with_path`: what a server may tell a client), or the seed."""
        if self.path is None:
            return f"random init (seed {self.seed})"
        return str(self.path) if with_path else f"weights folder {self.path.name}"

    def fingerprint(self, preset: str) -> str:
        """Hash of the file contents (real weights) or of preset + seed (random init)."""
        h = hashlib.sha256()
        if self.path is None:
            h.update(f"random:{preset}:{self.seed}:v{RANDOM_INIT_VERSION}".encode())
        else:
            for file in weight_files(self.path):
                # Each entry framed as (name length, name, size, digest): no two folders collide.
                name = str(file.relative_to(self.path)).encode()
                h.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
                h.update(_file_digest(file))
        return h.hexdigest()[:16]


def weight_files(root: Path) -> list[Path]:
    """Every file that defines the weights under `root`, refusing pickled checkpoints."""
    if not root.is_dir():
        raise WeightsError(f"weights folder {root} does not exist or is not a folder")
    pickled = sorted(p for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise WeightsError(
            f"refusing pickled weights {pickled[0]}: convert them to safetensors first (pickle can run code)"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))
    if not any(p.suffix == ".safetensors" for p in files):
        raise WeightsError(f"no .safetensors files under {root}")
    return files


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()
