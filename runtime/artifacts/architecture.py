"""The architecture a weights folder defines, as a `Preset`.

With a weights folder the networks are built from the folder's configs (networks/parts.py), so
everything sized from a preset (specs, ONNX export, Triton configs, the graph cache) must follow
those configs too. `weights_preset` reads them and returns the preset with its network sizes
replaced: the trained parts' sizes, and the random parts (`--allow-random`) sized to fit them.
The preset keeps its name and canvas bounds; `Preset.architecture` names the configs' hash.
Torch-free: the configs are JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from pathlib import Path

from runtime.artifacts.weights import TEXT_ENCODER, WeightsSource, read_part_config, trained_parts
from runtime.errors import WeightsError
from runtime.presets import (
    ImageEncoderSize,
    LayoutSize,
    PlanSize,
    Preset,
    RenderSize,
    TextEncoderSize,
    UNetSize,
    VAESize,
    get_preset,
)

# diffusers configs of networks in the SD 1.5 U-Net layout (the specs assume it); `style_branch`
# records the U-Net sizes it was built at (adgen's own network).
DIFFUSERS_UNET_PARTS = ("unet", "reference_unet", "background_unet", "poster_unet", "controlnet")
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# RADM's sizes split between its two networks' configs (LayoutSize's image_side is the canvas's).
LAYOUT_BACKBONE_FIELDS = ("stem_channels", "blocks", "fpn_channels")
LAYOUT_HEAD_FIELDS = ("hidden", "heads", "ffn", "dynamic_dim", "num_boxes", "cascade", "pooler", "vtram_heads",
                      "gram_dim", "num_classes", "max_texts")
LAYOUT_TEXT_DIM = "text_dim"  # layout_head's config: the width of the text features it reads
LAYOUT_PROPOSAL_FRAME = "proposal_frame"  # layout_head's config (optional): LayoutSize.proposal_frame
PROPOSAL_FRAMES = ("whwh", "hwhw")
LAYOUT_REFERENCE_VIEWS = "reference_views"  # layout_head's config (optional): LayoutSize.reference_views


def resolve_preset(name: str, weights: WeightsSource) -> Preset:
    """Preset `name`, with its network sizes from the weights folder's configs when there is one."""
    base = get_preset(name)
    return base if weights.path is None else weights_preset(base, Path(weights.path))


def weights_preset(base: Preset, root: Path) -> Preset:
    """`base` with the sizes of the networks the folder `root` holds (see module docstring)."""
    configs = {part: read_part_config(root, part) for part in sorted(trained_parts(root))}
    return preset_from_configs(base, configs, root)


def preset_from_configs(base: Preset, configs: dict[str, dict], root: Path, fit_random: bool = True) -> Preset:
    """`base` with the sizes `configs` (part -> config) define; `root` names them in errors.
    `fit_random` False leaves the absent text encoder at `base`'s sizes (an import checks the
    parts it writes, not the random ones a run may add)."""
    trained_unet = _unet_size(root, configs)
    unet = trained_unet or base.unet
    layout_text = configs.get("layout_head", {}).get(LAYOUT_TEXT_DIM)
    text = _text_size(root, configs, base.text, trained_unet, layout_text) if fit_random or TEXT_ENCODER in configs \
        else base.text
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return replace(
        base,
        unet=unet,
        text=text,
        image=_image_size(root, configs, unet) or base.image,
        vae=_vae_size(configs) or base.vae,
        layout=_layout_size(configs, base.layout),
        plan=_dataclass_from(PlanSize, configs.get("plannet")) or base.plan,
        render=_dataclass_from(RenderSize, configs.get("render_cond")) or base.render,
        architecture=f"weights {digest}",
    )


def _where(root: Path, part: str) -> str:
    return f"{root / part / 'config.json'}"


def _unet_size(root: Path, configs: dict[str, dict]) -> UNetSize | None:
    """The U-Net sizes every U-Net-shaped part agrees on; None when the folder has none."""
    sizes: dict[str, UNetSize] = {}
    for part in DIFFUSERS_UNET_PARTS:
        if part not in configs:
            continue
        c = configs[part]
        where = _where(root, part)
        blocks = tuple(c.get("down_block_types", ()))
        if blocks != SD_DOWN_BLOCKS or ("up_block_types" in c and tuple(c["up_block_types"]) != SD_UP_BLOCKS):
            raise WeightsError(f"{where}: adgen's specs assume the SD 1.5 U-Net layout {SD_DOWN_BLOCKS}; got {blocks}")
        if c.get("layers_per_block", 2) != 2:
            raise WeightsError(f"{where}: expected two layers per block (SD 1.5), got {c['layers_per_block']}")
        if c.get("transformer_layers_per_block", 1) not in (1, [1] * 4):
            raise WeightsError(f"{where}: expected one transformer layer per block (SD 1.5), got "
                               f"{c['transformer_layers_per_block']}")
        for name in ("attention_head_dim", "cross_attention_dim"):
            if not isinstance(c.get(name), int):
                raise WeightsError(f"{where}: expected one integer {name} (SD 1.5), got {c.get(name)!r}")
        sizes[part] = unet_size(c)
    if "style_branch" in configs:
        sizes["style_branch"] = _dataclass_from(UNetSize, configs["style_branch"])
    (first, size), *others = list(sizes.items()) or [(None, None)]
    for part, other in others:
        if other != size:
            raise WeightsError(f"{root}: parts {first} and {part} disagree on the U-Net sizes ({size} vs {other}); "
                               "a pipeline's U-Net-shaped networks share one size")
    return size


