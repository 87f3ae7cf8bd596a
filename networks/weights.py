"""Reading and writing weights: the one place torch modules meet files.

A weights folder (runtime/artifacts/weights.py) holds one folder per part: the config that
builds the network and its state dict as safetensors. Every load is strict: exactly the module's
keys with the module's shapes, or a `WeightsError` naming the file, the part and the first
mismatches. Random initialisation draws each network from its own seed offset (`seeded`), so
building one network alone gives the same weights as building all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.artifacts.weights import part_config_path, part_weights_path
from runtime.errors import WeightsError

M = TypeVar("M", bound=nn.Module)


def seeded(seed: int, offset: int, make: Callable[[], M]) -> M:
    """`make()` with torch's generator seeded from (seed, offset): one offset per network."""
    torch.manual_seed(seed * 1000 + offset)
    return make()


def mismatches(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Size]) -> str:
    """What differs between two key -> shape maps, or "" when they agree."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    details = []
    if missing:
        details.append(f"{len(missing)} missing (first: {missing[:3]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
    if wrong:
        k = wrong[0]
        details.append(f"{len(wrong)} with wrong shape (first: {k} expected {tuple(expected[k])}, got {tuple(got[k])})")
    return "; ".join(details)


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict requiring exactly the module's keys with the module's shapes."""
    differs = mismatches(shapes(module.state_dict()), shapes(state))
    if differs:
        raise WeightsError(f"{where}: keys do not match the network: {differs}")
    module.load_state_dict(state, strict=True)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e


def load_part(module: nn.Module, root: Path, part: str) -> None:
    """Load part `part` of the weights folder `root` into `module`, strictly."""
    path = part_weights_path(root, part)
    load_strict(module, read_safetensors(path), f"{path.parent.name}/{path.name}")


def write_part(root: Path, part: str, config: Mapping, state: Mapping[str, torch.Tensor]) -> Path:
    """Write part `part` into the weights folder `root`: its config and its tensors."""
    config_path, weights_path = part_config_path(root, part), part_weights_path(root, part)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(dict(config), indent=2, default=list) + "\n")
    save_file(contiguous(state), weights_path)
    return weights_path


def contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
