"""Benchmarks, one module per subject, each with `main(argv=None) -> int`: `mmfm bench NAME [...]`
or `python -m mmfm.bench.NAME [...]`. They ship with the package, so an installed mmfm runs them
from any directory. Records: docs/records.md; measured figures: docs/benchmarks.md."""
from __future__ import annotations

import importlib

BENCHMARKS = ("attention", "cache", "data", "flow", "generate", "linear", "quant", "sampling", "soft", "sparsity", "speculative", "tokenize",
              "train", "typical")


def run(name: str, argv: list[str]) -> int:
    """Run benchmark `name` with its own arguments; ValueError names the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
    return int(importlib.import_module(f"mmfm.bench.{name}").main(argv) or 0)
