"""``--sync-dir LOCAL=URL``: keep a script's own output folder alive across machines.

Before the script starts, LOCAL is restored from URL; while it runs, new and changed files
that have settled are uploaded every few seconds; on exit and on a stop trigger, everything
left is flushed. A script that knows nothing of tlaunch (``accelerator.save_state("ckpts")``)
thereby survives preemption: run it again on a fresh machine and its folder is back.
"""

from __future__ import annotations

import threading

from tlaunch.storage import FolderMirror

INTERVAL_SECONDS = 2.0


class SyncDirs:
    def __init__(self, specs: list[str], log) -> None:
        self.mirrors = [FolderMirror(*spec.split("=", 1)) for spec in specs]
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

    def flush(self) -> bool:
        """Stop mirroring and upload everything left. True when every folder is now mirrored."""
        self._stop.set()
        ok = bool(self.mirrors)
        with self._lock:
            for m in self.mirrors:
                try:
                    up, gone = m.sync(final=True)
                    self._log(
                        f"flushed {m.local} to {m.url} ({up} file(s) uploaded, {gone} deleted)"
                    )
                except Exception as e:
                    self._log(f"final flush of {m.local} to {m.url} failed: {e}")
                    ok = False
        return ok
