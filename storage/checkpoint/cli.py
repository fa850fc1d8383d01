"""``tlaunch ckpt``: inspect checkpoints without starting a run.

Usage::

    tlaunch ckpt ls URL                  # step, commit time, size, status, metrics
    tlaunch ckpt verify URL [--step N]   # every byte against MANIFEST; exit 1 if any step is bad

URL is anything ``--checkpoint-dir`` accepts: a path, ``gs://``, ``s3://``, ``drive://``,
``memory://``. Both commands only read: a bad step is reported, never quarantined or deleted
(the next run does that when it meets it).

Status in ``ls``: ``ok`` committed and every file has its MANIFEST size (``verify`` checks the
bytes); ``BAD`` committed but damaged; ``quarantined`` found bad by a run and skipped since;
``uncommitted`` a save that never finished (the next run's start removes it).

Exit codes: 0 fine; 1 a bad step or a storage error (one ``tlaunch: error:`` line); 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time

from tlaunch.storage.store import StorageError, StorageUnavailable, redact

#: Storage unreachable after retries: nothing was changed, run again later (sysexits'
#: EX_UNAVAILABLE; the launcher's contract, launch/contract.py, uses the same code).
EXIT_UNAVAILABLE = 69


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlaunch ckpt",
        description="Inspect checkpoints: list them, or verify their bytes against MANIFEST.",
        epilog="Exit codes: 0 fine, 1 bad checkpoint or storage error, 2 usage error.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="ls|verify")
    ls = commands.add_parser("ls", help="list steps: time, size, status, metrics")
    ls.add_argument("url", metavar="URL", help="checkpoint directory (path, gs://, s3://, ...)")
    verify = commands.add_parser("verify", help="check every byte of committed steps (sha256)")
    verify.add_argument("url", metavar="URL", help="checkpoint directory (path, gs://, s3://, ...)")
    verify.add_argument("--step", type=int, metavar="N", help="verify only step N")
    return parser


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds)) if seconds else "-"


def _metrics(metrics: dict) -> str:
    parts = []
    for key, value in sorted(metrics.items()):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _ls(store) -> int:
    infos = store.all_steps()
    if not infos:
        print(f"no checkpoints at {redact(store.url)}")
        return 0
    problems = store.verify(full=False)
    rows = [("STEP", "COMMITTED (UTC)", "SIZE", "STATUS", "METRICS")]
    for info in infos:
        if info.quarantined:
            status = "quarantined"
        elif not info.committed:
            status = "uncommitted"
        else:
            status = "BAD" if problems.get(info.step) else "ok"
        size = _size(info.size) if info.committed else "-"
        rows.append((str(info.step), _when(info.time), size, status, _metrics(info.metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
        )
    return 0


def _verify(store, step: int | None) -> int:
    results = store.verify(step, full=True)
    if not results:
        raise StorageError(f"no committed checkpoints at {redact(store.url)}")
    quarantined = {i.step for i in store.all_steps() if i.quarantined}
    bad = 0
    for number, problems in results.items():
        note = " (quarantined)" if number in quarantined else ""
        if problems:
            bad += 1
            print(f"step {number}: BAD{note}: {'; '.join(problems)}")
        else:
            print(f"step {number}: ok{note}")
    print(f"{len(results) - bad} of {len(results)} checkpoints verify")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    """Run ``tlaunch ckpt`` with ``argv`` (the words after ``ckpt``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors and 0 for --help
        return int(e.code or 0)
    from tlaunch.storage.checkpoint.store import CheckpointStore  # keeps `tlaunch --help` light

    try:
        store = CheckpointStore(args.url)
        return _ls(store) if args.command == "ls" else _verify(store, args.step)
    except StorageUnavailable as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StorageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return 1
