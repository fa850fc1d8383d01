"""``tlaunch``: run a training script on whatever hardware is here, and resume it after preemption.

Usage::

    tlaunch train.py [script args]            # all GPUs if any, else one CPU process
    tlaunch train.py --cpus 2 --lr 3e-4       # 2 CPU processes over gloo; --lr goes to the script
    tlaunch --gpus 4 -m mypkg.train -- --gpus 9   # after --, everything goes to the script
    tlaunch data pack|fetch|ls ...            # packed data archives
    tlaunch ckpt ls|verify URL                # inspect checkpoints
    tlaunch doctor train.py [args] [flags]    # a few instrumented steps: the bugs they show
    tlaunch env                               # versions, platform, devices for a bug report

Launcher flags may stand before or after the script; flags tlaunch does not know pass through
to the script. Every flag also reads ``TLAUNCH_<FLAG>`` (``TLAUNCH_CPUS=2``), so notebooks and
VM startup scripts can set defaults.

Exit codes: 0 done; 2 usage error (nothing started); 75 preempted after a committed save (run
the same command again to resume); any other value: the script failed, with its own code.

This module must not import torch: ``tlaunch --help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import NoReturn

from tlaunch import __version__
from tlaunch.config import POSITIONAL, LaunchConfig, UsageError, cli_flag, field_kind
from tlaunch.contract import EXIT_USAGE, flag_env

#: 128 + SIGPIPE: what a tool killed by the closed pipe reports (``set -o pipefail`` sees it).
EXIT_BROKEN_PIPE = 141

SUBCOMMANDS = ("data", "ckpt")
#: Subcommands of the launch layer itself: name → module whose ``main(argv)`` runs it.
LAUNCH_SUBCOMMANDS = {"doctor": "tlaunch.doctor.command", "env": "tlaunch.envreport"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (bad int, unknown choice) are one-line UsageErrors, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _metavar(name: str, kind: type) -> str:
    return "N" if kind is int else name.split("_")[-1].upper()


def build_parser() -> argparse.ArgumentParser:
    """The launcher's flags, generated from ``LaunchConfig`` so help and config never drift."""
    parser = _Parser(
        prog="tlaunch",
        usage="tlaunch [flags] SCRIPT|-m MODULE [script args] [-- verbatim script args]\n"
        "       tlaunch data|ckpt|doctor|env ...",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 2 usage error, 75 preempted with a committed save "
        "(re-run the same command to resume), else the script's own code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tlaunch {__version__}")
    for f in dataclasses.fields(LaunchConfig):
        if f.name in POSITIONAL:
            continue
        meta, kind = f.metadata, field_kind(f)
        flag, help_text = cli_flag(f.name), f"{meta['help']} [env {flag_env(f.name)}]"
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, action="append", metavar="SPEC", help=help_text)
        else:
            parser.add_argument(
                flag,
                type=kind if kind in (int, float) else str,
                nargs=None if meta["const"] is None else "?",
                const=meta["const"],
                choices=meta["choices"] or None,
                metavar=None if meta["choices"] else _metavar(f.name, kind),
                help=help_text,
            )
    return parser


def _takes_value(parser: argparse.ArgumentParser, word: str) -> bool:
    action = parser._option_string_actions.get(word.split("=", 1)[0])
    return (
        action is not None
        and "=" not in word
        and action.nargs is None
        and action.const is None
        and not isinstance(
            action, (argparse._StoreTrueAction, argparse._VersionAction, argparse._HelpAction)
        )
    )


def _find_script(parser: argparse.ArgumentParser, words: list[str]) -> int | None:
    """Index of the script (or of ``-m``) in ``words``, skipping values of launcher flags."""
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-m":
            return i
        if word.startswith("-"):
            i += 2 if _takes_value(parser, word) else 1
            continue
        if os.path.isfile(word) or word.endswith(".py"):
            return i
        raise UsageError(
            f"{word!r} is neither a launcher flag nor a script; run: tlaunch [flags] train.py [args]"
        )
    return None


def parse_args(argv: list[str]) -> LaunchConfig:
    """Command line (+ ``TLAUNCH_*`` environment) → one validated ``LaunchConfig``."""
    parser = build_parser()
    head, verbatim = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    at = _find_script(parser, head)
    if at is None:
        parser.parse_args(head)  # handles --help/--version; otherwise falls through
        raise UsageError(
            "no script given; run: tlaunch [flags] train.py [args] (or -m package.module)"
        )
    before, target, after = head[:at], head[at], head[at + 1 :]
    module = None
    if target == "-m":
        if not after:
            raise UsageError("-m needs a module name; run: tlaunch -m package.train [args]")
        module, target, after = after[0], None, after[1:]
    ns = parser.parse_args(before)
    ns_after, passthrough = parser.parse_known_args(after)
    values = LaunchConfig.env_defaults()
    for ns_part in (ns, ns_after):
        values.update({k: v for k, v in vars(ns_part).items() if v is not None})
    if target is not None and not os.path.isfile(target):
        raise UsageError(f"script {target!r} does not exist; check the path (cwd is {os.getcwd()})")
    return LaunchConfig(script=target, module=module, script_args=passthrough + verbatim, **values)


def _subcommand(name: str, argv: list[str]) -> int:
    from tlaunch import storage

    try:
        code = (storage.data_main if name == "data" else storage.ckpt_main)(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # `tlaunch ckpt ls URL | head`: the reader left; so do we, quietly, as `ls | head`
        # does. Point stdout at /dev/null so the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    if argv and argv[0] in LAUNCH_SUBCOMMANDS:
        import importlib

        return importlib.import_module(LAUNCH_SUBCOMMANDS[argv[0]]).main(argv[1:])
    try:
        config = parse_args(argv)
    except UsageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from tlaunch.launcher import launch

    return launch(config)


def program() -> NoReturn:
    """The ``tlaunch`` program (its console script and ``python -m tlaunch``): :func:`main`,
    then leave without the interpreter's teardown. The exit code is decided and every record
    written by then; a launcher that ran torch's elastic agent has imported torch, whose
    teardown would add a second or more between a stop's commit and the exit a preempted VM's
    shutdown waits for. Exit functions still run and open files are flushed
    (:mod:`tlaunch.quick_exit`)."""
    import atexit

    from tlaunch.quick_exit import arm, at_exit

    atexit.register(at_exit)  # before anything the program registers: so it runs last
    code = main()
    arm(code, scan_files=False)  # tlaunch's own files are closed: no scan of the heap
    raise SystemExit(code)


if __name__ == "__main__":
    program()
