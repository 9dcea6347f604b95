"""`mmdl-node label FILE.jsonl`: label report texts with the rule-based CheXpert-style labeler.

Input: one JSON object a line, ``{"id": ..., "text": ...}`` (``-`` reads standard input; blank
lines are skipped). Output on standard output: one line per good input line,
``{"id": ..., "labels": {"<observation>": 1 | 0 | -1 | null}}`` (raw labels: 1 positive, 0
negative, -1 uncertain, null not mentioned). With ``--policy u-zero|u-ones|u-ignore`` the labels
are the training targets of that policy instead (0/1, and -1 kept under u-ignore; no null).

A bad line (not JSON, not an object, no string ``text``) is reported on standard error with its
line number and skipped; labelling goes on, and the exit status is 1 when any line was bad (0
otherwise), so one broken line does not throw away a large file but never passes silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

from models.errors import ModelError
from models.labeler import Policy, apply_policy, label_report
from models.observations import OBSERVATIONS

RAW = "raw"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmdl-node label`."""
    parser.add_argument("file", help="JSON Lines file of {\"id\": ..., \"text\": ...} objects; - for stdin")
    parser.add_argument(
        "--policy",
        choices=[RAW, *(p.value for p in Policy)],
        default=RAW,
        help="raw: 1/0/-1/null (default); or the training targets under an uncertainty policy",
    )


def _parse(line: str, number: int) -> tuple[Any, str]:
    """The id and text of one input line; ModelError naming the line number when malformed."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ModelError(f"line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise ModelError(f"line {number}: expected a JSON object, got {type(item).__name__}")
    if not isinstance(item.get("text"), str):
        raise ModelError(f"line {number}: field 'text' must be a string")
    return item.get("id"), item["text"]


def label_lines(lines: Iterable[str], policy: str, out: IO[str], err: IO[str]) -> int:
    """Label every line; write results to ``out`` and problems to ``err``; return the bad-line count."""
    bad = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ident, text = _parse(line, number)
        except ModelError as exc:
            print(f"mmdl-node label: {exc}", file=err)
            bad += 1
            continue
        raw = label_report(text)
        values: Sequence[int | None] = raw if policy == RAW else apply_policy(raw, policy)
        print(json.dumps({"id": ident, "labels": dict(zip(OBSERVATIONS, values))}), file=out)
    return bad


def run(args: argparse.Namespace) -> int:
    """Run `mmdl-node label`: 0 when every line was labelled, 1 when some were bad, 2 when unreadable."""
    try:
        if args.file == "-":
            bad = label_lines(sys.stdin, args.policy, sys.stdout, sys.stderr)
        else:
            with open(args.file, encoding="utf-8") as handle:
                bad = label_lines(handle, args.policy, sys.stdout, sys.stderr)
    except OSError as exc:
        print(f"mmdl-node label: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"mmdl-node label: {args.file} is not UTF-8 text", file=sys.stderr)
        return 2
    if bad:
        print(f"mmdl-node label: {bad} bad line(s) skipped", file=sys.stderr)
    return 1 if bad else 0

