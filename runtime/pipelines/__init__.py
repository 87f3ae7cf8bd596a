"""Pipelines by name, imported lazily."""

from __future__ import annotations

from importlib import import_module

from runtime.errors import InputError
from runtime.pipelines.base import PipelineDefinition

PIPELINES = {
    "refadgen": "runtime.pipelines.refadgen",
    "background": "runtime.pipelines.background",
    "layout": "runtime.pipelines.layout",
    "poster": "runtime.pipelines.poster",
}


def get_pipeline(name: str) -> PipelineDefinition:
    if name not in PIPELINES:
        raise InputError("pipeline", f"expected one of {', '.join(PIPELINES)}", repr(name))
    return import_module(PIPELINES[name]).DEFINITION
