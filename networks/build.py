"""Build the torch modules of a pipeline from a preset: random init from a seed, or real weights
from a local folder with strict key and shape checks. Also writes that folder layout.

Layout of a weights folder (see runtime/weights.py):
    text_encoder/   transformers CLIPTextModel (config.json, model.safetensors)
    vae/            diffusers AutoencoderKL (config.json, diffusion_pytorch_model.safetensors)
    tokenizer/      optional CLIP tokenizer files (vocab.json, merges.txt)
    refadgen.safetensors   `unet.*` (generation U-Net with AFM), `reference_unet.*`, `image_encoder.*`
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Mapping

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModel

from runtime.errors import WeightsError
from runtime.presets import Preset
from runtime.weights import REFADGEN_FILE, WeightsSource, weight_files

from networks.encoders import (
    ImageEncoder,
    TextEncoder,
    VAEDecoder,
    VAEEncoder,
    build_resampler,
    text_config,
    vae_config,
    vision_config,
)
from networks.refadgen import AFMKeyValue, GenerationUNet, ReferenceUNet

REFADGEN_PARTS = ("unet", "reference_unet", "image_encoder")
_VAE_FILE = "diffusion_pytorch_model.safetensors"
_TEXT_FILE = "model.safetensors"


def build_modules(pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The torch modules of `pipeline`, keyed by component spec name."""
    builders = {"refadgen": build_refadgen, "background": _build_background, "layout": _build_layout,
                "poster": _build_poster}
    if pipeline not in builders:
        raise WeightsError(f"no networks for pipeline {pipeline!r}; have {sorted(builders)}")
    return builders[pipeline](preset, weights)


def _build_background(preset: Preset, weights: WeightsSource) -> dict[str, nn.Module]:
    from networks.background import build_background  # imports this module's helpers

    return build_background(preset, weights)


def _build_poster(preset: Preset, weights: WeightsSource) -> dict[str, nn.Module]:
    from networks.poster import build_poster  # imports this module's helpers

    return build_poster(preset, weights)


def new_image_encoder(preset: Preset) -> ImageEncoder:
    """CLIP vision tower + resampler at the preset's sizes, freshly initialised."""
    return ImageEncoder(CLIPVisionModel(vision_config(preset)), build_resampler(preset))


def _build_layout(preset: Preset, weights: WeightsSource) -> dict[str, nn.Module]:
    from networks.layout import build_layout  # imports this module's helpers

    return build_layout(preset, weights)


def _seeded(seed: int, offset: int, make):
    torch.manual_seed(seed * 1000 + offset)
    return make()


