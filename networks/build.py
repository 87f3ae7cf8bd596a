"""Build the torch modules of a pipeline from a preset: random init from a seed, or real weights
from a local folder with strict key and shape checks. Also writes that folder layout.

Layout of a weights folder (see runtime/weights.py):
    text_encoder/   transformers CLIPTextModel (config.json, model.safetensors)
    vae/            diffusers AutoencoderKL (config.json, diffusion_pytorch_model.safetensors)
    tokenizer/      optional CLIP tokenizer files (vocab.json, merges.txt)
    refadgen.safetensors   `unet.*` (generation U-Net with AFM), `reference_unet.*`, `image_encoder.*`
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModel

from runtime.errors import WeightsError
from runtime.presets import Preset
from runtime.weights import REFADGEN_FILE, WeightsSource, weight_files

from .encoders import (
    ImageEncoder,
    TextEncoder,
    VAEDecoder,
    VAEEncoder,
    build_resampler,
    text_config,
    vae_config,
    vision_config,
)
from .refadgen import AFMKeyValue, GenerationUNet, ReferenceUNet

REFADGEN_PARTS = ("unet", "reference_unet", "image_encoder")
_VAE_FILE = "diffusion_pytorch_model.safetensors"
_TEXT_FILE = "model.safetensors"


def build_modules(pipeline: str, preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The torch modules of `pipeline`, keyed by component spec name."""
    builders = {"refadgen": build_refadgen, "background": _build_background}
    if pipeline not in builders:
        raise WeightsError(f"no networks for pipeline {pipeline!r}; have {sorted(builders)}")
    return builders[pipeline](preset, weights)


def _build_background(preset: Preset, weights: WeightsSource) -> dict[str, nn.Module]:
    from .background import build_background  # imports this module's helpers

    return build_background(preset, weights)


def _seeded(seed: int, offset: int, make):
    torch.manual_seed(seed * 1000 + offset)
    return make()


def build_refadgen(preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The seven RefAdGen components as eval-mode float32 modules, keyed by spec name."""
    if weights.path is None:
        text = _seeded(weights.seed, 0, lambda: CLIPTextModel(text_config(preset)))
        vae = _seeded(weights.seed, 1, lambda: AutoencoderKL(**vae_config(preset)))
        parts = {
            "unet": _seeded(weights.seed, 2, lambda: GenerationUNet(preset)),
            "reference_unet": _seeded(weights.seed, 3, lambda: ReferenceUNet(preset)),
            "image_encoder": _seeded(
                weights.seed, 4, lambda: ImageEncoder(CLIPVisionModel(vision_config(preset)), build_resampler(preset))
            ),
        }
    else:
        root = Path(weights.path)
        weight_files(root)  # refuses pickled checkpoints before anything is read
        text = _load_text_encoder(root / "text_encoder")
        vae = _load_vae(root / "vae")
        parts = {
            "unet": GenerationUNet(preset),
            "reference_unet": ReferenceUNet(preset),
            "image_encoder": ImageEncoder(CLIPVisionModel(vision_config(preset)), build_resampler(preset)),
        }
        state = _read_safetensors(root / REFADGEN_FILE)
        for name, module in parts.items():
            prefix = f"{name}."
            load_strict(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, f"{REFADGEN_FILE}:{name}")
        unknown = sorted(k for k in state if k.split(".", 1)[0] not in REFADGEN_PARTS)
        if unknown:
            raise WeightsError(f"{REFADGEN_FILE}: unexpected keys {unknown[:5]} (expected prefixes {REFADGEN_PARTS})")
    modules = {
        "text_encoder": TextEncoder(text),
        "image_encoder": parts["image_encoder"],
        "vae_encoder": VAEEncoder(vae),
        "reference_unet": parts["reference_unet"],
        "afm_kv": AFMKeyValue(parts["unet"]),
        "unet": parts["unet"],
        "vae_decoder": VAEDecoder(vae),
    }
    for module in modules.values():
        module.eval().requires_grad_(False)
    _check_sizes(preset, text, vae)
    return modules


def save_refadgen(modules: dict[str, nn.Module], root: Path) -> None:
    """Write `modules` (from `build_refadgen`) in the weights-folder layout `build_refadgen` reads."""
    root.mkdir(parents=True, exist_ok=True)
    text: CLIPTextModel = modules["text_encoder"].model
    vae: AutoencoderKL = modules["vae_decoder"].vae
    (root / "text_encoder").mkdir(exist_ok=True)
    text.config.to_json_file(root / "text_encoder" / "config.json")
    save_file(_contiguous(text.state_dict()), root / "text_encoder" / _TEXT_FILE)
    (root / "vae").mkdir(exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps(dict(vae.config), indent=2, default=list))
    save_file(_contiguous(vae.state_dict()), root / "vae" / _VAE_FILE)
    state = {f"{name}.{k}": v for name in REFADGEN_PARTS for k, v in modules[name].state_dict().items()}
    save_file(_contiguous(state), root / REFADGEN_FILE)


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


def _check_sizes(preset: Preset, text: CLIPTextModel, vae: AutoencoderKL) -> None:
    if text.config.hidden_size != preset.unet.cross_attention_dim:
        raise WeightsError(
            f"text_encoder hidden size {text.config.hidden_size} does not match preset {preset.name}'s "
            f"cross-attention dim {preset.unet.cross_attention_dim}"
        )
    if tuple(vae.config.block_out_channels) != preset.vae.block_out_channels:
        raise WeightsError(
            f"vae block_out_channels {tuple(vae.config.block_out_channels)} do not match preset {preset.name}'s "
            f"{preset.vae.block_out_channels}"
        )


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
