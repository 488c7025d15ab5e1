"""Print the command-line synopsis, or write it into the README between its markers.

    python -m qinspect.cli.synopsis                    # print it
    python -m qinspect.cli.synopsis --update README.md # rewrite the README's synopsis block

The README's block is generated from the argument parser (`qinspect.cli.synopsis()`), and
tests/test_cli.py fails when the two differ, so the documented options cannot drift from the real
ones: after adding or changing a command, run the second line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from qinspect.cli import synopsis

START = "<!-- synopsis:start"
END = "<!-- synopsis:end -->"


def readme_block(text: str) -> str | None:
    """The synopsis inside the README's markers (without the code fence), or None."""
    m = re.search(re.escape(START) + r"[^\n]*\n```\n(.*?)```\n" + re.escape(END), text, re.S)
    return m.group(1) if m else None


def update(text: str) -> str:
    m = re.search(re.escape(START) + r"[^\n]*\n```\n(.*?)```\n" + re.escape(END), text, re.S)
    if m is None:
        raise SystemExit("no synopsis markers in the README")
    return text[: m.start(1)] + synopsis() + text[m.end(1) :]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m qinspect.cli.synopsis")
    ap.add_argument("--update", metavar="README", help="rewrite the synopsis block of this file")
    args = ap.parse_args()
    if args.update:
        path = Path(args.update)
        path.write_text(update(path.read_text()))
    else:
        sys.stdout.write(synopsis())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
