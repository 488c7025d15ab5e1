"""The metacharacter test of printed fix commands, shared by the tests of every rule that prints one:
a file name full of shell syntax, and the check that a command built from it is safe to paste."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

NASTY_NAME = "a b$(touch PWNED);c'd\"`touch PWNED2`[bold red]-rf *&|<x>.qcow2"


def assert_pasteable(cmd: str, cwd: Path) -> None:
    """`cmd` parses under `bash -n` and, run through printf by bash in `cwd`, gives back exactly the
    words shlex splits it into (so pasting it runs that argv and nothing else)."""
    # (A fix may be an option fragment for QEMU's command line, "-drive ...": parsed after printf.)
    echo = "printf '%s\\0' " + cmd
    assert subprocess.run(["bash", "-n", "-c", echo], cwd=cwd, capture_output=True).returncode == 0, cmd
    # By substitution: bash hands each word to printf; the words must be exactly the argv.
    words = subprocess.run(["bash", "-c", echo], cwd=cwd, capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert [w.decode(errors="surrogateescape") for w in words] == shlex.split(cmd), cmd
