"""Reading and writing weights: the one place torch modules meet files.

A weights folder (runtime/artifacts/weights.py) holds diffusers/transformers sub-folders
(`text_encoder/`, `vae/`, optional `tokenizer/`) and one `<pipeline>.safetensors` per pipeline
whose keys are prefixed by component name. Every load is strict: exactly the module's keys with
the module's shapes, or a `WeightsError` naming the file, the part and the first mismatches.
Random initialisation draws each network from its own seed offset (`seeded`), so building one
network alone gives the same weights as building all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from runtime.errors import WeightsError
from runtime.presets import Preset

VAE_FILE = "diffusion_pytorch_model.safetensors"
TEXT_FILE = "model.safetensors"

M = TypeVar("M", bound=nn.Module)


def seeded(seed: int, offset: int, make: Callable[[], M]) -> M:
    """`make()` with torch's generator seeded from (seed, offset): one offset per network."""
    torch.manual_seed(seed * 1000 + offset)
    return make()


def save_text_and_vae(modules: Mapping[str, nn.Module], root: Path) -> None:
    """The shared `text_encoder/` and `vae/` folders of a weights folder (every pipeline's layout)."""
    root.mkdir(parents=True, exist_ok=True)
    text: CLIPTextModel = modules["text_encoder"].model
    (root / "text_encoder").mkdir(exist_ok=True)
    text.config.to_json_file(root / "text_encoder" / "config.json")
    save_file(contiguous(text.state_dict()), root / "text_encoder" / TEXT_FILE)
    if "vae_decoder" in modules:
        vae: AutoencoderKL = modules["vae_decoder"].vae
        (root / "vae").mkdir(exist_ok=True)
        (root / "vae" / "config.json").write_text(json.dumps(dict(vae.config), indent=2, default=list))
        save_file(contiguous(vae.state_dict()), root / "vae" / VAE_FILE)


def save_parts(modules: Mapping[str, nn.Module], parts: tuple[str, ...], path: Path) -> None:
    """One safetensors file holding each of `parts` under its name as key prefix."""
    state = {f"{name}.{k}": v for name in parts for k, v in modules[name].state_dict().items()}
    save_file(contiguous(state), path)


def load_parts(path: Path, parts: Mapping[str, nn.Module]) -> None:
    """Load a file written by `save_parts` into `parts`, strictly: every key under a part's
    prefix, nothing outside the parts' prefixes."""
    state = read_safetensors(path)
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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e


def load_text_encoder(folder: Path) -> CLIPTextModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"missing {config_path}")
    model = CLIPTextModel(CLIPTextConfig.from_json_file(config_path))
    load_strict(model, read_safetensors(folder / TEXT_FILE), str(folder / TEXT_FILE))
    return model


def load_vae(folder: Path) -> AutoencoderKL:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"missing {config_path}")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(config)
    load_strict(vae, read_safetensors(folder / VAE_FILE), str(folder / VAE_FILE))
    return vae


def check_text_size(preset: Preset, text: CLIPTextModel) -> None:
    """The text encoder's width is the one the preset's specs were built for (text embeddings,
    selling-point features and the U-Nets' cross-attention)."""
    hidden = text.config.hidden_size
    for what, width in (("text", preset.text.hidden_size), ("cross-attention", preset.unet.cross_attention_dim)):
        if hidden != width:
            raise WeightsError(f"text_encoder hidden size {hidden} does not match preset {preset.name}'s {what} width {width}")


def check_vae_size(preset: Preset, vae: AutoencoderKL) -> None:
    if tuple(vae.config.block_out_channels) != preset.vae.block_out_channels:
        raise WeightsError(
            f"vae block_out_channels {tuple(vae.config.block_out_channels)} do not match preset {preset.name}'s "
            f"{preset.vae.block_out_channels}"
        )


def read_prefixed(path: Path, prefix: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (prefix stripped) of a file whose keys all start with one of
    `parts`, read alone: a full-size checkpoint holds several U-Net-sized networks and only one
    is wanted at a time."""
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            unknown = sorted(k for k in keys if k.split(".", 1)[0] not in parts)
            if unknown:
                raise WeightsError(f"{path.name}: unexpected keys {unknown[:5]} (expected prefixes {parts})")
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e


def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
