"""Where weights come from, what a weights folder holds, and the fingerprint that keys every
cache built from them.

Torch-free: the runtime keys its ONNX cache by the fingerprint, reads the folder's manifest and
checks which parts are trained without building a network.

A weights folder is what `adgen import` writes (or `networks.registry.save_random_weights`):

    adgen-weights.json       the manifest: each part's source and what it is, the source files'
                             sha256, what each import mapped and dropped, the processing profile
                             per pipeline (`read_weights_manifest`)
    tokenizer/               vocab.json + merges.txt (+ the tokenizer's own configs): the CLIP BPE
    <part>/config.json       the config the part's network is built from (its architecture)
    <part>/<weights file>    its tensors (safetensors), named as that network's state dict

A part is one network (`text_encoder`, `vae`, `unet`, `layout_head`, ...); a component runs the
network of its own name except those in COMPONENT_PARTS. A pipeline whose parts are not all
in the folder runs only with the missing ones named in `allow_random`.
Only safetensors are read: pickled checkpoints (.bin, .ckpt, .pt, .pth) are refused, never
unpickled; `adgen import` is the one place that reads them, to write such a folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from runtime.errors import InputError, WeightsError

# Bump when random initialisation changes, so caches of old random graphs are not reused.
RANDOM_INIT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHTS_MANIFEST = "adgen-weights.json"
MANIFEST_FORMAT = 1
CONFIG_FILE = "config.json"
TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TEXT_ENCODER = "text_encoder"  # the part whose trained weights need the tokenizer
# Components that run another component's network: the VAE serves both VAE components, the
# generation U-Net holds the AFM projections `afm_kv` applies once per request.
COMPONENT_PARTS = {"vae_encoder": "vae", "vae_decoder": "vae", "afm_kv": "unet"}
# Parts that are a library's own model keep its file name, so transformers/diffusers load the folder too.
_WEIGHTS_FILES = {TEXT_ENCODER: "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
_DEFAULT_WEIGHTS_FILE = "model.safetensors"


def part_of(component: str) -> str:
    """The part (network) a component runs."""
    return COMPONENT_PARTS.get(component, component)


def parts_of(components: Iterable[str]) -> tuple[str, ...]:
    """The parts behind `components`, each once, in order."""
    return tuple(dict.fromkeys(part_of(c) for c in components))


def part_config_path(root: Path, part: str) -> Path:
    return Path(root) / part / CONFIG_FILE


def part_weights_path(root: Path, part: str) -> Path:
    return Path(root) / part / _WEIGHTS_FILES.get(part, _DEFAULT_WEIGHTS_FILE)


def read_weights_manifest(path: Path) -> dict | None:
    """The manifest of the weights folder `path`, or None when it has none (not an adgen folder).
    Its `processing` maps pipeline -> the processing profile the weights were trained with."""
    file = Path(path) / WEIGHTS_MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file}: not readable as JSON ({e}); re-import the weights") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise WeightsError(f"{file}: expected an adgen weights manifest of format {MANIFEST_FORMAT}; re-import the weights")
    return manifest


def write_weights_manifest(path: Path, manifest: Mapping) -> Path:
    file = Path(path) / WEIGHTS_MANIFEST
    file.write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2, default=str) + "\n")
    return file


def read_part_config(root: Path, part: str) -> dict:
    path = part_config_path(root, part)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing {path}: the config that builds part {part}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not readable as JSON ({e})") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config


@dataclass(frozen=True)
class WeightsSource:
    """Random initialisation from `seed`, or the weights folder `path`, whose missing parts run
    randomly initialised (from `seed`) only when named in `allow_random`."""

    seed: int = 0
    path: Path | None = None
    allow_random: frozenset[str] = field(default_factory=frozenset)

    def describe(self, with_path: bool = True) -> str:
        """The folder (only its name without `with_path`: what a server may tell a client), or the seed."""
        if self.path is None:
            return f"random init (seed {self.seed})"
        return str(self.path) if with_path else f"weights folder {self.path.name}"

    def fingerprint(self, preset: str) -> str:
        """Hash of the file contents (real weights; plus the seed and the random parts, if any)
        or of preset + seed (random init)."""
        h = hashlib.sha256()
        if self.path is None:
            h.update(f"random:{preset}:{self.seed}:v{RANDOM_INIT_VERSION}".encode())
        else:
            for file in weight_files(self.path):
                # Each entry framed as (name length, name, size, digest): no two folders collide.
                name = str(file.relative_to(self.path)).encode()
                h.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
                h.update(_file_digest(file))
            if self.allow_random:
                h.update(f"random:{','.join(sorted(self.allow_random))}:{preset}:{self.seed}:v{RANDOM_INIT_VERSION}".encode())
        return h.hexdigest()[:16]

    def trained(self) -> frozenset[str]:
        """The parts the folder holds (none without a folder)."""
        return frozenset() if self.path is None else trained_parts(self.path)

    def is_trained(self, part: str) -> bool:
        return part in self.trained()

    def check(self, pipeline: str, parts: Sequence[str]) -> None:
        """Refuse a pipeline whose parts are neither in the folder nor allowed random, a
        `allow_random` that names no missing part, and a trained text encoder without its tokenizer."""
        if self.path is None:
            if self.allow_random:
                raise InputError("allow_random", "is for a weights folder with parts missing; without --weights every "
                                 "part is randomly initialised", sorted(self.allow_random))
            return
        trained = self.trained()
        unknown = sorted(self.allow_random - set(parts))
        if unknown:
            raise InputError("allow_random", f"expected parts of pipeline {pipeline}: {', '.join(parts)}", unknown)
        redundant = sorted(self.allow_random & trained)
        if redundant:
            raise InputError("allow_random", f"{redundant[0]} is trained in {self.path}: drop --allow-random {redundant[0]}",
                             redundant)
        missing = [p for p in parts if p not in trained and p not in self.allow_random]
        if missing:
            flags = " ".join(f"--allow-random {p}" for p in missing)
            raise WeightsError(
                f"{self.path} holds no trained {', '.join(missing)} for pipeline {pipeline} (it holds: "
                f"{', '.join(sorted(trained)) or 'nothing'}): import them with `adgen import`, or run them randomly "
                f"initialised with {flags}"
            )
        if TEXT_ENCODER in parts:
            self.tokenizer_folder()

    def tokenizer_folder(self) -> Path | None:
        """The folder's tokenizer when its text encoder is trained (refused if missing: real
        weights need their own vocabulary); None for a random text encoder."""
        if self.path is None or not self.is_trained(TEXT_ENCODER):
            return None
        folder = Path(self.path) / TOKENIZER
        if not all((folder / name).is_file() for name in TOKENIZER_FILES):
            raise WeightsError(
                f"{self.path}: the text encoder is trained but {TOKENIZER}/ ({', '.join(TOKENIZER_FILES)}) is missing: "
                "real weights need their tokenizer (import it with the text encoder)"
            )
        return folder

    def processing(self, pipeline: str) -> str | None:
        """The processing profile the folder's manifest names for `pipeline` (what its weights were
        trained with); None without a folder or an entry."""
        if self.path is None:
            return None
        value = ((read_weights_manifest(self.path) or {}).get("processing") or {}).get(pipeline)
        return None if value is None else str(value)

    def status(self, parts: Sequence[str]) -> dict[str, str]:
        """Per part: "trained (<source>)" or "random init (seed N)"; for the report."""
        if self.path is None:
            return {p: f"random init (seed {self.seed})" for p in parts}
        described = (read_weights_manifest(self.path) or {}).get("parts", {})
        trained = self.trained()
        return {
            p: f"trained ({described.get(p, {}).get('source', self.path)})" if p in trained
            else f"random init (seed {self.seed})"
            for p in parts
        }


def trained_parts(root: Path) -> frozenset[str]:
    """The parts the manifest of `root` lists, each checked to have its config and weights file."""
    manifest = read_weights_manifest(root)
    if manifest is None:
        raise WeightsError(f"{root} is not an adgen weights folder (no {WEIGHTS_MANIFEST}): make one with `adgen import` "
                           "(docs/weights.md)")
    parts = frozenset(manifest.get("parts", {}))
    for part in sorted(parts):
        for path in (part_config_path(root, part), part_weights_path(root, part)):
            if not path.is_file():
                raise WeightsError(f"{root}: the manifest lists part {part} but {path} is missing; re-import it")
    return parts


def weight_files(root: Path) -> list[Path]:
    """Every file that defines the weights under `root`, refusing pickled checkpoints and
    folders that are not adgen weights folders."""
    if not Path(root).is_dir():
        raise WeightsError(f"weights folder {root} does not exist or is not a folder")
    pickled = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise WeightsError(
            f"refusing pickled weights {pickled[0]}: the runtime reads safetensors only (pickle can run code); "
            "`adgen import` converts a checkpoint into a weights folder"
        )
    trained_parts(root)
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))


def file_sha256(path: Path) -> str:
    return _file_digest(path).hex()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()
