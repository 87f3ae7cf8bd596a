"""What every import shares: recording what it mapped, dropped and why, checking each part
against adgen's network built from its config, and writing the weights folder with its manifest.

An import writes its parts into a staging folder beside `--out` and moves them in only when
every part passed, then rewrites the manifest; an `--out` that already is a weights folder gains
the new parts (an SD import and a ControlNet import make one poster folder), and a part it
already holds is refused rather than replaced.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from export.importers.checkpoints import Sources, load_state_file
from networks.parts import PARTS
from networks.registry import check_part_state
from networks.weights import write_part
from runtime.artifacts.architecture import preset_from_configs
from runtime.artifacts.weights import (
    TOKENIZER,
    TOKENIZER_FILES,
    WEIGHTS_MANIFEST,
    read_part_config,
    read_weights_manifest,
    write_weights_manifest,
)
from runtime.errors import WeightsError
from runtime.presets import get_preset

Progress = Callable[[str], None]
# Tokenizer files copied beside vocab.json and merges.txt when the source has them.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
VALIDATION_PRESET = "sd15"  # the canvas bounds are irrelevant to checking a part's shapes


@dataclass
class PartImport:
    config: dict
    state: dict[str, torch.Tensor]
    source: str  # what the manifest says it came from


@dataclass
class ImportSummary:
    family: str
    out: Path
    parts: dict[str, dict]
    mapped: list[str]
    dropped: list[str]
    notes: list[str]

    def text(self) -> str:
        lines = [f"imported {self.family} into {self.out}"]
        for part, entry in self.parts.items():
            lines.append(f"  {part:<16} {entry['tensors']:>5} tensors {entry['parameters']:>13,} parameters "
                         f"{'/'.join(entry['dtypes'])}  from {entry['source']}")
        lines += ["mapped:"] + [f"  {m}" for m in self.mapped]
        lines += ["dropped:"] + ([f"  {d}" for d in self.dropped] or ["  nothing"])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Import:
    """One import under way: what it read, the parts it will write and its account of the keys."""

    family: str
    out: Path
    progress: Progress = lambda message: None
    sources: Sources = field(default_factory=Sources)
    parts: dict[str, PartImport] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    processing: dict[str, str] = field(default_factory=dict)
    tokenizer: tuple[Path, str] | None = None  # folder, source description

    def map(self, what: str, count: int, to: str) -> None:
        self.mapped.append(f"{what} ({count} tensors) -> {to}")

    def drop(self, what: str, count: int, why: str) -> None:
        if count:
            self.dropped.append(f"{what} ({count} tensors): {why}")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def read_entry(self, checkpoint: Path, entry: str, container: str) -> tuple[str, dict[str, torch.Tensor]]:
        """The state dict under `entry` of a training checkpoint (`container`: DeepSpeed's model
        states hold it under "module", detectron2's checkpoints under "model") and the manifest's
        name for the file; the rest of the file is noted, not used."""
        self.progress(f"reading {checkpoint}")
        name = self.sources.add(checkpoint, container)
        loaded = load_state_file(checkpoint)
        if not isinstance(loaded, dict) or not isinstance(loaded.get(entry), dict):
            keys = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
            raise WeightsError(f"{checkpoint}: expected {container} with a {entry!r} entry, got {keys}")
        self.note(f"{name}: read its {entry!r} entry; not used: {', '.join(sorted(set(loaded) - {entry})) or 'nothing else'}")
        return name, loaded[entry]

    def add_part(self, part: str, config: Mapping, state: dict[str, torch.Tensor], source: str) -> None:
        if part in self.parts:
            raise WeightsError(f"{self.family} import: part {part} given twice")
        self.parts[part] = PartImport(dict(config), state, source)

    def add_tokenizer(self, folder: Path, source: str) -> None:
        missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
        if missing:
            raise WeightsError(f"{folder}: not a CLIP tokenizer folder ({', '.join(missing)} missing)")
        self.tokenizer = (folder, source)

    def write(self) -> ImportSummary:
        existing = self._existing()
        configs = {part: read_part_config(self.out, part) for part in existing.get("parts", {})}
        configs.update({part: p.config for part, p in self.parts.items()})
        preset = preset_from_configs(get_preset(VALIDATION_PRESET), configs, self.out, fit_random=False)
        for part, p in self.parts.items():
            check_part_state(part, p.config, preset, p.state, f"{self.family} import, part {part} ({p.source})")
        staging = self.out.parent / f".{self.out.name}.importing"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            described = {}
            for part, p in self.parts.items():
                self.progress(f"writing {part} ({len(p.state)} tensors)")
                write_part(staging, part, p.config, p.state)
                described[part] = _describe(part, p)
            if self.tokenizer is not None:
                folder, _ = self.tokenizer
                (staging / TOKENIZER).mkdir(parents=True)
                for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
                    if (folder / name).is_file():
                        shutil.copyfile(folder / name, staging / TOKENIZER / name)
            self.out.mkdir(parents=True, exist_ok=True)
            for item in sorted(staging.iterdir()):
                shutil.move(str(item), str(self.out / item.name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_weights_manifest(self.out, {
            "parts": {**existing.get("parts", {}), **described},
            "tokenizer": {"source": self.tokenizer[1]} if self.tokenizer else existing.get("tokenizer"),
            "sources": {**existing.get("sources", {}), **self.sources.files},
            "processing": {**existing.get("processing", {}), **self.processing},
            "imports": [*existing.get("imports", []), {
                "family": self.family, "parts": sorted(self.parts), "mapped": self.mapped, "dropped": self.dropped,
                "notes": self.notes,
            }],
        })
        return ImportSummary(self.family, self.out, described, self.mapped, self.dropped, self.notes)

    def _existing(self) -> dict:
        """The manifest of the folder being added to ({} for a new one); refuses replacing a part."""
        if not self.out.exists() or not any(self.out.iterdir()):
            return {}
        manifest = read_weights_manifest(self.out)
        if manifest is None:
            raise WeightsError(f"--out {self.out} exists and is not an adgen weights folder (no {WEIGHTS_MANIFEST}): "
                               "give a new or empty folder")
        clash = sorted(set(manifest.get("parts", {})) & set(self.parts))
        if clash:
            raise WeightsError(f"{self.out} already holds {', '.join(clash)} (from "
                               f"{manifest['parts'][clash[0]].get('source')}): import into another folder")
        if self.tokenizer is not None and (self.out / TOKENIZER).exists():
            same = all(_same_file(self.tokenizer[0] / n, self.out / TOKENIZER / n) for n in TOKENIZER_FILES)
            if not same:
                raise WeightsError(f"{self.out} already holds a different tokenizer: import into another folder")
            self.tokenizer = None  # the folder's own copy stays
        return manifest


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _describe(part: str, p: PartImport) -> dict:
    return {
        "source": p.source,
        "what": PARTS[part].doc,
        "tensors": len(p.state),
        "parameters": sum(t.numel() for t in p.state.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in p.state.values()}),
    }