def unet_size(config: dict) -> UNetSize:
    """The sizes of a U-Net (or ControlNet) from its diffusers config."""
    return UNetSize(
        block_out_channels=tuple(config["block_out_channels"]),
        attention_head_dim=config["attention_head_dim"],
        cross_attention_dim=config["cross_attention_dim"],
        norm_num_groups=config.get("norm_num_groups", 32),
        layers_per_block=config.get("layers_per_block", 2),
    )


def _text_size(root: Path, configs: dict[str, dict], base: TextEncoderSize, unet: UNetSize | None,
               layout_text: int | None) -> TextEncoderSize:
    """The trained text encoder's sizes; a random one takes the width the trained networks read."""
    readers = {}
    if unet is not None:
        readers["the U-Net's cross-attention"] = unet.cross_attention_dim
    if layout_text is not None:
        readers["layout_head's text features"] = layout_text
    if TEXT_ENCODER in configs:
        c = configs[TEXT_ENCODER]
        size = TextEncoderSize(
            hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"], max_length=c.get("max_position_embeddings", 77),
            vocab_size=c.get("vocab_size", 49408), hidden_act=c.get("hidden_act", "quick_gelu"),
        )
        for reader, width in readers.items():
            if width != size.hidden_size:
                raise WeightsError(f"{_where(root, TEXT_ENCODER)}: the text encoder is {size.hidden_size} wide but "
                                   f"{reader} reads {width}")
        return size
    widths = set(readers.values())
    if len(widths) > 1:
        raise WeightsError(f"{root}: the trained networks read text of different widths: {readers}")
    if not widths or widths == {base.hidden_size}:
        return base
    width = widths.pop()
    if width % base.num_heads:
        raise WeightsError(f"{root}: a random text encoder {width} wide (what {', '.join(readers)} read) does not split "
                           f"into the preset's {base.num_heads} heads: import the text encoder")
    return replace(base, hidden_size=width)


def _image_size(root: Path, configs: dict[str, dict], unet: UNetSize) -> ImageEncoderSize | None:
    if "image_encoder" not in configs:
        return None
    vision, resampler = configs["image_encoder"]["vision"], configs["image_encoder"]["resampler"]
    where = _where(root, "image_encoder")
    if resampler["output_dims"] != unet.cross_attention_dim:
        raise WeightsError(f"{where}: the resampler gives {resampler['output_dims']}-wide tokens but the U-Net's "
                           f"cross-attention reads {unet.cross_attention_dim}")
    if resampler["embed_dims"] != vision["hidden_size"]:
        raise WeightsError(f"{where}: the resampler reads {resampler['embed_dims']}-wide features but the vision "
                           f"tower is {vision['hidden_size']} wide")
    return ImageEncoderSize(
        image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=vision["hidden_size"],
        num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"], resampler_depth=resampler["depth"],
        resampler_heads=resampler["heads"], resampler_dim_head=resampler["dim_head"],
        num_tokens=resampler["num_queries"], hidden_act=vision.get("hidden_act", "quick_gelu"),
    )


def _vae_size(configs: dict[str, dict]) -> VAESize | None:
    c = configs.get("vae")
    if c is None:
        return None
    return VAESize(
        block_out_channels=tuple(c["block_out_channels"]), norm_num_groups=c.get("norm_num_groups", 32),
        latent_channels=c.get("latent_channels", 4), scaling_factor=c.get("scaling_factor", 0.18215),
    )


def _layout_size(configs: dict[str, dict], base: LayoutSize) -> LayoutSize:
    chosen = {}
    for part, names in (("layout_backbone", LAYOUT_BACKBONE_FIELDS), ("layout_head", LAYOUT_HEAD_FIELDS)):
        if part in configs:
            chosen.update({name: configs[part][name] for name in names})
    if "blocks" in chosen:
        chosen["blocks"] = tuple(chosen["blocks"])
    frame = configs.get("layout_head", {}).get(LAYOUT_PROPOSAL_FRAME, base.proposal_frame)
    if frame not in PROPOSAL_FRAMES:
        raise WeightsError(f"layout_head config: {LAYOUT_PROPOSAL_FRAME} {frame!r}: expected one of {PROPOSAL_FRAMES}")
    views = configs.get("layout_head", {}).get(LAYOUT_REFERENCE_VIEWS, base.reference_views)
    if not isinstance(views, bool):
        raise WeightsError(f"layout_head config: {LAYOUT_REFERENCE_VIEWS} {views!r}: expected true or false")
    return replace(base, **chosen, proposal_frame=frame, reference_views=views)


def _dataclass_from(kind, config: dict | None):
    """`kind` from the fields of `config` (adgen's own networks record their sizes as is)."""
    if config is None:
        return None
    names = {f.name for f in fields(kind)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    return kind(**values)
