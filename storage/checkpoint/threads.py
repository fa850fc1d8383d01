"""Plain threads for the store's concurrent I/O: a step's files written and read side by side,
record reads, deletes.

Not an executor: executors refuse work once interpreter shutdown has begun, and the async
writer's last save (and the retention after it) may run exactly then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class InThread:
    """``fn(*args)`` running in a plain thread; :meth:`result` returns its value or raises."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="tlaunch-ckpt-io")
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to whoever asks for the result
            self._error = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def in_parallel(fn: Callable[[T], Any], items: Iterable[T], width: int = 8) -> None:
    """``fn(item)`` for every item, ``width`` at a time; the first error is raised once all
    have finished (none is left running behind the caller's back).

    Object stores answer N small requests in parallel in about the time of one; local disks
    and ``memory://`` gain nothing, so one item (the common case) runs inline.
    """
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    pending, done = iter(items), object()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                item = next(pending, done) if not errors else done
            if item is done:
                return
            try:
                fn(item)
            except BaseException as e:  # stop handing out work, report after the join
                with lock:
                    errors.append(e)

    workers = [InThread(work) for _ in range(min(width, len(items)))]
    for worker in workers:
        worker.wait()
    if errors:
        raise errors[0]
