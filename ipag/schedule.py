"""One worker thread that runs all model work, one task at a time, the most urgent first.

On a small CPU two computations side by side only make each other slower; what a user waits for must go
first. So every model computation of an explainer (captions, a word's backward pass, grounding, trust
numbers) is a `Task` on one `Scheduler`, ordered by priority — a caption before a click, a click before the
background precompute — and, among background work, the most recent plan first (the image a user just
uploaded before the example photos warmed up at start-up). Between tasks the worker looks at the queue
again, so a click waits for at most the task that is running.

A task publishes one or more results, each under a key (its cache key). Asking for a key that a queued task
will publish raises that task's priority instead of queueing the work twice; asking for one that the running
task will publish waits for it. Results go to the explainer's `ImageCache`, so a key already computed is
answered without the worker.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

from .cache import ImageCache

logger = logging.getLogger(__name__)

#: (image key, cache key): what a task publishes, and what a caller waits for.
Key = tuple[str, Hashable]
Publish = Callable[[Key, Any], None]


class Priority(IntEnum):
    CAPTION = 0  #: an upload: nothing else can start before the user has words to click
    CLICK = 1  #: something a user (or an API call, or the CLI) is waiting for
    BACKGROUND = 2  #: precompute: work a user will probably ask for next


@dataclass(eq=False)
class Task:
    """Work that publishes `keys` (in that order) through the `publish` callback it is given."""

    keys: tuple[Key, ...]
    work: Callable[[Publish], None]
    priority: Priority
    plan: int = 0  #: background plans run newest first
    futures: dict[Key, Future] = field(default_factory=dict)
    state: str = "queued"  #: queued → running → done, or cancelled

    def __post_init__(self) -> None:
        self.futures = {key: Future() for key in self.keys}


#: How far the work for a group of keys is: all of it done, some of it running now, some of it done and the rest
#: waiting, all of it waiting, or none of it done nor queued (dropped by a cancel, or failed).
Progress = Literal["ready", "running", "partial", "queued", "dropped"]


class Plan:
    """The background tasks queued for one purpose (say, every word of a caption with the page's settings).
    `cancel()` drops those not started yet, unless a caller asked for them meanwhile. `groups` are the keys of
    each item the plan is for (a caption's words), whose `progress` a page can show."""

    def __init__(self, scheduler: "Scheduler", number: int) -> None:
        self._scheduler = scheduler
        self.number = number
        self.tasks: list[Task] = []
        self.groups: list[tuple[Key, ...]] = []

    def cancel(self) -> None:
        self._scheduler.cancel(self)

    def progress(self) -> list[Progress]:
        """How far each group is, in order."""
        return [self._scheduler.progress(keys) for keys in self.groups]

    def wait(self, timeout: float | None = None) -> None:
        """Block until every task of the plan is done or cancelled (re-raising a task's failure)."""
        for task in self.tasks:
            for future in task.futures.values():
                try:
                    future.result(timeout)
                except CancelledError:
                    pass


class Scheduler:
    """A priority queue of tasks and the one daemon thread that runs them (started on first use)."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        self._idle: list[Callable[[], None]] = []  #: called when the queue runs empty
        self._heap: list[tuple[int, int, int, Task]] = []
        self._owner: dict[Key, Task] = {}  #: key → the queued or running task that will publish it
        self._order = itertools.count()
        self._plans = itertools.count(1)
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        _SCHEDULERS.add(self)

    # --- asking for results ------------------------------------------------------------------------------------

    def request(self, keys: Sequence[Key], work: Callable[[Publish], None], priority: Priority,
                plan: Plan | None = None) -> dict[Key, Future]:
        """Futures for `keys`: cached results at once, else those of the task that will publish them (raised to
        `priority` if it waits with a lower one), else of a new task running `work`."""
        with self._condition:
            cached = [self.cache.get(*key) for key in keys]
            if all(value is not None for value in cached):
                return {key: _done(value) for key, value in zip(keys, cached)}
            owners = {self._owner.get(key) for key in keys}
            if len(owners) == 1 and (task := owners.pop()) is not None:
                self._raise(task, priority, plan)
            else:
                task = Task(tuple(keys), work, priority, plan.number if plan else 0)
                for key in keys:
                    self._owner[key] = task
                self._push(task)
                if plan is not None:
                    plan.tasks.append(task)
            return {key: task.futures[key] for key in keys}

    def result(self, key: Key, work: Callable[[Publish], None], priority: Priority = Priority.CLICK,
               timeout: float | None = None) -> Any:
        """The result for `key`, computed by `work` if nobody has it or will publish it; blocks until ready.
        Called from the worker itself (a task needing another result), the work runs inline."""
        if threading.current_thread() is self._thread:
            cached = self.cache.get(*key)
            if cached is not None:
                return cached
            published: dict[Key, Any] = {}
            work(lambda k, v: (self.cache.put(*k, v), published.__setitem__(k, v)))
            return published[key]
        return self.request([key], work, priority)[key].result(timeout)

    def progress(self, keys: Sequence[Key]) -> Progress:
        """How far the work publishing `keys` is (see `Progress`)."""
        with self._condition:
            done = [self.cache.get(*key) is not None for key in keys]
            states = {task.state for key in keys if (task := self._owner.get(key)) is not None}
        if all(done):
            return "ready"
        if "running" in states:
            return "running"
        if any(done):
            return "partial"
        return "queued" if states else "dropped"

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` in the worker whenever the queue runs empty (e.g. to free a kept autograd graph)."""
        self._idle.append(callback)

    def new_plan(self) -> Plan:
        return Plan(self, next(self._plans))

    def cancel(self, plan: Plan) -> None:
        """Drop the plan's tasks that have not started and that no one else asked for."""
        with self._condition:
            for task in plan.tasks:
                if task.state == "queued" and task.priority == Priority.BACKGROUND and task.plan == plan.number:
                    task.state = "cancelled"
                    for key, future in task.futures.items():
                        self._owner.pop(key, None)
                        future.cancel()
            self._condition.notify_all()  # for `wait_idle`

    def close(self, timeout: float = 120.0) -> None:
        """Drop every queued task and let the running one finish; the worker then stops. Called at exit: a
        thread still inside a model's forward pass when Python shuts down makes the process abort."""
        with self._condition:
            self._closed = True
            for _, _, _, task in self._heap:
                if task.state == "queued":
                    task.state = "cancelled"
                    for future in task.futures.values():
                        future.cancel()
            self._heap.clear()
            self._owner.clear()
            self._condition.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        with self._condition:
            return not self._owner

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (or `timeout` seconds passed); returns whether it is idle."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._owner, timeout)

    # --- the worker ------------------------------------------------------------------------------------------------

    def _raise(self, task: Task, priority: Priority, plan: Plan | None) -> None:
        """Move a queued task up to `priority` (a duplicate heap entry; the stale one is skipped when popped)."""
        if task.state != "queued" or priority >= task.priority:
            return
        task.priority = priority
        task.plan = 0  # asked for by someone now: no plan's cancel may drop it
        self._push(task)

    def _push(self, task: Task) -> None:
        if self._closed:
            raise RuntimeError("The explainer's worker has been shut down.")
        heapq.heappush(self._heap, (int(task.priority), -task.plan, next(self._order), task))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ipag-worker", daemon=True)
            self._thread.start()
        self._condition.notify()

    def _next(self) -> Task | None:
        """The next task to run, waiting for one; None once the scheduler is closed."""
        with self._condition:
            while not self._closed:
                while self._heap:
                    priority, _, _, task = heapq.heappop(self._heap)
                    if task.state != "queued" or priority != task.priority:
                        continue  # cancelled, or a stale entry of a task whose priority was raised
                    if not self._answer_from_cache(task):
                        task.state = "running"
                        return task
                for callback in self._idle:
                    callback()
                self._condition.wait()
            return None

    def _answer_from_cache(self, task: Task) -> bool:
        """Finish `task` without running it when all its results were cached meanwhile (by another task that
        needed them and ran their work inline)."""
        cached = [self.cache.get(*key) for key in task.keys]
        if any(value is None for value in cached):
            return False
        for key, value in zip(task.keys, cached):
            task.futures[key].set_result(value)
            self._owner.pop(key, None)
        task.state = "done"
        self._condition.notify_all()  # for `wait_idle`
        return True

    def _run(self) -> None:
        while (task := self._next()) is not None:
            try:
                task.work(lambda key, value: self._publish(task, key, value))
                missing = [key for key, future in task.futures.items() if not future.done()]
                if missing:
                    raise RuntimeError(f"A task finished without publishing {missing}.")
            except BaseException as err:  # noqa: BLE001 — whatever failed, its waiters must hear of it
                logger.exception("task %s failed", task.keys[0][1])
                for future in task.futures.values():
                    if not future.done():
                        future.set_exception(err)
            finally:
                with self._condition:
                    task.state = "done"
                    for key in task.keys:
                        if self._owner.get(key) is task:
                            del self._owner[key]
                    self._condition.notify_all()  # for `wait_idle`

    def _publish(self, task: Task, key: Key, value: Any) -> None:
        self.cache.put(*key, value)
        future = task.futures.get(key)
        if future is not None and not future.done():
            future.set_result(value)


#: Every scheduler, so that their workers are stopped before the interpreter shuts down (see `Scheduler.close`).
_SCHEDULERS: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler.close()


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
