"""Two-phase async saving: a CPU snapshot training waits for, then a background writer.

Phase 1, :func:`cpu_snapshot`, copies every tensor to CPU memory; it costs about what a plain
in-memory copy costs and is the only part the training loop waits for. Phase 2,
:class:`AsyncCheckpointWriter`, serializes, hashes, uploads and commits in a background thread.

At most one save is in flight: a second :meth:`~AsyncCheckpointWriter.submit` blocks until the
first has committed. A queue would let snapshots pile up in memory whenever storage is slower
than the save interval; blocking turns slow storage into visible back-pressure instead.

A failed save is never swallowed: its error is raised by the next ``submit``, ``check`` or
``flush``. An ``atexit`` hook flushes, so a script that returns from ``main`` while a save is in
flight still commits it.

``flush`` returns once the save is settled: committed (or failed) and its retention pass done.
Freeing the snapshot comes after that, at the end of the writer's thread: for a state of 500 MB
it takes 0.1-0.5 s (every page given back to the kernel), which a stop's exit need not wait
for (the next ``submit`` does: one snapshot in flight at a time). So the thread is a daemon:
the ``atexit`` flush does not wait for the freeing, and a process that leaves with
``os._exit`` (:func:`leave_without_teardown`) leaves the rest of it to the kernel. A process
that goes through the interpreter's teardown waits for it (:func:`wait_for_freeing`).
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tlaunch.storage.store import one_line

if TYPE_CHECKING:
    from tlaunch.storage.checkpoint.retention import RetentionPolicy
    from tlaunch.storage.checkpoint.store import CheckpointInfo, CheckpointStore

log = logging.getLogger(__name__)

#: The writers of this process, whose threads the exit may have to wait for.
_writers: weakref.WeakSet[AsyncCheckpointWriter] = weakref.WeakSet()
#: False once the process is to leave with ``os._exit`` right after its exit functions.
_teardown_follows = True


def leave_without_teardown() -> None:
    """This process leaves with ``os._exit`` after its exit functions (``tlaunch.quick_exit``):
    the exit need not wait for a snapshot to be freed, the kernel takes the pages back."""
    global _teardown_follows
    _teardown_follows = False


def wait_for_freeing() -> None:
    """Until every writer's thread has freed its snapshot and ended.

    Needed before the interpreter's teardown: torch frees a tensor without the GIL and takes
    it back for the storage's Python object; a daemon thread that takes the GIL during the
    teardown is ended with ``pthread_exit``, and that unwinding through torch's ``noexcept``
    destructors aborts the process ("terminate called without an active exception").
    """
    for writer in list(_writers):
        thread = writer._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


@atexit.register  # before any writer's flush was registered: runs after all of them
def _wait_at_exit() -> None:
    if _teardown_follows:
        wait_for_freeing()


def cpu_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are detached, contiguous CPU clones; other leaves as is.

    Walks dicts (keeping OrderedDict and other subclasses), lists and tuples (and namedtuples).
    Once it returns, the optimizer may step while the writer serializes the copy.
    """
    return _walk(obj, _copy)


def cpu_view(obj: Any) -> Any:
    """``obj`` for a save that nothing runs beside: tensors already in CPU memory, contiguous,
    as they are (detached views, no copy); others copied as :func:`cpu_snapshot` copies them.

    For a stop's last save, which training waits for and the process leaves after: the copy
    would only cost time (0.15-0.9 s for a 500 MB state here, most of it the kernel handing
    over fresh pages) and as much memory again as the state. Nothing may change the tensors
    until the save has committed.
    """
    return _walk(obj, _view)


def _copy(tensor: Any, into: Any = None) -> Any:
    import torch

    if tensor.layout is not torch.strided:  # sparse and friends: rare, take the generic path
        return tensor.detach().to("cpu", copy=True)
    if into is None:
        into = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    # One copy whatever the source: empty + copy_ also makes a strided view contiguous.
    return into.copy_(tensor.detach())


class SnapshotBuffers:
    """The CPU memory of one save's snapshot, copied into again by the next save.

    Most of a fresh snapshot's time is the kernel handing over zeroed pages, not the copy: for
    a 302 MB state here 0.11-0.14 s (0.33 s with the 2 MB pages tlaunch's workers get) against
    0.03 s into pages already mapped (``benchmarks/checkpoint.py``,
    ``benchmarks/host_memory.py``). So the tensors of a snapshot whose save has settled (its
    writer reads them no more) are taken again, by dtype and shape, by the next
    :meth:`snapshot`; tensors the state no longer has are let go.

    The price is that the memory stays taken between saves instead of going back to the
    allocator after each one: the peak is the same (a save holds the whole snapshot anyway),
    but whatever runs between two saves (an evaluation) cannot use those pages. The owner
    decides when that is worth it (:meth:`release` lets them go). Used by one thread, the
    one that snapshots.
    """

    def __init__(self) -> None:
        #: Tensors of the last snapshot, in use by its save until :meth:`recycle`.
        self._lent: list[Any] = []
        #: Tensors the snapshot being taken may copy into, by ``(dtype, shape)``.
        self._free: dict[tuple[Any, tuple[int, ...]], list[Any]] = {}

    @property
    def held_bytes(self) -> int:
        """Bytes of CPU memory these buffers keep from the allocator."""
        tensors = [*self._lent, *(t for ts in self._free.values() for t in ts)]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def recycle(self) -> None:
        """The last snapshot's save has settled: its tensors may be overwritten now."""
        for t in self._lent:
            self._free.setdefault((t.dtype, tuple(t.shape)), []).append(t)
        self._lent = []

    def release(self) -> None:
        """Keep nothing: a save in flight still holds its snapshot until it ends."""
        self._lent, self._free = [], {}

    def snapshot(self, obj: Any) -> Any:
        """:func:`cpu_snapshot` of ``obj``, into recycled tensors wherever one fits."""
        return _walk(obj, self._take)

    def settle(self) -> None:
        """The snapshot is taken: recycled tensors it did not use are let go."""
        self._free = {}

    def _take(self, tensor: Any) -> Any:
        import torch

        if tensor.layout is not torch.strided:
            return _copy(tensor)
        spare = self._free.get((tensor.dtype, tuple(tensor.shape)))
        copied = _copy(tensor, spare.pop() if spare else None)
        self._lent.append(copied)
        return copied


