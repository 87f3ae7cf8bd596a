"""Synthetic checkpoints in the layouts and containers users hold, random weights, at tiny sizes
(TINY, for tests) or at the released sizes (SD15, for benchmarks/import_cost.py):

- diffusers/transformers folders (an SD 1.5-family model, a VAE with files at its root and
  diffusers' older attention names, an IP-Adapter image encoder, a ControlNet), each with a
  transformers-4 or pickled `.bin` BESIDE its `.safetensors`: the `.bin` is a trap that creates a
  marker folder if anything unpickles it;
- RefAdGen's DeepSpeed file: `{"module": {unet.*, ref_unet.*, proj.*, adapter_modules.*}, ...}`
  built the way the reference builds its ADGenModel (diffusers U-Nets, AFM processors named
  `to_k_ref`/`to_v_ref`, the IP-Adapter Resampler's fused `to_kv`, the processors again as a
  ModuleList), with DeepSpeed's bookkeeping beside it;
- RADM's detectron2 file: `{"model": {backbone.*, head.*, 12 diffusion buffers}, "optimizer", ...}`
  with frozen BatchNorm (no `num_batches_tracked`);
- Stable Diffusion's original single file (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.transformer.text_model.*`, EMA and DDPM extras), converted here from a
  diffusers folder by the inverse of the original->diffusers mapping.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.synthetic_vocabulary import write_vocabulary


@dataclass(frozen=True)
class Sizes:
    """The architecture of a synthetic set: library configs, the resampler's and RADM's sizes."""

    unet: dict
    text: dict
    vae: dict
    vision: dict
    resampler: dict
    radm: dict


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=512)
# Not the `tiny` preset's architecture (a wider cross-attention, gelu CLIP towers, 8 image tokens):
# an import must take it from the files.
TINY = Sizes(
    unet=SD15_UNET | dict(sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64,
                          attention_head_dim=2, norm_num_groups=8),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="gelu", bos_token_id=550, eos_token_id=551, pad_token_id=551,
              projection_dim=64),
    vae=SD15_VAE | dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, sample_size=64),
    vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=24, hidden_act="gelu"),
    resampler=dict(dim=64, depth=4, heads=1, dim_head=64, num_queries=8, ff_mult=4),
    radm=dict(stem_channels=8, blocks=(1, 1, 1, 1), fpn_channels=32, hidden=32, heads=8, ffn=64, dynamic_dim=8,
              num_boxes=100, cascade=2, text_dim=64),
)
# What the releases hold: SD 1.5's U-Nets, VAE and ViT-L text encoder, IP-Adapter's ViT-H image
# encoder and RefAdGen's resampler, RADM's ResNet-50 + FPN and six heads.
SD15 = Sizes(
    unet=SD15_UNET,
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    vae=SD15_VAE,
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
                patch_size=14, projection_dim=1024, hidden_act="gelu"),
    resampler=dict(dim=768, depth=4, heads=12, dim_head=64, num_queries=16, ff_mult=4),
    radm=dict(stem_channels=64, blocks=(3, 4, 6, 3), fpn_channels=256, hidden=256, heads=8, ffn=2048, dynamic_dim=64,
              num_boxes=100, cascade=6, text_dim=768),
)
DIFFUSION_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")


class MakesDirectory:
    """Unpickling this creates `path`: evidence that a pickled file was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def pickle_trap(path: Path, marker: Path) -> None:
    """A `.bin` that creates `marker` if anyone unpickles it."""
    torch.save({"weight": MakesDirectory(marker)}, path)


def _seeded(seed: int, make):
    """`make()` from its library's own initialisation, seeded."""
    torch.manual_seed(seed)
    return make().eval()


def _randomize(module: torch.nn.Module, seed: int, which) -> torch.nn.Module:
    """The tensors `which(name)` selects drawn at random, where an initialisation leaves them
    trivial (zero convolutions, BatchNorm's identity statistics) and would hide mix-ups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if which(name):
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + (0.75 if name.endswith(("running_var", "norm.weight")) else 0.0))
    return module


def diffusers_unet(sizes: Sizes = TINY, seed: int = 0, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(**sizes.unet)).to(dtype)


def text_encoder_folder(folder: Path, marker: Path, sizes: Sizes = TINY, seed: int = 1, dtype=torch.float32):
    """A transformers-4 CLIP text encoder: `text_model.*` names, the position_ids buffer, a pickle trap beside."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**sizes.text))).to(dtype)
    folder.mkdir(parents=True)
    state = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(sizes.text["max_position_embeddings"])[None]
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                                    **sizes.text, "transformers_version": "4.36.2"}))
    pickle_trap(folder / "pytorch_model.bin", marker)
    return model


