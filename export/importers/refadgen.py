"""`adgen import refadgen`: the released RefAdGen checkpoint and the folders beside it.

The release is one DeepSpeed file (`mp_rank_00_model_states.pt`) whose `module` entry is the
state dict of the reference's ADGenModel (models/ad_gen_model.py there):

- `unet.*`: the generation U-Net, 5-channel `conv_in`, the AFM projections at
  `...attn1.processor.to_k_ref/to_v_ref` -> part `unet` (adgen's GenerationUNet names them alike);
- `ref_unet.*`: the reference U-Net (SD 1.5 layout) -> part `reference_unet`;
- `proj.*`: the IP-Adapter Plus resampler (fused `to_kv`, `layers.i.0.norm1/norm2`,
  `layers.i.1.{0,1,3}`) -> diffusers' IPAdapterPlusImageProjection names in part `image_encoder`,
  with the vision tower of `--image-encoder` (a ViT-H CLIPVisionModelWithProjection);
- `adapter_modules.*`: the attention processors of `unet` again, as a ModuleList (index i = the
  U-Net's i-th processor): dropped once checked against `unet.*`.

The U-Nets' architecture is `--base`'s `unet/config.json` (the reference builds both from it,
`in_channels` 5 for the generation U-Net); the text encoder and tokenizer are `--base`'s, the
VAE `--vae`'s (sd-vae-ft-mse: files at the folder root).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from export.importers.folders import (
    clip_text_encoder,
    clip_vision_tower,
    diffusers_model,
    prefixed,
    read_json,
    strip_prefix,
    tokenizer_beside,
)
from export.importers.writer import Import, ImportSummary, Progress
from networks.sd import diffusers_config
from runtime.artifacts.weights import CONFIG_FILE
from runtime.errors import WeightsError

MODULES = ("ref_unet.", "unet.", "proj.", "adapter_modules.")  # ref_unet first: "unet." is not its prefix
IP_ADAPTER_DIM_HEAD = 64  # every IP-Adapter Plus resampler's head width, RefAdGen's included
AFM_PROJECTIONS = ("to_k_ref", "to_v_ref")
LATENT_CHANNELS = 4


def import_refadgen(out: Path, checkpoint: Path, base: Path, vae: Path, image_encoder: Path,
                    progress: Progress = lambda m: None) -> ImportSummary:
    imp = Import("refadgen", out, progress)
    name, module = imp.read_entry(checkpoint, "module", "DeepSpeed model states")
    groups = {prefix: strip_prefix(module, prefix) for prefix in MODULES}
    unknown = sorted(k for k in module if not k.startswith(MODULES))
    if unknown:
        raise WeightsError(f"{checkpoint}: keys outside RefAdGen's unet/ref_unet/proj/adapter_modules: {unknown[:5]}")

    unet_config = diffusers_config(read_json(base / "unet" / CONFIG_FILE))
    imp.sources.add(base / "unet" / CONFIG_FILE, "U-Net architecture of the base model", f"{base.name}/unet/{CONFIG_FILE}")
    generation = _generation_unet(imp, groups["unet."], name)
    imp.add_part("unet", unet_config | {"in_channels": LATENT_CHANNELS + 1}, prefixed(generation, "unet."), f"{name} (unet.*)")
    imp.map(f"{name}: unet.*", len(generation), "unet (GenerationUNet; AFM to_k_ref/to_v_ref kept in place)")
    imp.add_part("reference_unet", unet_config, prefixed(groups["ref_unet."], "unet."), f"{name} (ref_unet.*)")
    imp.map(f"{name}: ref_unet.*", len(groups["ref_unet."]), "reference_unet")
    _check_adapter_duplicates(imp, groups["adapter_modules."], generation, unet_config, name)

    vision_config, vision, vision_name = clip_vision_tower(imp, image_encoder)
    resampler_config, resampler = _resampler(groups["proj."])
    imp.map(f"{name}: proj.* (IP-Adapter Resampler)", len(groups["proj."]),
            "image_encoder.resampler (diffusers IPAdapterPlusImageProjection: to_kv split into to_k/to_v)")
    imp.map(f"{vision_name}: vision tower", len(vision), "image_encoder.vision")
    imp.add_part("image_encoder", {"vision": vision_config, "resampler": resampler_config},
                 prefixed(vision, "vision.") | prefixed(resampler, "resampler."), f"{vision_name} + {name} (proj.*)")

    text_config, text, text_name = clip_text_encoder(imp, base / "text_encoder")
    imp.add_part("text_encoder", text_config, text, text_name)
    imp.map(f"{text_name}: text encoder", len(text), "text_encoder")
    tokenizer = tokenizer_beside(base / "text_encoder")
    if tokenizer is None:
        raise WeightsError(f"{base}: no tokenizer/ (vocab.json, merges.txt): the text encoder needs its tokenizer")
    imp.add_tokenizer(tokenizer, str(tokenizer))

    vae_config, vae_state, vae_name = diffusers_model(imp, vae, "vae")
    imp.add_part("vae", diffusers_config(vae_config), vae_state, vae_name)
    imp.map(f"{vae_name}: vae", len(vae_state), "vae")
    imp.processing["refadgen"] = "reference"
    return imp.write()


def _generation_unet(imp: Import, state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The generation U-Net's tensors, its `conv_in` given the mask channel if it has 4 (the
    reference zero-pads a 4-channel one when it loads it)."""
    conv_in = state.get("conv_in.weight")
    if conv_in is not None and conv_in.shape[1] == LATENT_CHANNELS:
        padded = torch.zeros(conv_in.shape[0], LATENT_CHANNELS + 1, *conv_in.shape[2:], dtype=conv_in.dtype)
        padded[:, :LATENT_CHANNELS] = conv_in
        state = state | {"conv_in.weight": padded}
        imp.note(f"{name}: unet.conv_in had 4 input channels; the mask channel was added as zeros, as the reference "
                 "does when it loads such a checkpoint")
    return state


