"""The diffusers/transformers folders users download, read into adgen parts, tolerant of the
layouts found in the wild:

- a folder holding both `.safetensors` and `.bin`: the safetensors are read, the pickle never;
- transformers-4 CLIP files: keys under `text_model.` / `vision_model.` and the
  `position_ids` buffer (transformers 5's CLIPTextModel has neither);
- a full CLIPModel folder (openai/clip-vit-large-patch14) where a text encoder is wanted: its
  text tower;
- diffusers' older attention names in VAEs (`query`, `key`, `value`, `proj_attn`);
- a tokenizer in the model folder itself (transformers) or beside it (diffusers' `tokenizer/`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from export.importers.checkpoints import read_model_folder
from export.importers.writer import Import
from runtime.artifacts.weights import CONFIG_FILE, TOKENIZER, TOKENIZER_FILES
from runtime.errors import WeightsError

POSITION_IDS = "embeddings.position_ids"
# diffusers' AttentionBlock before 0.14 (VAE mid-blocks): old name -> the Attention module's.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing {path}") from None
    except ValueError as e:
        raise WeightsError(f"{path}: not JSON ({e})") from e


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def read_folder(imp: Import, folder: Path, role: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """config, tensors and the manifest name of a model folder; records what it read and skipped."""
    config = read_json(folder / CONFIG_FILE)
    weights = read_model_folder(folder)
    names = [imp.sources.add(f, role, f"{folder.name}/{f.name}") for f in weights.files]
    if weights.ignored:
        imp.note(f"{folder}: read {', '.join(f.name for f in weights.files)}; not read: "
                 f"{', '.join(f.name for f in weights.ignored)}")
    return config, weights.state, ", ".join(names)


def clip_text_encoder(imp: Import, folder: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """A transformers CLIP text encoder folder (CLIPTextModel, or the text tower of a CLIPModel)."""
    config, state, name = read_folder(imp, folder, "CLIP text encoder")
    if config.get("model_type") == "clip":  # a whole CLIP model: keep its text tower
        config = config["text_config"]
        tower = strip_prefix(state, "text_model.")
        imp.drop(f"{folder.name}: vision tower, projections, logit scale", len(state) - len(tower),
                 "a full CLIP model: the text encoder is its text tower")
        state = tower
    elif any(k.startswith("text_model.") for k in state):
        imp.map(f"{folder.name}: text_model.*", sum(k.startswith("text_model.") for k in state),
                "text_encoder (transformers-4 names: prefix dropped)")
        state = strip_prefix(state, "text_model.")
    position_ids = state.pop(POSITION_IDS, None)
    imp.drop(f"{folder.name}: {POSITION_IDS}", int(position_ids is not None), "a transformers-4 buffer (0..76), not a weight")
    projection = state.pop("text_projection.weight", None)
    imp.drop(f"{folder.name}: text_projection", int(projection is not None), "SD reads the last hidden state, not the projection")
    return config, state, name


def clip_vision_tower(imp: Import, folder: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """The vision tower of a transformers CLIPVisionModel(WithProjection) folder (IP-Adapter's image encoder)."""
    config, state, name = read_folder(imp, folder, "CLIP image encoder")
    if config.get("model_type") == "clip":
        config = config["vision_config"]
    if any(k.startswith("vision_model.") for k in state):  # CLIPVisionModelWithProjection's names
        tower = strip_prefix(state, "vision_model.")
        other = sorted(k for k in state if not k.startswith("vision_model."))
        imp.drop(f"{folder.name}: {', '.join(other)}", len(other),
                 "IP-Adapter Plus reads the penultimate hidden state, not the projected embedding")
    else:
        tower = dict(state)
    position_ids = tower.pop(POSITION_IDS, None)
    imp.drop(f"{folder.name}: vision {POSITION_IDS}", int(position_ids is not None), "a transformers-4 buffer, not a weight")
    return config, tower, name


def diffusers_model(imp: Import, folder: Path, role: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """A diffusers model folder (VAE, U-Net, ControlNet), older attention names renamed."""
    config, state, name = read_folder(imp, folder, role)
    renamed = {}
    for key, tensor in state.items():
        m = _OLD_ATTENTION_KEY.match(key)
        renamed[f"{m[1]}.{_OLD_ATTENTION[m[2]]}.{m[3]}" if m else key] = tensor
    old = sum(1 for k in state if _OLD_ATTENTION_KEY.match(k))
    if old:
        imp.map(f"{folder.name}: attentions.*.query/key/value/proj_attn", old, f"{role}: to_q/to_k/to_v/to_out.0 "
                "(diffusers' older attention names)")
    return config, renamed, name


def tokenizer_beside(text_encoder: Path) -> Path | None:
    """The tokenizer of a text encoder folder: in it (transformers) or beside it (diffusers)."""
    for folder in (text_encoder, text_encoder.parent / TOKENIZER):
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None
