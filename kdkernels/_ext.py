"""Loader for the optional CUDA extension. Not built yet: the cuda backend is unavailable."""

from __future__ import annotations


def unavailable_reason() -> str | None:
    return "the CUDA extension is not part of this build yet"


def load():
    return None
