"""The `qinspect` command line: subcommands with human (Rich) or qemu-img-compatible JSON output.

`qinspect IMAGE` (or no argument) starts the TUI; `qinspect COMMAND IMAGE ...` runs one command.
Commands are declared here (name, help, options) and run by `module:function` imported on use.
Every failure is one line on stderr, `qinspect: FILE: what is wrong (offset N)`, and exit code 1;
tracebacks are shown only with QINSPECT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from qinspect import __version__

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str, module: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], None]:
    """Register a subcommand: `configure(parser)` adds its options; `module.run(args)` runs it."""

    def deco(configure: Callable[[argparse.ArgumentParser], None]) -> None:
        COMMANDS[name] = (help_text, configure, module)

    return deco


def _output_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=["human", "json"], default="human", help="output format (default: human)")


@command("info", "what the image is (qemu-img info)", "qinspect.cli.core_cmds:run_info")
def _info(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)
    p.add_argument("--backing-chain", action="store_true", help="describe every layer of the backing chain")


@command("map", "where each guest range is (qemu-img map)", "qinspect.cli.core_cmds:run_map")
def _map(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)
    p.add_argument("--start-offset", type=_size, default=0, help="first guest byte to map")
    p.add_argument("--max-length", type=_size, default=None, help="map at most this many bytes")


@command("check", "recompute every refcount and compare (qemu-img check, read-only)",
         "qinspect.cli.core_cmds:run_check")
def _check(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)


@command("scan", "every qcow2 image under PATHs: ranked table, JSON Lines or Prometheus metrics",
         "qinspect.cli.scan_cmd:run_scan")
def _scan(p: argparse.ArgumentParser) -> None:
    # Registered here, like info/map/check: a scan needs none of the other commands' imports.
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories to search")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="worker processes (default: the CPU count, fewer when the load average says CPUs are busy)")
    p.add_argument("--deep", action="store_true", help="also read every data cluster (slower)")
    p.add_argument("--output", choices=["human", "json", "prometheus"], default="human",
                   help="human table, JSON Lines (one object per image) or Prometheus text format")
    p.add_argument("--output-file", metavar="FILE", default=None,
                   help="write here instead of stdout, atomically (temporary file + rename)")
    p.add_argument("--fail-on", choices=["info", "warning", "error"], default=None,
                   help="exit 1 if an image has a finding this severe or worse, or cannot be inspected")
    p.add_argument("--follow-symlinks", action="store_true", help="follow symlinks that lead out of the tree")


def _size(text: str) -> int:
    """A size with an optional k/M/G/T/P/E suffix (powers of 1024), as qemu-img accepts."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
    t = text.strip().lower()
    suffix = t[-1] if t and t[-1].isalpha() else ""
    num = t[: len(t) - len(suffix)] if suffix else t
    if suffix not in units:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'")
    try:
        value = float(num) if "." in num else int(num, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'")
    return int(value * units[suffix])


# The analysis commands: declared here with their options (so that --help and the other commands
# import nothing of them); `qinspect.cli.analysis_cmds` runs them.
@command("layout", "who owns each cluster of the image file (host layout, reverse lookup)",
         "qinspect.cli.analysis_cmds:run_layout")
def _layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)
    p.add_argument("--offset", type=_size, default=None, metavar="HOST_OFFSET",
                   help="show the owner of this file offset and every table entry pointing there")
    p.add_argument("--width", type=int, default=64, help="characters per row of the file map (default 64)")


@command("measure", "file size of this image converted with other options (qemu-img measure -O qcow2)",
         "qinspect.cli.analysis_cmds:run_measure")
