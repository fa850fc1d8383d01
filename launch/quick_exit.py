"""Leave a process without the interpreter's teardown, once nothing needs it.

After a stop's checkpoint is committed and reported, a worker still spends seconds in Python's
finalization before the launcher sees it exit: modules torn down one by one, every tensor of the
model and optimizer freed (measured here: 8.6 s against 1.0 s for a 500 MB state on a loaded
2-core machine). None of that keeps anything, and on a preempted VM those seconds come out of
the notice.

What still runs, in this order: the script's ``finally`` blocks and ``with`` exits (the stop
leaves the script as ``SystemExit``), every ``atexit`` function (the script's own,
``logging.shutdown``, ``weakref.finalize(..., atexit=True)``), then :func:`at_exit` flushes
every open Python file object (what finalization would have done for files the script never
closed) and the standard streams, and ends the process with :func:`os._exit`. What does not:
``__del__`` methods of objects still alive at exit, which Python never promises to call. A
script that needs something done at exit registers it with :func:`atexit.register`.

Finding the open files means looking at every object the collector tracks: ~3*10^5 in a torch
process, 0.1-0.4 s. :func:`prepare`, called as a stop begins, does most of that while the stop's
checkpoint is written: it lists the objects alive then, freezes them (``gc.freeze``: the collector
leaves them alone from then on, nothing else changes), and picks out the files among them in a
background thread. :func:`at_exit` then looks only at the objects made since (the collector's
generations hold nothing else) and at the files found before that are still open.

:func:`install` registers :func:`at_exit` in the workers' ``sitecustomize``, before anything
else, so that it runs after every other exit function; :func:`arm` is called by the stop path.
When the process leaves the usual way after all (the script raised after the stop, or the stop
failed), :func:`at_exit` unfreezes the objects first: garbage in reference cycles among them
is then collected, and its files closed, by the interpreter's teardown as always. No torch.
"""

from __future__ import annotations

import _io
import atexit
import gc
import os
import sys
import threading
import weakref

_code: int | None = None
_scan_files = True
#: Files open when :func:`prepare` ran (weak references), once its thread has found them.
_found: list[weakref.ref] = []
_finding: threading.Thread | None = None
_installed = False
#: (this process's pid, the launcher's notice pipe or socket name) when the launcher gave one.
_notice: tuple[int, int | str] | None = None


def install() -> None:
    """Register :func:`at_exit`; first of the exit functions, so that it runs last. Takes the
    launcher's notice pipe (``TLAUNCH_EXIT_FD``) or socket (``TLAUNCH_EXIT_SOCKET``) out of the
    environment the script sees."""
    global _installed, _notice
    from tlaunch.contract import EXIT_FD_ENV, EXIT_SOCKET_ENV

    atexit.register(at_exit)
    _installed = True
    fd = os.environ.pop(EXIT_FD_ENV, "")
    name = os.environ.pop(EXIT_SOCKET_ENV, "")
    if name:
        _notice = (os.getpid(), name)
    if fd.isdigit():
        _notice = (os.getpid(), int(fd))
        try:
            os.set_inheritable(int(fd), False)  # not for the programs the script starts
        except OSError:
            _notice = None


def prepare() -> None:
    """A stop begins: list the objects alive now and freeze them, then find the open files
    among them in a background thread (see the module's docstring). Once per process, and only
    where :func:`install` registered the exit that looks at them."""
    global _finding
    if _finding is not None or not _installed:
        return
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e3)  # no other thread makes an object between the list and the freeze
    try:
        objects = gc.get_objects()
        gc.freeze()
    finally:
        sys.setswitchinterval(interval)
    _finding = threading.Thread(
        target=_find_files, args=(objects,), name="tlaunch-find-files", daemon=True
    )
    _finding.start()


def _find_files(objects: list) -> None:
    _found.extend(weakref.ref(o) for o in _open_files(objects))


