"""The `qinspect` command line: subcommands with human (Rich) or qemu-img-compatible JSON output.

`qinspect IMAGE` (or no argument) starts the TUI; `qinspect COMMAND IMAGE ...` runs one command.
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


def _load_extra_commands() -> None:
    """Commands defined in other modules register themselves on import."""
    import importlib

    for mod in ("qinspect.cli.analysis_cmds",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_parser(extra: bool = True) -> argparse.ArgumentParser:
    if extra:
        _load_extra_commands()
    parser = argparse.ArgumentParser(
        prog="qinspect",
        description="See where a qcow2 image's bytes are and why it is slow. "
        "Run 'qinspect IMAGE' for the interactive view, or a command below.",
    )
    parser.add_argument("--version", action="version", version=f"qinspect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _module) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _resolve(target: str) -> Handler:
    import importlib

    mod, func = target.split(":")
    handler: Handler = getattr(importlib.import_module(mod), func)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qinspect` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # info, map and check are registered above: running one does not need the other commands'
    # modules (the analyses and their imports cost more start-up time than qemu-img's whole check).
    core = bool(args_list) and args_list[0] in COMMANDS
    if not core and args_list[:1] != ["--version"]:
        _load_extra_commands()
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        return _run_tui(args_list)
    parser = build_parser(extra=not core and args_list[:1] != ["--version"])
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
    if not (sys.stdin.isatty() and sys.stdout.isatty() and sys.stderr.isatty()):
        # Textual (which draws on stderr and reads stdin) would wait forever for a terminal that is not there.
        print("qinspect: the interactive view needs a terminal (stdin, stdout and stderr must be one); "
              "for text output use a command: qinspect info|map|check|layout|diagnose IMAGE", file=sys.stderr)
        return 2
    from qinspect.tui.app import run_app

    code: int = run_app(ns.image)
    return code
