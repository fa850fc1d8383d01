"""``tlaunch``: run a training script on whatever hardware is here, and resume it after preemption.

Usage::

    tlaunch train.py [script args]            # all GPUs if any, else one CPU process
    tlaunch train.py --cpus 2 --lr 3e-4       # 2 CPU processes over gloo; --lr goes to the script
    tlaunch --gpus 4 -m mypkg.train -- --gpus 9   # after --, everything goes to the script
    tlaunch data pack|fetch|ls ...            # packed data archives
    tlaunch ckpt ls|verify URL                # inspect checkpoints

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
from typing import Any, get_args, get_origin, get_type_hints

from tlaunch import __version__
from tlaunch.config import LaunchConfig, UsageError
from tlaunch.contract import EXIT_USAGE, flag_env

SUBCOMMANDS = ("data", "ckpt")

# Fields the parser fills from positional words, not from flags.
_POSITIONAL = ("script", "module", "script_args")


def _field_type(f: dataclasses.Field) -> type:
    """``int | None`` → ``int``; ``list[str]`` → ``list``."""
    hint = get_type_hints(LaunchConfig)[f.name]
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if args and get_origin(hint) is not list else hint
    return get_origin(base) or base


def build_parser() -> argparse.ArgumentParser:
    """The launcher's flags, generated from ``LaunchConfig`` so help and config never drift."""
    parser = argparse.ArgumentParser(
        prog="tlaunch",
        usage="tlaunch [flags] SCRIPT|-m MODULE [script args] [-- verbatim script args]\n"
        "       tlaunch data|ckpt ...",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 2 usage error, 75 preempted with a committed save "
        "(re-run the same command to resume), else the script's own code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tlaunch {__version__}")
    for f in dataclasses.fields(LaunchConfig):
        if f.name in _POSITIONAL:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = flag_env(f.name)
        help_text = f"{f.metadata['help']} [env {env}]"
        kind = _field_type(f)
        if f.name == "fast_dev_run":
            parser.add_argument(flag, type=int, nargs="?", const=1, metavar="N", help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, action="append", metavar="SPEC", help=help_text)
        else:
            parser.add_argument(
                flag,
                type=kind if kind in (int, float) else str,
                metavar=f.name.split("_")[-1].upper(),
                help=help_text,
            )
    return parser


def _env_defaults() -> dict[str, Any]:
    """``TLAUNCH_<FLAG>`` values, converted to each field's type.

    What to run (script, module, its arguments) always comes from the command line, never from
    a variable: a stale ``TLAUNCH_MODULE`` must not replace the script the user typed.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(LaunchConfig):
        raw = os.environ.get(flag_env(f.name))
        if raw is None or f.name in _POSITIONAL:
            continue
        kind = _field_type(f)
        try:
            if kind is bool:
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind is list:
                values[f.name] = [v for v in raw.split(",") if v]
            elif kind in (int, float):
                values[f.name] = kind(raw)
            else:
                values[f.name] = raw
        except ValueError:
            raise UsageError(f"{flag_env(f.name)}={raw!r} is not a valid {kind.__name__}") from None
    return values


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
    values = _env_defaults()
    for ns_part in (ns, ns_after):
        values.update({k: v for k, v in vars(ns_part).items() if v is not None})
    if target is not None and not os.path.isfile(target):
        raise UsageError(f"script {target!r} does not exist; check the path (cwd is {os.getcwd()})")
    return LaunchConfig(script=target, module=module, script_args=passthrough + verbatim, **values)


def _subcommand(name: str, argv: list[str]) -> int:
    from tlaunch import storage

    return (storage.data_main if name == "data" else storage.ckpt_main)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    try:
        config = parse_args(argv)
    except UsageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from tlaunch.launcher import launch

    return launch(config)


if __name__ == "__main__":
    raise SystemExit(main())
