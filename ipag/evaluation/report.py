"""Aggregating per-item numbers and printing them: every evaluation reports mean ± std with its count, so a
number computed on three images never looks as solid as one computed on a thousand."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation and count of the values that are not None (NaN where there are none)."""
    kept = np.array([value for value in values if value is not None], dtype=np.float64)
    if kept.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(kept.mean()), "std": float(kept.std(ddof=1)) if kept.size > 1 else 0.0, "n": int(kept.size)}


def describe(value: float | dict[str, Any] | None, digits: int = 3) -> str:
    """A table cell: a plain number, or a summary as "mean ± std (n=…)", or "—" for nothing."""
    if value is None:
        return "—"
    if isinstance(value, dict):
        if not value["n"]:
            return "—"
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f} (n={value['n']})"
    return f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text columns (readable in a terminal and in a log file alike)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
