"""`adgen import sd` and `adgen import controlnet`: Stable Diffusion 1.5 parts and SD 1.5
ControlNets, as diffusers folders or as one original-layout file.

A diffusers folder is read as it is. An original-layout file (`v1-5-pruned-emaonly.safetensors`,
a ControlNet's `.safetensors` / `.pth`) is converted by diffusers' own single-file loader, given
the checkpoint as a state dict (so adgen's reader is the only one that unpickles) and `--config`,
a local diffusers folder of the same model, for the configs: `from_single_file(state,
config=folder, local_files_only=True)`, nothing downloaded. The text encoder of a single file is
`cond_stage_model.transformer.*`, CLIPTextModel's names under a prefix.

The SD U-Net becomes the poster's U-Net (`poster_unet`); a ControlNet becomes the poster's
ControlNet trunk (`controlnet`), whose conditioning embedding (`controlnet_cond_embedding.*`,
lllyasviel's encoder of an RGB hint image) is dropped: RenderNet takes its place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from export.importers.checkpoints import load_state_file
from export.importers.folders import (
    clip_text_encoder,
    diffusers_model,
    prefixed,
    read_json,
    strip_prefix,
    tokenizer_beside,
)
from export.importers.writer import Import, ImportSummary, Progress
from networks.sd import diffusers_config
from runtime.artifacts.weights import CONFIG_FILE, TOKENIZER
from runtime.errors import WeightsError

TEXT_PREFIX = "cond_stage_model.transformer."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_EMBEDDING = "controlnet_cond_embedding."
# What else an original SD file holds, and why adgen reads none of it.
SINGLE_FILE_EXTRAS = {
    "model_ema.": "the EMA copy of the U-Net (model.diffusion_model.* is what inference uses)",
    "first_stage_model.loss.": "the VAE's training loss (LPIPS, discriminator)",
}
DDPM_BUFFERS = "the DDPM schedule's buffers (adgen's schedulers compute the schedule)"


def import_sd(out: Path, checkpoint: Path, config: Path | None = None, progress: Progress = lambda m: None) -> ImportSummary:
    imp = Import("sd", out, progress)
    if checkpoint.is_dir():
        _sd_folder(imp, checkpoint)
    else:
        _sd_single_file(imp, checkpoint, _config_folder(config, checkpoint, "sd"))
    return imp.write()


def import_controlnet(out: Path, checkpoint: Path, config: Path | None = None,
                      progress: Progress = lambda m: None) -> ImportSummary:
    imp = Import("controlnet", out, progress)
    if checkpoint.is_dir():
        model_config, state, name = diffusers_model(imp, checkpoint, "controlnet")
    else:
        folder = _config_folder(config, checkpoint, "controlnet")
        name = imp.sources.add(checkpoint, "ControlNet single file")
        progress(f"converting {checkpoint} with diffusers' single-file loader")
        single = _single_file_state(checkpoint)
        model = ControlNetModel.from_single_file(single, config=str(folder), local_files_only=True,
                                                 torch_dtype=next(iter(single.values())).dtype)
        model_config, state = dict(model.config), model.state_dict()
        imp.note(f"{name}: converted from the original layout with diffusers' ControlNetModel.from_single_file "
                 f"(config {folder})")
    embedding = [k for k in state if k.startswith(CONTROLNET_EMBEDDING)]
    imp.drop(f"{name}: {CONTROLNET_EMBEDDING}*", len(embedding),
             "the ControlNet's hint-image encoder; the poster's RenderNet (render_cond) is its conditioning embedding")
    trunk = {k: v for k, v in state.items() if not k.startswith(CONTROLNET_EMBEDDING)}
    imp.add_part("controlnet", diffusers_config(model_config), prefixed(trunk, "controlnet."), name)
    imp.map(f"{name}: ControlNet", len(trunk), "controlnet (PosterControlNet)")
    return imp.write()


def _config_folder(config: Path | None, checkpoint: Path, family: str) -> Path:
    if config is None or not config.is_dir():
        raise WeightsError(
            f"{checkpoint} is one original-layout file: give --config, a local diffusers folder of the same model "
            f"(its config.json files{' and tokenizer/' if family == 'sd' else ''}; no weights needed): diffusers "
            "converts the file with those configs, offline"
        )
    return config


def _sd_folder(imp: Import, folder: Path) -> None:
    text_config, text, text_name = clip_text_encoder(imp, folder / "text_encoder")
    imp.add_part("text_encoder", text_config, text, text_name)
    imp.map(f"{text_name}: text encoder", len(text), "text_encoder")
    _tokenizer(imp, folder)
    vae_config, vae, vae_name = diffusers_model(imp, folder / "vae", "vae")
    imp.add_part("vae", diffusers_config(vae_config), vae, vae_name)
    imp.map(f"{vae_name}: vae", len(vae), "vae")
    unet_config, unet, unet_name = diffusers_model(imp, folder / "unet", "unet")
    imp.add_part("poster_unet", diffusers_config(unet_config), prefixed(unet, "unet."), unet_name)
    imp.map(f"{unet_name}: U-Net", len(unet), "poster_unet (the poster pipeline's U-Net)")
    skipped = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("text_encoder", "vae", "unet", TOKENIZER))
    if skipped:
        imp.note(f"{folder}: not read: {', '.join(skipped)} (safety checker, feature extractor and scheduler are no "
                 "adgen parts; adgen has its own schedulers)")


def _sd_single_file(imp: Import, checkpoint: Path, config: Path) -> None:
    name = imp.sources.add(checkpoint, "Stable Diffusion single file (original layout)")
    imp.progress(f"reading {checkpoint}")
    state = _single_file_state(checkpoint)
    dtype = next(iter(state.values())).dtype
    used = [k for k in state if k.startswith((UNET_PREFIX, TEXT_PREFIX)) or
            (k.startswith(VAE_PREFIX) and not k.startswith("first_stage_model.loss."))]
    for prefix, why in SINGLE_FILE_EXTRAS.items():
        imp.drop(f"{name}: {prefix}*", sum(k.startswith(prefix) for k in state), why)
    other = sorted(set(state) - set(used) - {k for k in state if k.startswith(tuple(SINGLE_FILE_EXTRAS))})
    imp.drop(f"{name}: {', '.join(other[:4])}{'...' if len(other) > 4 else ''}", len(other), DDPM_BUFFERS)

    text_state = strip_prefix(state, TEXT_PREFIX)
    if not any(k.startswith("text_model.") for k in text_state):  # transformers-3 era names
        text_state = prefixed(text_state, "text_model.")
    text = strip_prefix(text_state, "text_model.")
    text.pop("embeddings.position_ids", None)
    imp.add_part("text_encoder", read_json(config / "text_encoder" / CONFIG_FILE), text, f"{name} ({TEXT_PREFIX}*)")
    imp.map(f"{name}: {TEXT_PREFIX}*", len(text), "text_encoder (prefix dropped)")
    _tokenizer(imp, config)

    imp.progress("converting the VAE and the U-Net with diffusers' single-file loader")
    for cls, subfolder, prefix, part, wrap in ((AutoencoderKL, "vae", VAE_PREFIX, "vae", ""),
                                               (UNet2DConditionModel, "unet", UNET_PREFIX, "poster_unet", "unet.")):
        model = cls.from_single_file(state, config=str(config), subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
        converted = model.state_dict()
        imp.add_part(part, diffusers_config(dict(model.config)), prefixed(converted, wrap), f"{name} ({prefix}*)")
        imp.map(f"{name}: {prefix}*", len(converted), f"{part} (converted by diffusers' {cls.__name__}.from_single_file)")
        del model
    imp.note(f"configs and tokenizer from {config}")


def _tokenizer(imp: Import, folder: Path) -> None:
    tokenizer = tokenizer_beside(folder / "text_encoder")
    if tokenizer is None:
        raise WeightsError(f"{folder}: no tokenizer/ (vocab.json, merges.txt): the text encoder needs its tokenizer")
    imp.add_tokenizer(tokenizer, str(tokenizer))


def _single_file_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of an original-layout file (a Lightning `.ckpt` keeps them under `state_dict`)."""
    loaded = load_state_file(checkpoint)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{checkpoint}: expected a state dict of tensors")
    return loaded