def _check_adapter_duplicates(imp: Import, adapters: dict[str, torch.Tensor], unet: dict[str, torch.Tensor],
                              config: dict, name: str) -> None:
    """`adapter_modules.{i}.*` is the U-Net's i-th attention processor saved a second time."""
    with torch.device("meta"):
        processors = list(UNet2DConditionModel.from_config(config).attn_processors)
    differing, unmatched = [], []
    for key, tensor in adapters.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) >= len(processors):
            unmatched.append(key)
            continue
        twin = f"{processors[int(index)]}.{rest}"
        if twin not in unet or unet[twin].shape != tensor.shape:
            unmatched.append(key)
        elif not torch.equal(unet[twin], tensor):
            differing.append(key)
    if unmatched:
        raise WeightsError(f"{name}: adapter_modules entries with no AFM projection in unet.*: {unmatched[:3]}")
    why = "duplicates of the AFM projections in unet.* (the reference saves the processors twice)"
    if differing:
        why += (f"; {len(differing)} differ from unet.*, which is used: the reference loads unet.* after "
                "adapter_modules.*, into the same modules")
    imp.drop(f"{name}: adapter_modules.*", len(adapters), why)


def _resampler(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """IP-Adapter's Resampler -> diffusers' IPAdapterPlusImageProjection: config and tensors."""
    if "latents" not in state:
        raise WeightsError("proj.*: expected IP-Adapter Plus's Resampler (proj.latents missing)")
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    hidden = state["latents"].shape[2]
    inner = state["layers.0.0.to_q.weight"].shape[0]
    config = dict(
        embed_dims=state["proj_in.weight"].shape[1],
        output_dims=state["proj_out.weight"].shape[0],
        hidden_dims=hidden,
        depth=depth,
        dim_head=IP_ADAPTER_DIM_HEAD,
        heads=inner // IP_ADAPTER_DIM_HEAD,
        num_queries=state["latents"].shape[1],
        ffn_ratio=state["layers.0.1.1.weight"].shape[0] // hidden,
    )
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            renamed[key] = tensor
            continue
        layer, block, rest = parts[1], parts[2], ".".join(parts[3:])
        head = f"layers.{layer}"
        if block == "0" and rest == "to_kv.weight":
            k, v = tensor.chunk(2, dim=0)
            renamed[f"{head}.attn.to_k.weight"], renamed[f"{head}.attn.to_v.weight"] = k, v
        elif block == "0":
            renamed[f"{head}.{_ATTENTION_NAMES[rest.rsplit('.', 1)[0]]}.{rest.rsplit('.', 1)[1]}"] = tensor
        else:
            index, leaf = rest.split(".", 1)
            renamed[f"{head}.{_FEED_FORWARD_NAMES[index]}.{leaf}"] = tensor
    return config, renamed


_ATTENTION_NAMES = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}
_FEED_FORWARD_NAMES = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}