def vae_folder(folder: Path, marker: Path, sizes: Sizes = TINY, seed: int = 2):
    """sd-vae-ft-mse's layout: files at the folder root, the mid-block attention under the old
    names (query, key, value, proj_attn), a pickle trap beside."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    model = _seeded(seed, lambda: AutoencoderKL(**sizes.vae))
    folder.mkdir(parents=True)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in model.state_dict().items():
        for new, former in old.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{former}.")
        state[key] = tensor.contiguous()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", **sizes.vae}))
    pickle_trap(folder / "diffusion_pytorch_model.bin", marker)
    return model


def image_encoder_folder(folder: Path, marker: Path, sizes: Sizes = TINY, seed: int = 3, dtype=torch.float32):
    """IP-Adapter's image encoder: a CLIPVisionModelWithProjection saved by transformers 4."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = _seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**sizes.vision))).to(dtype)
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    patches = (sizes.vision["image_size"] // sizes.vision["patch_size"]) ** 2
    state["vision_model.embeddings.position_ids"] = torch.arange(patches + 1)[None]
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModelWithProjection"],
                                                    "model_type": "clip_vision_model", **sizes.vision}))
    pickle_trap(folder / "pytorch_model.bin", marker)
    return model


def sd_folder(folder: Path, marker: Path, unet_weights: bool = True, sizes: Sizes = TINY, dtype=torch.float32) -> dict:
    """An SD 1.5-family diffusers folder: tokenizer, text encoder, VAE, U-Net (config, and weights
    unless RefAdGen's base, whose U-Nets come from its own file)."""
    from safetensors.torch import save_file

    write_vocabulary(folder / "tokenizer")
    models = {"text_encoder": text_encoder_folder(folder / "text_encoder", marker, sizes, dtype=dtype),
              "vae": vae_folder(folder / "vae", marker, sizes)}
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **sizes.unet}))
    if unet_weights:
        models["unet"] = diffusers_unet(sizes, seed=4, dtype=dtype)
        save_file({k: v.contiguous() for k, v in models["unet"].state_dict().items()},
                  folder / "unet" / "diffusion_pytorch_model.safetensors")
        pickle_trap(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return models


def resampler_state(sizes: Sizes = TINY, seed: int = 5, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus's Resampler (RefAdGen's `proj`), its own names: fused to_kv, layers.i.{0,1}."""
    g = torch.Generator().manual_seed(seed)
    r, embed, out = sizes.resampler, sizes.vision["hidden_size"], sizes.unet["cross_attention_dim"]
    dim, inner, ff = r["dim"], r["heads"] * r["dim_head"], r["dim"] * r["ff_mult"]
    shapes = {"latents": (1, r["num_queries"], dim), "proj_in.weight": (dim, embed), "proj_in.bias": (dim,),
              "proj_out.weight": (out, dim), "proj_out.bias": (out,), "norm_out.weight": (out,), "norm_out.bias": (out,)}
    for i in range(r["depth"]):
        shapes |= {f"layers.{i}.0.norm1.weight": (dim,), f"layers.{i}.0.norm1.bias": (dim,),
                   f"layers.{i}.0.norm2.weight": (dim,), f"layers.{i}.0.norm2.bias": (dim,),
                   f"layers.{i}.0.to_q.weight": (inner, dim), f"layers.{i}.0.to_kv.weight": (2 * inner, dim),
                   f"layers.{i}.0.to_out.weight": (dim, inner), f"layers.{i}.1.0.weight": (dim,),
                   f"layers.{i}.1.0.bias": (dim,), f"layers.{i}.1.1.weight": (ff, dim), f"layers.{i}.1.3.weight": (dim, ff)}
    return {k: (torch.randn(s, generator=g) * 0.1 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)).to(dtype)
            for k, s in shapes.items()}


def refadgen_module(sizes: Sizes = TINY, dtype=torch.float32, seed: int = 8) -> dict[str, torch.Tensor]:
    """The `module` entry of RefAdGen's DeepSpeed file, laid out as its ADGenModel's state dict:
    each U-Net built, then cast and handed over one at a time (a full-size one is 3.4 GB in fp32)."""
    from diffusers import UNet2DConditionModel

    module: dict[str, torch.Tensor] = {}
    unet = _seeded(seed, lambda: UNet2DConditionModel(**(sizes.unet | {"in_channels": 5}))).to(dtype)
    processors = list(unet.attn_processors)  # the reference's adapter_modules: this order
    modules = dict(unet.named_modules())
    g = torch.Generator().manual_seed(seed)
    afm = {}
    for name in processors:
        if name.endswith("attn1.processor"):
            c = modules[name.removesuffix(".processor")].to_q.in_features
            afm |= {f"{name}.{p}.weight": (torch.randn(c, c, generator=g) * c**-0.5).to(dtype) for p in ("to_k_ref", "to_v_ref")}
    module |= {f"unet.{k}": v for k, v in (unet.state_dict() | afm).items()}
    del unet, modules
    ref_unet = _seeded(seed + 1, lambda: UNet2DConditionModel(**sizes.unet)).to(dtype)
    module |= {f"ref_unet.{k}": v for k, v in ref_unet.state_dict().items()}
    del ref_unet
    for i, name in enumerate(processors):
        for projection in ("to_k_ref", "to_v_ref"):
            if f"{name}.{projection}.weight" in afm:
                module[f"adapter_modules.{i}.{projection}.weight"] = afm[f"{name}.{projection}.weight"]
    module |= {f"proj.{k}": v for k, v in resampler_state(sizes, dtype=dtype).items()}
    return module


def deepspeed_file(path: Path, module: dict[str, torch.Tensor]) -> Path:
    """DeepSpeed's mp_rank_00_model_states.pt: the weights under "module", its bookkeeping beside."""
    torch.save({
        "module": module, "buffer_names": [], "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items())], "frozen_param_shapes": None,
        "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None,
        "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 1000,
        "global_samples": 8000, "dp_world_size": 8, "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
        "ds_version": "0.14.4",
    }, path)
    return path


def radm_file(path: Path, sizes: Sizes = TINY, seed: int = 6) -> dict[str, torch.Tensor]:
    """RADM's model_final.pth: detectron2's {"model": ..., "optimizer", "scheduler", "iteration"}."""
    from dataclasses import replace

    from networks.layout.backbone import LayoutBackbone
    from networks.layout.head import LayoutHead
    from runtime.presets import get_preset

    layout = {k: v for k, v in sizes.radm.items() if k != "text_dim"}
    preset = replace(get_preset("tiny"), layout=replace(get_preset("tiny").layout, **layout))
    frozen_bn = (".norm.weight", ".norm.bias", "running_mean", "running_var")
    backbone = _randomize(_seeded(seed, lambda: LayoutBackbone(preset)), seed, lambda name: name.endswith(frozen_bn))
    head = _seeded(seed + 1, lambda: LayoutHead(preset, sizes.radm["text_dim"]))
    model = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    model |= {f"head.{k}": v for k, v in head.state_dict().items()}
    model |= {name: torch.rand(1000, dtype=torch.float64) for name in DIFFUSION_BUFFERS}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-5, "params": [0]}]},
                "scheduler": {"base_lrs": [2.5e-5], "last_epoch": 250000}, "iteration": 249999}, path)
    return model


