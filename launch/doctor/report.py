"""The doctor's output: a table of findings then a verdict, or the same as JSON."""

from __future__ import annotations

import json
import textwrap

from tlaunch.doctor.findings import ERROR, WARN, Diagnosis

ID_WIDTH, LEVEL_WIDTH, WIDTH = 22, 6, 100
INDENT = " " * (ID_WIDTH + LEVEL_WIDTH + 2)


def verdict(diagnosis: Diagnosis) -> str:
    errors = sum(f.severity == ERROR for f in diagnosis.findings)
    warnings = sum(f.severity == WARN for f in diagnosis.findings)
    if errors:
        return (
            f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}: "
            "fix the errors before a long run (exit 1)"
        )
    if warnings:
        return f"no errors, {warnings} warning{'s' * (warnings != 1)}: the run is sound (exit 0)"
    return "nothing wrong found (exit 0)"


def _wrap(text: str, first: str) -> list[str]:
    lines = textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first,
        subsequent_indent=INDENT + " " * (len(first) - len(INDENT)),
    )
    return lines or [first.rstrip()]


def table(diagnosis: Diagnosis, heading: str) -> str:
    lines = [heading, "", f"{'ID':<{ID_WIDTH}} {'LEVEL':<{LEVEL_WIDTH}} WHAT WAS SEEN"]
    for f in diagnosis.findings:
        lines += _wrap(f.seen, f"{f.id:<{ID_WIDTH}} {f.severity:<{LEVEL_WIDTH}} ")
        lines += _wrap(f.why, INDENT + "why: ")
        code = f.fix.splitlines()
        lines.append(INDENT + "fix: " + code[0])
        lines += [INDENT + "     " + line for line in code[1:]]
    if not diagnosis.findings:
        lines.append("(no findings)")
    if diagnosis.skipped:
        lines.append("")
        lines.append("not checked:")
        lines += [f"  {name}: {why}" for name, why in diagnosis.skipped.items()]
    lines += ["", f"verdict: {verdict(diagnosis)}"]
    return "\n".join(lines)


def as_json(diagnosis: Diagnosis, run: dict) -> str:
    return json.dumps(
        {
            "run": run,
            "findings": [f.as_dict() for f in diagnosis.findings],
            "not_checked": diagnosis.skipped,
            "verdict": verdict(diagnosis),
            "exit_code": 1 if diagnosis.failed else 0,
        },
        indent=2,
    )
