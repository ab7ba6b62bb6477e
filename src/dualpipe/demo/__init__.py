"""Demo: train a small GPT with a pipeline schedule on local CPU processes."""

from __future__ import annotations

from .run import main

__all__ = ["main"]