def build_refadgen(preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The seven RefAdGen components as eval-mode float32 modules, keyed by spec name."""
    parts = {part: _refadgen_part(preset, weights, part) for part in _REFADGEN_BUILD_ORDER}
    modules = {name: wrap(parts[part]) for name, (part, wrap) in _REFADGEN_COMPONENTS.items()}
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules


def _refadgen_part(preset: Preset, weights: WeightsSource, part: str) -> nn.Module:
    """One network of RefAdGen (the VAE and the generation U-Net each serve two components)."""
    if weights.path is None:
        makers = {
            "text": lambda: CLIPTextModel(text_config(preset)),
            "vae": lambda: AutoencoderKL(**vae_config(preset)),
            "unet": lambda: GenerationUNet(preset),
            "reference_unet": lambda: ReferenceUNet(preset),
            "image_encoder": lambda: new_image_encoder(preset),
        }
        module = _seeded(weights.seed, _REFADGEN_SEED_OFFSETS[part], makers[part])
    else:
        root = Path(weights.path)
        weight_files(root)  # refuses pickled checkpoints before anything is read
        if part == "text":
            module = _load_text_encoder(root / "text_encoder")
        elif part == "vae":
            module = _load_vae(root / "vae")
        else:
            module = {
                "unet": lambda: GenerationUNet(preset),
                "reference_unet": lambda: ReferenceUNet(preset),
                "image_encoder": lambda: new_image_encoder(preset),
            }[part]()
            load_strict(module, _read_prefixed(root / REFADGEN_FILE, f"{part}."), f"{REFADGEN_FILE}:{part}")
    if part == "text":
        _check_text_size(preset, module)
    elif part == "vae":
        _check_vae_size(preset, module)
    return module


# Random init draws each network from its own seed offset, so building one alone gives the
# same weights as building all of them.
_REFADGEN_SEED_OFFSETS = {"text": 0, "vae": 1, "unet": 2, "reference_unet": 3, "image_encoder": 4}
_REFADGEN_BUILD_ORDER = ("text", "vae", "unet", "reference_unet", "image_encoder")
_REFADGEN_COMPONENTS = {
    "text_encoder": ("text", TextEncoder),
    "image_encoder": ("image_encoder", lambda m: m),
    "vae_encoder": ("vae", VAEEncoder),
    "reference_unet": ("reference_unet", lambda m: m),
    "afm_kv": ("unet", AFMKeyValue),
    "unet": ("unet", lambda m: m),
    "vae_decoder": ("vae", VAEDecoder),
}


class LazyModules(Mapping[str, nn.Module]):
    """The modules of a pipeline built one network at a time, for exporting full-size graphs in
    bounded memory: only the network behind the last requested component is kept (the VAE
    serves both VAE components and the generation U-Net both `afm_kv` and `unet`)."""

    def __init__(self, pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()):
        self.preset = preset
        self.weights = weights
        self._held: tuple[str, nn.Module] | None = None
        self._eager: dict[str, nn.Module] | None = None
        if pipeline in _LAZY_PIPELINES:
            self._components, self._build_part = _LAZY_PIPELINES[pipeline]
        else:  # no per-network table: every module at once (fine at the sizes such pipelines export)
            self._eager = build_modules(pipeline, preset, weights)
            self._components = {name: (name, lambda m: m) for name in self._eager}
            self._build_part = lambda preset, weights, part: self._eager[part]

    def __getitem__(self, name: str) -> nn.Module:
        part, wrap = self._components[name]
        if self._held is None or self._held[0] != part:
            self._held = None  # drop the previous network before building the next one
            gc.collect()
            self._held = (part, self._build_part(self.preset, self.weights, part))
        return wrap(self._held[1]).eval().requires_grad_(False)

    def __iter__(self):
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def release(self) -> None:
        self._held = None  # eagerly built pipelines keep their modules: they are built only once
        gc.collect()


_LAZY_PIPELINES = {"refadgen": (_REFADGEN_COMPONENTS, _refadgen_part)}


def save_refadgen(modules: dict[str, nn.Module], root: Path) -> None:
    """Write `modules` (from `build_refadgen`) in the weights-folder layout `build_refadgen` reads."""
    save_text_and_vae(modules, root)
    save_parts(modules, REFADGEN_PARTS, root / REFADGEN_FILE)


def save_text_and_vae(modules: Mapping[str, nn.Module], root: Path) -> None:
    """The shared `text_encoder/` and `vae/` folders of a weights folder (every pipeline's layout)."""
    root.mkdir(parents=True, exist_ok=True)
    text: CLIPTextModel = modules["text_encoder"].model
    (root / "text_encoder").mkdir(exist_ok=True)
    text.config.to_json_file(root / "text_encoder" / "config.json")
    save_file(_contiguous(text.state_dict()), root / "text_encoder" / _TEXT_FILE)
    if "vae_decoder" in modules:
        vae: AutoencoderKL = modules["vae_decoder"].vae
        (root / "vae").mkdir(exist_ok=True)
        (root / "vae" / "config.json").write_text(json.dumps(dict(vae.config), indent=2, default=list))
        save_file(_contiguous(vae.state_dict()), root / "vae" / _VAE_FILE)


def save_parts(modules: Mapping[str, nn.Module], parts: tuple[str, ...], path: Path) -> None:
    """One safetensors file holding each of `parts` under its name as key prefix."""
    state = {f"{name}.{k}": v for name in parts for k, v in modules[name].state_dict().items()}
    save_file(_contiguous(state), path)


def load_parts(path: Path, parts: Mapping[str, nn.Module]) -> None:
    """Load a file written by `save_parts` into `parts`, strictly: every key under a part's
    prefix, nothing outside the parts' prefixes."""
    state = _read_safetensors(path)
    unknown = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if unknown:
        raise WeightsError(f"{path.name}: unexpected keys {unknown[:5]} (expected prefixes {tuple(parts)})")
    for name, module in parts.items():
        prefix = f"{name}."
        load_strict(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, f"{path.name}:{name}")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict requiring exactly the module's keys with the module's shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (first: {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} with wrong shape (first: {k} expected {tuple(own[k].shape)}, got {tuple(state[k].shape)})")
        raise WeightsError(f"{where}: keys do not match the network: " + "; ".join(details))
    module.load_state_dict(state, strict=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e


def _load_text_encoder(folder: Path) -> CLIPTextModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"missing {config_path}")
    model = CLIPTextModel(CLIPTextConfig.from_json_file(config_path))
    load_strict(model, _read_safetensors(folder / _TEXT_FILE), str(folder / _TEXT_FILE))
    return model


def _load_vae(folder: Path) -> AutoencoderKL:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"missing {config_path}")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(config)
    load_strict(vae, _read_safetensors(folder / _VAE_FILE), str(folder / _VAE_FILE))
    return vae


def _check_text_size(preset: Preset, text: CLIPTextModel) -> None:
    if text.config.hidden_size != preset.unet.cross_attention_dim:
        raise WeightsError(
            f"text_encoder hidden size {text.config.hidden_size} does not match preset {preset.name}'s "
            f"cross-attention dim {preset.unet.cross_attention_dim}"
        )


def _check_vae_size(preset: Preset, vae: AutoencoderKL) -> None:
    if tuple(vae.config.block_out_channels) != preset.vae.block_out_channels:
        raise WeightsError(
            f"vae block_out_channels {tuple(vae.config.block_out_channels)} do not match preset {preset.name}'s "
            f"{preset.vae.block_out_channels}"
        )


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (prefix stripped), read alone: a full-size checkpoint holds
    three U-Net-sized networks and only one is wanted at a time."""
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            unknown = sorted(k for k in keys if k.split(".", 1)[0] not in REFADGEN_PARTS)
            if unknown:
                raise WeightsError(f"{REFADGEN_FILE}: unexpected keys {unknown[:5]} (expected prefixes {REFADGEN_PARTS})")
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
