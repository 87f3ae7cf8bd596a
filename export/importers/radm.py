"""`adgen import radm`: detectron2's `model_final.pth` of RADM (GitHub liuan0803/RADM).

The file is a pickled dict whose `model` entry is the state dict of the reference's RADM module:
`backbone.*` (detectron2's ResNet + FPN, frozen BatchNorm: four buffers, no
`num_batches_tracked`) -> part `layout_backbone`; `head.*` (`head_series.{0..5}`, `time_mlp`)
-> part `layout_head`; inside both the names map 1:1. The 12 buffers of its box diffusion
(`betas`, `alphas_cumprod`, ...) are dropped: adgen's box sampler computes the same cosine
schedule (runtime/diffusion/boxes.py).

The sizes come from the tensors' shapes; what no shape tells is RADM's config
(configs/radm.yaml, RADM/config.py): 8 self-attention heads, 100 proposals, 20 selling points,
2 VTRAM heads; and how its head scales proposals (x by the image height: the reference reads
the image shape as (c, w, h)), recorded as `proposal_frame: "hwhw"`; and its two views of tensors it should have transposed (the
text features, VTRAM's output), recorded as `reference_views: true`. RADM ships precomputed 768-d text features, not their encoder:
`--text-encoder` names the CLIP text encoder (and its tokenizer) that encodes selling points.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from export.importers.folders import clip_text_encoder, strip_prefix, tokenizer_beside
from export.importers.writer import Import, ImportSummary, Progress
from runtime.artifacts.architecture import LAYOUT_PROPOSAL_FRAME, LAYOUT_REFERENCE_VIEWS, LAYOUT_TEXT_DIM
from runtime.errors import WeightsError

DIFFUSION_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# RADM's config for what the weights' shapes do not tell (RADM/config.py, configs/radm.yaml).
RADM_CONFIG = {"heads": 8, "num_boxes": 100, "max_texts": 20, "vtram_heads": 2}
# How the trained head saw its proposals: RADM/detector.py preprocess_image reads the image shape
# as (c, w, h), so x was scaled by the height (runtime/presets.py LayoutSize.proposal_frame).
RADM_PROPOSAL_FRAME = "hwhw"
# RADM/head.py views the (20, 768) text features as (768, 20) and VTRAM's (49, C) output as (C, 49)
# (LayoutSize.reference_views).
RADM_REFERENCE_VIEWS = True


def import_radm(out: Path, checkpoint: Path, text_encoder: Path | None = None,
                progress: Progress = lambda m: None) -> ImportSummary:
    imp = Import("radm", out, progress)
    name, model = imp.read_entry(checkpoint, "model", "detectron2's checkpoint")
    buffers = [k for k in model if k in DIFFUSION_BUFFERS]
    imp.drop(f"{name}: {', '.join(buffers)}", len(buffers),
             "the box diffusion's cosine schedule, which adgen's sampler computes (runtime/diffusion/boxes.py)")
    unknown = sorted(k for k in model if k not in DIFFUSION_BUFFERS and not k.startswith(("backbone.", "head.")))
    if unknown:
        raise WeightsError(f"{checkpoint}: keys outside RADM's backbone, head and diffusion buffers: {unknown[:5]}")
    backbone, head = strip_prefix(model, "backbone."), strip_prefix(model, "head.")
    tracked = [k for k in backbone if k.endswith(".num_batches_tracked")]
    imp.drop(f"{name}: backbone *.num_batches_tracked", len(tracked), "BatchNorm's step counter (frozen BN has none)")
    backbone = {k: v for k, v in backbone.items() if k not in tracked}

    imp.add_part("layout_backbone", _backbone_config(backbone), backbone, f"{name} (backbone.*)")
    imp.map(f"{name}: backbone.*", len(backbone), "layout_backbone (detectron2 names kept)")
    imp.add_part("layout_head", _head_config(head), head, f"{name} (head.*)")
    imp.map(f"{name}: head.*", len(head), "layout_head (reference names kept)")
    imp.note(f"not in the weights, taken from RADM's config: {RADM_CONFIG}")

    if text_encoder is not None:
        config, state, text_name = clip_text_encoder(imp, text_encoder)
        imp.add_part("text_encoder", config, state, text_name)
        imp.map(f"{text_name}: text encoder", len(state), "text_encoder (encodes the selling points)")
        tokenizer = tokenizer_beside(text_encoder)
        if tokenizer is None:
            raise WeightsError(f"{text_encoder}: no tokenizer in it or beside it (vocab.json, merges.txt): the text "
                               "encoder needs its tokenizer")
        imp.add_tokenizer(tokenizer, str(tokenizer))
        imp.note(f"RADM was trained on precomputed text features from an encoder its repository does not name; "
                 f"selling points are encoded here by {text_encoder}")
    else:
        imp.note("no --text-encoder: RADM ships none; run the layout pipeline with --allow-random text_encoder, or "
                 "import into this folder again with one")
    imp.processing["layout"] = "reference"
    return imp.write()


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {m[1] for k in state if (m := re.match(pattern, k))}
    return len(found)


def _backbone_config(state: dict[str, torch.Tensor]) -> dict:
    if "bottom_up.stem.conv1.weight" not in state or "fpn_lateral2.weight" not in state:
        raise WeightsError("backbone.*: expected detectron2's ResNet + FPN (bottom_up.stem.conv1, fpn_lateral2)")
    return {
        "stem_channels": state["bottom_up.stem.conv1.weight"].shape[0],
        "blocks": [_count(state, rf"bottom_up\.res{stage}\.(\d+)\.") for stage in range(2, 6)],
        "fpn_channels": state["fpn_lateral2.weight"].shape[0],
    }


def _head_config(state: dict[str, torch.Tensor]) -> dict:
    first = "head_series.0."
    if f"{first}linear1.weight" not in state:
        raise WeightsError("head.*: expected RADM's cascaded heads (head_series.0.linear1 missing)")
    hidden = state[f"{first}linear1.weight"].shape[1]
    return {
        "hidden": hidden,
        "ffn": state[f"{first}linear1.weight"].shape[0],
        "dynamic_dim": state[f"{first}inst_interact.norm1.weight"].shape[0],
        "cascade": _count(state, r"head_series\.(\d+)\."),
        "pooler": math.isqrt(state[f"{first}inst_interact.out_layer.weight"].shape[1] // hidden),
        "gram_dim": state[f"{first}GRAM.linear.weight"].shape[1],
        "num_classes": state[f"{first}class_logits.weight"].shape[0],
        LAYOUT_TEXT_DIM: state[f"{first}vis_text_att.image_lang_att.f_key.0.weight"].shape[1],
        LAYOUT_PROPOSAL_FRAME: RADM_PROPOSAL_FRAME,
        LAYOUT_REFERENCE_VIEWS: RADM_REFERENCE_VIEWS,
        **RADM_CONFIG,
    }