def controlnet_folder(folder: Path, marker: Path, sizes: Sizes = TINY, seed: int = 7):
    """An SD 1.5 ControlNet saved by diffusers, with a pickle trap beside."""
    from diffusers import ControlNetModel

    config = {k: v for k, v in sizes.unet.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    model = _seeded(seed, lambda: ControlNetModel(**config, conditioning_embedding_out_channels=(8, 16)))
    _randomize(model, seed, lambda name: name.startswith(("controlnet_down_blocks", "controlnet_mid_block")))
    model.save_pretrained(folder)
    pickle_trap(folder / "diffusion_pytorch_model.bin", marker)
    return model


# The inverse of diffusers' original -> diffusers conversion, for SD 1.5's U-Net and VAE.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}


def _unet_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    blocks = {}
    for i in range(4):
        for j in range(2):
            blocks[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{3 * i + j + 1}.0."
            blocks[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        blocks[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{3 * (i + 1)}.0.op."
        for j in range(3):
            blocks[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{3 * i + j}.0."
            blocks[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
        blocks[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."
    blocks |= {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
               "mid_block.resnets.1.": "middle_block.2."}
    out = {}
    for key, tensor in state.items():
        name = key
        for old, new in fixed.items():
            if key.startswith(old + "."):
                name = new + key[len(old):]
        for old, new in blocks.items():
            if key.startswith(old):
                rest = key[len(old):]
                if "resnets" in old:
                    first, _, tail = rest.partition(".")
                    rest = f"{_RESNET.get(first, first)}.{tail}"
                name = new + rest
        out[f"model.diffusion_model.{name}"] = tensor
    return out


def _vae_to_original(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = name.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in _VAE_ATTENTION.items():
                name = name.replace(f"attn_1.{new}.", f"attn_1.{old}.")
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # the original's 1x1 convolutions
        parts = name.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if parts[1] == "down_blocks" else levels - 1 - i
            kind = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                name = ".".join([parts[0], kind, str(level), "block", *parts[4:]])
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = ".".join([parts[0], kind, str(level), "downsample" if kind == "down" else "upsample", *parts[5:]])
        out[f"first_stage_model.{name}"] = tensor
    return out


def sd_single_file(path: Path, models: dict, sizes: Sizes = TINY) -> Path:
    """SD 1.5's original single file from the models of `sd_folder` (with the extras the real one holds)."""
    from safetensors.torch import save_file

    state = _unet_to_original(models["unet"].state_dict())
    state |= _vae_to_original(models["vae"].state_dict(), len(sizes.vae["block_out_channels"]))
    text = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in models["text_encoder"].state_dict().items()}
    text["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state |= text
    state |= {"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(1000)}
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path