def _measure(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", help="the image to convert (omit with --size)")
    _output_opt(p)
    p.add_argument("-o", dest="options", default="", metavar="OPTIONS",
                   help="target options: cluster_size=..,extended_l2=on|off,refcount_bits=..,compat=..,"
                        "preallocation=..,backing_file=..")
    p.add_argument("--size", type=_size, default=None, help="measure a new empty image of this size instead")


@command("cache", "QEMU's L2/refcount cache for this image: what the default covers, what it needs",
         "qinspect.cli.analysis_cmds:run_cache")
def _cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)
    p.add_argument("--l2-cache-size", type=_size, default=None, metavar="SIZE", help="a -drive l2-cache-size to try")
    p.add_argument("--l2-cache-entry-size", type=_size, default=None, metavar="SIZE",
                   help="a -drive l2-cache-entry-size to try")
    p.add_argument("--refcount-cache-size", type=_size, default=None, metavar="SIZE")
    p.add_argument("--cache-size", type=_size, default=None, metavar="SIZE", help="a combined -drive cache-size")
    p.add_argument("--write-size", type=_size, default=4096, metavar="SIZE",
                   help="guest write size for the copy-on-write figure (default 4k)")
    p.add_argument("--non-linux", action="store_true", help="QEMU's defaults on other hosts (8 MiB L2 cache)")


@command("diagnose", "findings: what makes this image big or slow, with the command that fixes each",
         "qinspect.cli.analysis_cmds:run_diagnose")
def _diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    _output_opt(p)
    p.add_argument("--deep", action="store_true",
                   help="also read every data cluster (all-zero clusters, copies of backing data)")
    p.add_argument("--fail-on", choices=["info", "warning", "error"], default=None,
                   help="CI mode: one PASS/FAIL line per rule, exit 1 if a finding is this severe or worse")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (cheap: handlers are imported only when one runs). With `only`,
    just that command's options are declared (the others keep their name and help): what running
    one command needs."""
    parser = argparse.ArgumentParser(
        prog="qinspect",
        description="See where a qcow2 image's bytes are and why it is slow. "
        "Run 'qinspect IMAGE' for the interactive view, or a command below.",
    )
    parser.add_argument("--version", action="version", version=f"qinspect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _module) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            configure(p)
    return parser


def _resolve(target: str) -> Handler:
    import importlib

    mod, func = target.split(":")
    handler: Handler = getattr(importlib.import_module(mod), func)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qinspect` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Every command is declared above and its module imported only to run it: `info`, `--help`
    # and the error paths import neither numpy nor Rich (tests/test_startup_imports.py).
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        return _run_tui(args_list)
    parser = build_parser(only=args_list[0] if args_list[0] in COMMANDS else "")
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 0
    handler = _resolve(COMMANDS[args.command][2])
    return guarded(handler, args, getattr(args, "image", None))


def guarded(handler: Handler, args: argparse.Namespace, image: str | None) -> int:
    """Run a command; turn every failure into one line on stderr and exit code 1."""
    from qinspect.qcow2.errors import Qcow2Error

    try:
        return handler(args)
    except Qcow2Error as e:
        report_error(e.path or image or "qinspect", str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except MemoryError:
        report_error(image or "qinspect", "out of memory")
    except OSError as e:
        report_error(getattr(e, "filename", None) or image or "qinspect", e.strerror or str(e))
    except Exception as e:
        if os.environ.get("QINSPECT_DEBUG"):
            raise
        report_error(image or "qinspect", f"internal error: {type(e).__name__}: {e} (set QINSPECT_DEBUG=1 for details)")
    return 1


def report_error(path: str, message: str) -> None:
    """The one line every failure gets: `qinspect: FILE: message (offset N)`."""
    print(f"qinspect: {path}: {message}", file=sys.stderr)


def _run_tui(args_list: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qinspect", add_help=False)
    parser.add_argument("image", nargs="?")
    ns, rest = parser.parse_known_args(args_list)
    if rest:
        build_parser().print_usage(sys.stderr)
        print(f"qinspect: unknown arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    if ns.image is not None and not os.path.exists(ns.image):
        report_error(ns.image, "no such file")
        return 1
    from qinspect.tui.app import run_app

    code: int = run_app(ns.image)
    return code