def _view(tensor: Any) -> Any:
    import torch

    if tensor.device.type == "cpu" and tensor.layout is torch.strided and tensor.is_contiguous():
        return tensor.detach()
    return _copy(tensor)


def _walk(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return leaf(obj)
    if isinstance(obj, dict):
        items = [(k, _walk(v, leaf)) for k, v in obj.items()]
        if type(obj) is dict:
            return dict(items)
        out = copy.copy(obj)  # keeps the subclass, e.g. a defaultdict's factory
        out.clear()
        out.update(items)
        return out
    if isinstance(obj, list):
        return [_walk(v, leaf) for v in obj]
    if isinstance(obj, tuple):
        items = [_walk(v, leaf) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class AsyncCheckpointWriter:
    """Commits snapshots in a background thread, one at a time, then applies retention."""

    def __init__(self, store: CheckpointStore, retention: RetentionPolicy | None = None) -> None:
        self.store = store
        self.retention = retention
        #: The newest step this writer committed.
        self.last_committed: CheckpointInfo | None = None
        #: Seconds each successful background save took, from serializing to a durable COMMIT
        #: (retention afterwards excluded): what a deadline margin must allow for.
        self.save_durations: list[float] = []
        self._thread: threading.Thread | None = None
        self._in_flight: int | None = None
        #: Set once the save in flight committed or failed, and its retention ran.
        self._settled = threading.Event()
        self._settled.set()
        self._error: BaseException | None = None
        self._submit_lock = threading.Lock()  # two submitting threads must not both start a save
        self._closed = False
        atexit.register(self._flush_at_exit)
        _writers.add(self)

    @property
    def in_flight(self) -> int | None:
        """The step being saved right now, or None."""
        return None if self._settled.is_set() else self._in_flight

    def submit(
        self,
        step: int,
        *,
        tensors: Mapping[str, Any] | None = None,
        objects: Mapping[str, Any] | None = None,
        rng: Mapping[int, Any] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """Start saving an already :func:`cpu_snapshot`-ed state in the background.

        Blocks while the previous save is in flight. If a previous save failed its error is
        raised here and this save is not started (submit again to retry).
        """
        if self._closed:
            raise RuntimeError("this AsyncCheckpointWriter is closed; create a new one to save")
        with self._submit_lock:
            self.check()
            self._wait(None)
            self.check()
            if self._thread is not None:
                self._thread.join()  # the previous snapshot is freed before this one is written
            kwargs = {"tensors": tensors, "objects": objects, "rng": rng, "state": state}
            self._in_flight = step
            self._settled = settled = threading.Event()
            self._thread = threading.Thread(
                target=self._save,
                args=(step, kwargs, settled),
                name=f"tlaunch-ckpt-step-{step}",
                daemon=True,  # the exit waits for the commit through the atexit flush
            )
            self._thread.start()

    def _save(self, step: int, kwargs: dict[str, Any], settled: threading.Event) -> None:
        try:
            self._commit(step, kwargs)
        finally:
            settled.set()
        # The snapshot is freed when this frame and the thread's own reference to ``kwargs``
        # go, after ``settled``: a flush does not wait for it.

    def _commit(self, step: int, kwargs: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            info = self.store.save(step, **kwargs)
        except BaseException as e:  # stored, raised in the training thread by the next call
            self._error = e
            return
        self.save_durations.append(time.perf_counter() - started)
        self.last_committed = info
        # A policy with no rule deletes nothing: no need to list the directory to find that out.
        if self.retention is not None and getattr(self.retention, "rules", True):
            try:
                self.store.apply_retention(self.retention)
            except Exception as e:  # the new step is safe; an old one lingers until next time
                log.warning(
                    "retention after step %d failed, older checkpoints kept for now: %s",
                    step,
                    one_line(e),
                )

    def _wait(self, timeout: float | None) -> None:
        """Until the save in flight is settled (committed or failed, retention done)."""
        if not self._settled.wait(timeout):
            raise TimeoutError(
                f"checkpoint save of step {self._in_flight} still running after {timeout:g} s"
            )

    def check(self) -> None:
        """Raise the error of a failed background save, once; never blocks."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the in-flight save has committed (TimeoutError after ``timeout`` s)."""
        self._wait(timeout)
        self.check()

    def close(self) -> None:
        """Flush, then refuse further saves."""
        atexit.unregister(self._flush_at_exit)
        self._closed = True
        self.flush()

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except BaseException as e:  # nobody is left to raise to
            log.error("checkpoint save failed at exit: %s", one_line(e))
