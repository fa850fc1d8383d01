"""``tlaunch ckpt``: inspect checkpoints without starting a run.

Usage::

    tlaunch ckpt ls URL                        # step, commit time, size, status, best/last, metrics;
                                               # the run's goodput so far (goodput.jsonl)
    tlaunch ckpt verify URL [--step STEP]      # every byte against MANIFEST; exit 1 if any is bad
    tlaunch ckpt export URL [--step STEP] OUT  # one model's weights as OUT (.safetensors)

URL is anything ``--checkpoint-dir`` accepts: a path, ``gs://``, ``s3://``, ``drive://``,
``memory://``. STEP is a step number, ``last`` (the newest committed step; export's default) or
``best`` (by ``--monitor``/``--mode``, by default the ones the run recorded). Every command only
reads the checkpoints: a bad step is reported, never quarantined or deleted (the next run does
that when it meets it). ``export`` writes OUT only from verified bytes, under the plain
module's names (no ``module.`` or ``_orig_mod.``), whole or not at all; ``--model K`` picks one
of several prepared models (:mod:`tlaunch.storage.checkpoint.export`).

Status in ``ls``: ``ok`` committed and every file has its MANIFEST size (``verify`` checks the
bytes); ``BAD`` committed but damaged; ``quarantined`` found bad by a run and skipped since;
``uncommitted`` a save that never finished (the next run's start removes it). Tag: ``last``,
``best``, or both.

Exit codes: 0 fine; 1 a bad step or a storage error (one ``tlaunch: error:`` line); 2 usage.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from tlaunch.storage.store import StorageError, StorageUnavailable, redact

#: Storage unreachable after retries: nothing was changed, run again later (sysexits'
#: EX_UNAVAILABLE; the launcher's contract, launch/contract.py, uses the same code).
EXIT_UNAVAILABLE = 69


def _step(text: str) -> int | str:
    from tlaunch.storage.checkpoint.export import parse_step

    try:
        return parse_step(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model(text: str) -> int | str:
    return int(text) if re.fullmatch("[0-9]+", text) else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlaunch ckpt",
        description="Inspect checkpoints: list them, verify their bytes against MANIFEST, "
        "export a model's weights.",
        epilog="STEP: a number, last or best. "
        "Exit codes: 0 fine, 1 bad checkpoint or storage error, 2 usage error.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="ls|verify|export")
    url_help = "checkpoint directory (path, gs://, s3://, ...)"
    ls = commands.add_parser("ls", help="list steps: time, size, status, best/last, metrics")
    ls.add_argument("url", metavar="URL", help=url_help)
    verify = commands.add_parser("verify", help="check every byte of committed steps (sha256)")
    verify.add_argument("url", metavar="URL", help=url_help)
    verify.add_argument("--step", type=_step, metavar="STEP", help="verify only this step")
    export = commands.add_parser(
        "export", help="write one model's weights as a .safetensors file (read-only)"
    )
    export.add_argument("url", metavar="URL", help=url_help)
    export.add_argument("out", metavar="OUT", help="file to write, e.g. model.safetensors")
    export.add_argument(
        "--step", type=_step, default="last", metavar="STEP", help="which step (default: last)"
    )
    export.add_argument(
        "--model", type=_model, metavar="K", help="which prepared model: 0, 1, ... (or its name)"
    )
    for command in (ls, verify, export):
        command.add_argument("--monitor", metavar="METRIC", help="the metric that ranks best")
        command.add_argument(
            "--mode", choices=("min", "max"), help="min or max: which values are best"
        )
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


def _tags(store, infos, monitor: str | None, mode: str | None) -> dict[int, str]:
    """``last`` on the newest committed step, ``best`` on the best one, when that can be told."""
    from tlaunch.storage.checkpoint.export import best_of
    from tlaunch.storage.checkpoint.manifest import CheckpointError

    usable = [i for i in infos if i.committed and not i.quarantined]
    if not usable:
        return {}
    try:
        best = best_of(store, usable, monitor=monitor, mode=mode).step
    except CheckpointError:  # no metric to rank by, or a damaged record: no best to show
        best = None
    last = usable[-1].step
    tags = {last: "last"}
    if best is not None:
        tags[best] = "best,last" if best == last else "best"
    return tags


def _ls(store, monitor: str | None, mode: str | None) -> int:
    infos = store.all_steps()
    if not infos:
        print(f"no checkpoints at {redact(store.url)}")
        return 0
    problems = store.verify(full=False)
    tags = _tags(store, infos, monitor, mode)
    rows = [("STEP", "COMMITTED (UTC)", "SIZE", "STATUS", "TAG", "METRICS")]
    for info in infos:
        if info.quarantined:
            status = "quarantined"
        elif not info.committed:
            status = "uncommitted"
        else:
            status = "BAD" if problems.get(info.step) else "ok"
        size = _size(info.size) if info.committed else "-"
        tag = tags.get(info.step, "")
        rows.append((str(info.step), _when(info.time), size, status, tag, _metrics(info.metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True))
        print(f"{cells}  {row[5]}".rstrip())
    _goodput(store.url)
    return 0


def _goodput(url: str) -> None:
    """The run's goodput so far, from the records its launches left beside the checkpoints
    (only a checkpoint directory on this machine's file system has them)."""
    from tlaunch.storage.checkpoint.goodput import read_goodput
    from tlaunch.storage.store import local_path

    directory = local_path(url)
    if directory is None:
        return
    for line in read_goodput(directory).lines():
        print(line)


def _verify(store, step: int | str | None, monitor: str | None, mode: str | None) -> int:
    if isinstance(step, str):
        from tlaunch.storage.checkpoint.export import resolve_step

        step = resolve_step(store, step, monitor=monitor, mode=mode).step
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


def _export(store, args: argparse.Namespace) -> int:
    from tlaunch.storage.checkpoint.export import read_weights, write_weights

    weights = read_weights(store, args.step, model=args.model, monitor=args.monitor, mode=args.mode)
    size = write_weights(weights, args.out)
    print(
        f"exported step {weights.step} ({weights.name}: {len(weights.tensors)} tensors, "
        f"{_size(size)}) from {redact(store.url)} to {redact(args.out)}"
    )
    return 0


def main(argv: list[str]) -> int:
    """Run ``tlaunch ckpt`` with ``argv`` (the words after ``ckpt``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors and 0 for --help
        return int(e.code or 0)
    from tlaunch.storage.checkpoint.store import CheckpointStore  # keeps `tlaunch --help` light

    try:
        store = CheckpointStore(args.url)
        if args.command == "ls":
            return _ls(store, args.monitor, args.mode)
        if args.command == "verify":
            return _verify(store, args.step, args.monitor, args.mode)
        return _export(store, args)
    except StorageUnavailable as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StorageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return 1
