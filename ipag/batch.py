"""Batch commands over many items, in this process or on a Ray cluster, through one per-item function.

A batch command (`explain`, `evaluate-faithfulness`, and any later one) is three pieces: a list of items (image
paths, scene seeds), a *worker* that loads the models once and then turns one item into a small JSON-ready
record, and an aggregate over the records. `run_items` maps the worker over the items either here, in a plain
loop, or as a Ray dataset whose actor pool builds one worker per actor (`map_batches` with a callable class:
the models load once per actor; one GPU per actor when the cluster has GPUs). Either way it returns the same
records in item order, and the command aggregates them the same way, so a distributed run and a local one give
the same numbers. The driver only collects records: whatever a worker writes (the `explain` folders), it writes
itself, atomically, so that Ray's retry of an item whose actor died can neither lose it nor leave half of it.

Ray is optional (`requirements-ray.txt`) and imported only when asked for.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

#: A worker's answer for one item: JSON-ready, small (results that are large are written by the worker itself).
#: A failed item's record has an "error" (the message); the others go on.
Record = dict[str, Any]
#: Turns one item, given with its position in the item list, into its record.
Worker = Callable[[int, Any], Record]
#: Builds a worker (this is where models load): called once here, or once per Ray actor, so it must pickle (a
#: module-level function, or a `functools.partial` of one with picklable arguments).
WorkerFactory = Callable[[], Worker]

#: `--ray` without an address: Ray's own name for "start a new local Ray for this run".
LOCAL = "local"
#: This package, shipped with each Ray job.
PACKAGE = Path(__file__).resolve().parent
INSTALL_HINT = ("--ray needs Ray Data, which is not installed. Install it with: "
                ".venv/bin/pip install -r requirements-ray.txt")
#: CPU threads (and Ray CPUs) per actor on a cluster without GPUs. Measured on 2 cores (README, "Scale out"):
#: two one-thread actors explain ~1.5× as many images an hour as one two-thread actor, because one image's
#: work is mostly small operations that two intra-op threads cannot share well, while two processes never
#: wait for each other. It costs one copy of the models per core.
CPUS_PER_ACTOR = 1


class RayUnavailableError(RuntimeError):
    """`--ray` was asked for, but Ray is not installed or the cluster cannot be reached; the message says the fix."""


def run_items(make_worker: WorkerFactory, items: Sequence[Any], ray_address: str | None = None,
              desc: str = "Working", unit: str = "item") -> list[Record]:
    """Every item's record, in item order: here in a plain loop (`ray_address` None), or on Ray (`LOCAL`, "auto",
    "ray://host:10001"). Failed items are reported on stderr as their records arrive."""
    if ray_address is None:
        worker = make_worker()
        return [_reported(item, worker(index, item)) for index, item in enumerate(tqdm(items, desc=desc, unit=unit))]
    return _run_on_ray(make_worker, items, ray_address)


def _reported(item: Any, record: Record) -> Record:
    if "error" in record:
        tqdm.write(f"error: {item}: {record['error']}", file=sys.stderr)
    return record


# --- Ray -------------------------------------------------------------------------------------------------------

class RayWorker:
    """One actor of the Ray Data pool: builds the worker once (the models load here), then maps it over the rows
    it is given. Items and records travel pickled, so what comes back is exactly what the local loop returns."""

    def __init__(self, make_worker: WorkerFactory, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.worker = make_worker()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [self.worker(int(index), pickle.loads(item)) for index, item in zip(batch["index"], batch["item"])]
        return {"index": list(batch["index"]), "record": [pickle.dumps(record) for record in records]}


def _run_on_ray(make_worker: WorkerFactory, items: Sequence[Any], address: str) -> list[Record]:
    """One row per item and one item per block, so that an actor's death costs Ray one retried item; records are
    collected as they stream in."""
    ray = import_ray()
    with connected(ray, address):
        rows = ray.data.from_items([{"index": index, "item": pickle.dumps(item)} for index, item in enumerate(items)],
                                   override_num_blocks=len(items))
        actors, resources, threads = actor_pool(ray.cluster_resources(), len(items))
        records = rows.map_batches(
            RayWorker, fn_constructor_args=(make_worker, threads), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors), **resources)
        found: dict[int, Record] = {}
        for row in records.iter_rows():
            found[row["index"]] = _reported(items[row["index"]], pickle.loads(row["record"]))
    return [found[index] for index in range(len(items))]


def actor_pool(resources: dict[str, float], items: int) -> tuple[int, dict[str, float], int | None]:
    """(actors, each actor's Ray resources, its torch threads) for a cluster's resources: one actor per GPU (the
    explainer picks `cuda` there), else one actor per `CPUS_PER_ACTOR` cores with as many torch threads; never
    more actors than items."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return min(gpus, items), {"num_gpus": 1}, None
    actors = max(1, int(resources.get("CPU", 1)) // CPUS_PER_ACTOR)
    return min(actors, items), {"num_cpus": CPUS_PER_ACTOR}, CPUS_PER_ACTOR


def import_ray() -> ModuleType:
    """The `ray` module with Ray Data, or `RayUnavailableError` with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401 — Ray Data's own dependencies (pyarrow, pandas) fail here
    except ImportError as err:
        raise RayUnavailableError(INSTALL_HINT) from err
    return ray


@contextmanager
def connected(ray: ModuleType, address: str) -> Iterator[None]:
    """Ray for the duration of a run: a new local one (dashboard off, quiet logs) or the cluster at `address`,
    disconnected afterwards. The job ships this very package to the workers, so a cluster runs the driver's code
    and needs only the dependencies installed. A Ray the caller already started (a notebook, the tests) is used
    as it is and left running."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"runtime_env": {"py_modules": [str(PACKAGE)], "excludes": ["__pycache__"]}}
    if address == LOCAL:
        options |= {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        ray.init(address=address, **options)
    except ConnectionError as err:
        raise RayUnavailableError(f"Could not reach a Ray cluster at {address!r}: {err}") from err
    try:
        yield
    finally:
        ray.shutdown()
