"""Where the time goes: named sections of the pipeline (segmentation, CLIP proposals, the word's backward
passes, the trust numbers' forwards, drawing, …), timed while someone records.

The benchmarks (`ipag.bench`, `scripts/bench_page.py`) wrap what a user waits for in `recording()` and print
the `Budget` it fills, so that each optimisation is chosen by measurement. Outside a recording a section
costs one list lookup. Sections nest: each records its own time only (a section's children are subtracted
from it), so the sections one thread runs add up to at most its wall time. Sections are timed in whatever
thread runs them (the explainer's worker, Gradio's handlers) and added to every recording open at the time;
two threads working at once (drawing while the worker computes) can add up to more than the wall time.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: The sections, in the order a click's work runs; a budget lists them in this order (others after them).
SECTIONS = (
    "caption",  # generation, scored from its own logits
    "forward",  # the word's teacher-forced forward (shared by the words of a caption)
    "decoder backward",  # step 1: from the word to the vision layer and the cross-attention
    "vision backward",  # step 2: on through the vision encoder to the pixels
    "map weighting",  # heatmaps from the stored gradients (Grad-CAM weightings, relevancy, …)
    "segmentation",
    "CLIP proposals",  # composites of every proposal and their CLIP embeddings
    "CLIP query",  # the query's text embedding and the choice among the proposals
    "more maps",  # map types with passes of their own (occlusion, integrated gradients, CLIP relevance)
    "trust forwards",  # teacher-forced scoring of the blank image, the region alone and the region blurred
    "region caption",  # the captioner's caption of the region alone
    "drawing",
)


@dataclass
class Budget:
    """Seconds and calls per section, filled while `recording()` is open."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def add(self, name: str, seconds: float) -> None:
        with _lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def ordered(self) -> list[tuple[str, float, int]]:
        """(section, seconds, calls), the known sections in pipeline order, then any others."""
        names = [name for name in SECTIONS if name in self.seconds]
        names += sorted(set(self.seconds) - set(names))
        return [(name, self.seconds[name], self.calls[name]) for name in names]

    @classmethod
    def median(cls, budgets: Sequence["Budget"]) -> "Budget":
        """Per section, the median seconds and calls of several runs' budgets (a section missing from a run
        counts as 0 there)."""
        merged = cls()
        for name in {name for budget in budgets for name in budget.seconds}:
            merged.seconds[name] = statistics.median(budget.seconds.get(name, 0.0) for budget in budgets)
            merged.calls[name] = round(statistics.median(budget.calls.get(name, 0) for budget in budgets))
        return merged

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"seconds": seconds, "calls": calls} for name, seconds, calls in self.ordered()}

    @classmethod
    def from_dict(cls, sections: Mapping[str, Mapping[str, float]]) -> "Budget":
        budget = cls()
        for name, spent in sections.items():
            budget.seconds[name], budget.calls[name] = spent["seconds"], int(spent["calls"])
        return budget


_lock = threading.Lock()
_recordings: list[Budget] = []
_stack = threading.local()  #: per thread: the open sections, each [name, start, seconds of its children]


@contextmanager
def recording() -> Iterator[Budget]:
    """Time every section run (in any thread) while the block is open."""
    budget = Budget()
    with _lock:
        _recordings.append(budget)
    try:
        yield budget
    finally:
        with _lock:
            _recordings.remove(budget)


@contextmanager
def section(name: str) -> Iterator[None]:
    """Time the block as `name` (its own time: sections opened inside it are counted as theirs)."""
    if not _recordings:
        yield
        return
    stack = _stack.__dict__.setdefault("open", [])
    entry = [name, time.perf_counter(), 0.0]
    stack.append(entry)
    try:
        yield
    finally:
        stack.pop()
        elapsed = time.perf_counter() - entry[1]
        if stack:
            stack[-1][2] += elapsed
        with _lock:
            budgets = list(_recordings)
        for budget in budgets:
            budget.add(name, elapsed - entry[2])


@contextmanager
def sections_of(owner: Any, attribute: str, name: str) -> Iterator[None]:
    """While open, every call of `owner.attribute` is timed as section `name`: for work whose code declares no
    section of its own (the benchmarks time the page's drawing, `ipag.ui.render`, this way)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with section(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, timed)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def format_budget(budget: Budget, wall: float | None = None, title: str = "where the time went") -> str:
    """The budget as a table: seconds, share and calls per section; with `wall`, the wall time it covers and
    what no section accounts for (scheduling, waiting, Gradio, the browser)."""
    lines = [f"{title}:", f"  {'section':<18} {'seconds':>8} {'share':>6} {'calls':>6}"]
    reference = wall if wall else budget.total
    for name, seconds, calls in budget.ordered():
        share = f"{seconds / reference:.0%}" if reference else ""
        lines.append(f"  {name:<18} {seconds:>8.2f} {share:>6} {calls:>6}")
    if wall is not None:
        lines.append(f"  {'(no section)':<18} {max(wall - budget.total, 0.0):>8.2f}")
        lines.append(f"  {'wall time':<18} {wall:>8.2f}")
    return "\n".join(lines)
