"""``--sync-dir LOCAL=URL``: keep a script's own output folder alive across machines.

Before the script starts, LOCAL is restored from URL; while it runs, new and changed files
that have settled are uploaded every few seconds; on exit and on a stop trigger, what is left
is flushed -- except, after a stop or a failure, files changed in the last interval before the
script ended, which it may have been killed in the middle of writing (see
:mod:`tlaunch.storage.mirror`): those are left behind and reported, and the URL keeps its
previous copy. A script that knows nothing of tlaunch (``accelerator.save_state("ckpts")``)
thereby survives preemption: run it again on a fresh machine and its folder is back.
"""

from __future__ import annotations

import threading

from tlaunch.storage import FolderMirror

INTERVAL_SECONDS = 2.0
_NAMED = 5  # left-behind files named in the log line


class SyncDirs:
    def __init__(self, specs: list[str], log) -> None:
        self.mirrors = [
            FolderMirror(*spec.split("=", 1), settle=INTERVAL_SECONDS) for spec in specs
        ]
        self._log = log
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tlaunch-sync-dir", daemon=True)

    def restore(self) -> None:
        for m in self.mirrors:
            n = m.restore()
            if n:
                self._log(f"restored {n} file(s) into {m.local} from {m.url}")

    def start(self) -> SyncDirs:
        if self.mirrors:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_SECONDS):
            with self._lock:
                for m in self.mirrors:
                    try:
                        m.sync()
                    except Exception as e:  # keep mirroring; the final flush reports for real
                        self._log(f"sync of {m.local} to {m.url} failed, will retry: {e}")

    def flush(self, complete: bool = False) -> bool:
        """Stop mirroring and upload what is whole. True when every folder is now mirrored.

        ``complete``: the script exited 0 on its own, so every file it wrote is whole. Without
        it (a stop, a failure) a file changed in the last interval may be half-written: it is
        left behind and reported, and the result is False, so a stop does not claim that
        everything was kept.
        """
        self._stop.set()
        ok = bool(self.mirrors)
        with self._lock:
            for m in self.mirrors:
                try:
                    up, gone = m.flush(complete=complete)
                except Exception as e:
                    self._log(f"final flush of {m.local} to {m.url} failed: {e}")
                    ok = False
                    continue
                self._log(f"flushed {m.local} to {m.url} ({up} file(s) uploaded, {gone} deleted)")
                if m.left_behind:
                    ok = False
                    self._log(_left_behind(m))
        return ok


def _left_behind(m: FolderMirror) -> str:
    names = ", ".join(m.left_behind[:_NAMED])
    more = f" and {len(m.left_behind) - _NAMED} more" if len(m.left_behind) > _NAMED else ""
    return (
        f"left behind in {m.local}: {names}{more}, changed in the last {INTERVAL_SECONDS:g} s "
        f"before the script ended, so possibly half-written; {m.url} keeps the copy it had"
    )