def arm(code: int, *, scan_files: bool = True) -> None:
    """Leave with ``code`` at exit, right after the exit functions, unless an uncaught
    exception ends the process first (then it exits as it would have). ``scan_files=False``:
    the process runs no user code and closes its own files (the launcher)."""
    global _code, _scan_files
    _code, _scan_files = code, scan_files
    _skip_torch_library_finalizers()
    writer = _checkpoint_writer()
    if writer is not None:  # its threads may free their snapshots while the process leaves
        writer.leave_without_teardown()


def _checkpoint_writer():
    """tlaunch's checkpoint writer module if this process imported it (never imports it)."""
    return sys.modules.get("tlaunch.storage.checkpoint.writer")


def _skip_torch_library_finalizers() -> None:
    """torch registers a ``weakref.finalize`` per operator library that unregisters its
    operators from the dispatcher at exit (thousands of them: 20-50 ms): nothing anyone keeps."""
    registry = getattr(weakref.finalize, "_registry", {})  # CPython's; elsewhere none skipped
    for finalizer, info in list(registry.items()):
        func = getattr(info, "func", None)
        if getattr(func, "__module__", "") == "torch.library" and func.__name__ == "_del_library":
            finalizer.atexit = False


def at_exit() -> None:
    raised = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if _code is None or raised is not None:  # the script raised after the stop, or no stop:
        if _finding is not None:  # Python reports it and exits its way, frozen objects included
            _finding.join()  # its list holds every object: none would be finalized
            gc.unfreeze()
        writer = _checkpoint_writer()
        if writer is not None and _code is not None:  # the teardown follows after all
            writer.wait_for_freeing()
        return
    if _scan_files:
        _flush_open_files()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _tell_launcher(_code)
    os._exit(_code)


def _tell_launcher(code: int) -> None:
    """This process has run its last line: the launcher may stop waiting for it. What remains
    is the kernel's, giving back its memory (0.3 s and more for a 500 MB state: every page of
    the model, the optimizer and the snapshot), which the launcher's own exit need not follow."""
    if _notice is None or _notice[0] != os.getpid():  # none, or this is a forked child
        return
    told = bytes([code & 0xFF])
    try:
        if isinstance(_notice[1], int):
            os.write(_notice[1], told)
        else:
            import socket

            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(told, "\0" + _notice[1])  # the kernel adds who sent it
    except OSError:  # the launcher is gone or does not listen: it waits for the exit
        pass


def _flush_open_files() -> None:
    """Flush every buffered file object still open (text wrappers first: they feed their
    buffers): those :func:`prepare` found, and those among the objects made since (all of them
    when it did not run)."""
    if _finding is not None:
        _finding.join()
    found = [f for f in (ref() for ref in _found) if f is not None]
    found += _open_files(gc.get_objects())  # frozen objects excluded: only the newer ones
    text = _with_subclasses(_io.TextIOWrapper)
    found.sort(key=lambda o: type(o) not in text)
    for obj in found:
        try:
            if not obj.closed and obj.writable():
                obj.flush()
        except Exception:  # a broken pipe, a file closed underneath: nothing to keep there
            pass


def _open_files(objects: list) -> list:
    """The buffered file objects among ``objects``, by exact type in the set of the file
    classes and their subclasses: one set lookup each, where an ``issubclass`` call each (or
    an ABC check) costs several times more."""
    kinds = (
        _with_subclasses(_io.TextIOWrapper)
        | _with_subclasses(_io.BufferedWriter)
        | _with_subclasses(_io.BufferedRandom)
    )
    # type(), not isinstance(): isinstance also asks __class__, which some objects answer
    # with a warning (torch's deprecated reduce_op).
    return [o for o in objects if type(o) in kinds]


def _with_subclasses(cls: type) -> set[type]:
    found, todo = set(), [cls]
    while todo:
        kind = todo.pop()
        if kind not in found:
            found.add(kind)
            todo.extend(kind.__subclasses__())
    return found
