"""The `qinspect` command line: subcommands with human or qemu-img-compatible JSON output.

`qinspect IMAGE` (or no argument) starts the TUI; `qinspect COMMAND IMAGE ...` runs one command.
The read-only spellings of qemu-img are accepted (`-f qcow2`, `-U`, `--image-opts`, `--object`,
`--output json`), so a script can swap `qemu-img` for `qinspect`; what would write is refused with
the qemu-img command to run instead. Every failure is one line on stderr,
`qinspect: FILE: what is wrong (offset N)`, and exit code 1 (usage errors too, as in qemu-img:
2 and 3 mean corruptions and leaks to `check`); tracebacks only with QINSPECT_DEBUG=1.

Every command is declared here — `@command(name, help, "module:function", example=...)` on a
function that adds its options — and its module is imported only to run it, so `--help`, `info`
and the error paths import neither numpy nor Rich (tests/test_startup_imports.py). Only the parser
of the command run is built, and the modules on that path import no `typing`, `dataclasses` or
`difflib` at run time: start-up is most of what `info` costs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from qinspect import __version__
from qinspect.termtext import for_terminal
from qinspect.units import SizeError, parse_size

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    from typing import NoReturn

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


class Command:
    """A subcommand as declared: its help, what adds its options, what runs it, an example."""

    __slots__ = ("configure", "example", "help_text", "target")

    def __init__(self, help_text: str, configure: Configure, target: str, example: str) -> None:
        self.help_text = help_text
        self.configure = configure
        self.target = target  # "module:function" that runs it
        self.example = example


COMMANDS: dict[str, Command] = {}

EXIT_CODES = """\
exit codes:
  0    success (check: no errors found)
  1    failure: bad input, an image qinspect cannot read, a usage error, a refused option
       (check: "check not completed", also for an image another process is writing)
  2    check: corruptions found          3    check: leaked clusters only
  130  interrupted
  diagnose --fail-on: 1 when a finding reaches the threshold
  scan --fail-on: 1 when an image reaches it (an image that cannot be inspected counts as error)"""


def command(name: str, help_text: str, target: str, example: str | None = None) -> Callable[[Configure], None]:
    """Register a subcommand: `configure(parser)` adds its options; `target` ("module:func") runs it."""

    def deco(configure: Configure) -> None:
        COMMANDS[name] = Command(help_text, configure, target, example or f"qinspect {name} disk.qcow2")

    return deco


# -- option helpers shared by the commands ----------------------------------------------------------
def size_type(text: str) -> int:
    """An argparse type for sizes: 64k, 1.5G, 0x3000b (hex digits are never units), 512."""
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def output_option(p: argparse.ArgumentParser) -> None:
    """--output=human|json (also `--output json`, as qemu-img takes it)."""
    p.add_argument("--output", choices=["human", "json"], default=None, metavar="{human,json}",
                   help="output format (default: human)")


def image_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """IMAGE and qemu-img's read-only opening options (-f, -U, --image-opts, --object)."""
    if optional:
        p.add_argument("image", nargs="?", metavar="IMAGE", help="the image file (omit with --size)")
    else:
        p.add_argument("image", metavar="IMAGE", help="the qcow2 image file")
    p.add_argument("-f", "--format", dest="format", metavar="FMT",
                   help="the image's format, as in qemu-img: only qcow2 is accepted")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="accepted for qemu-img compatibility: qinspect never takes locks, it always shares")
    p.add_argument("--image-opts", action="store_true",
                   help="IMAGE is a qemu-img option string: 'driver=qcow2,file.filename=PATH' (plain files)")
    p.add_argument("--object", action="append", default=[], metavar="OBJECTDEF",
                   help="accepted and ignored (e.g. a LUKS secret): qinspect reads qcow2 metadata, "
                        "which is never encrypted")


# -- the core commands (registered here: running them imports no other command module) ---------------
@command("info", "what the image is (qemu-img info)", "qinspect.cli.core_cmds:run_info",
         example="qinspect info --output=json --backing-chain top.qcow2")
def _info(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("--backing-chain", action="store_true", help="describe every layer of the backing chain")


@command("map", "where each guest range is (qemu-img map)", "qinspect.cli.core_cmds:run_map",
         example="qinspect map disk.qcow2 | head     # qemu-img's own layout off a terminal\n"
                 "  qinspect map --table -s 1G -l 64M disk.qcow2")
def _map(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("-s", "--start-offset", type=size_type, default=0, metavar="OFFSET", help="first guest byte to map")
    p.add_argument("-l", "--max-length", type=size_type, default=None, metavar="LENGTH",
                   help="map at most this many bytes")
    p.add_argument("--table", action="store_true",
                   help="qinspect's table (every range, its state, the layer that serves it, exact and "
                        "rounded sizes) even when stdout is not a terminal; --output=human gives "
                        "qemu-img's layout (data ranges only), the default off a terminal")


@command("check", "recompute every refcount and compare (qemu-img check, read-only)",
         "qinspect.cli.core_cmds:run_check", example="qinspect check --output=json disk.qcow2; echo $?")
def _check(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit code says it all")
    p.add_argument("-r", dest="repair", metavar="leaks|all",
                   help="refused: qinspect never writes; prints the qemu-img command that repairs")


# The analysis commands: declared here with their options (so that --help and the other commands
# import nothing of them); `qinspect.cli.analysis_cmds` runs them.
@command("layout", "who owns each cluster of the image file (host layout, reverse lookup)",
         "qinspect.cli.analysis_cmds:run_layout", example="qinspect layout --offset 0x50000 disk.qcow2")
def _layout(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("--offset", type=size_type, default=None, metavar="HOST_OFFSET",
                   help="show the owner of this file offset and every table entry pointing there")
    p.add_argument("--width", type=int, default=64, help="characters per row of the file map (default 64)")


@command("measure", "file size of this image converted with other options (qemu-img measure -O qcow2)",
         "qinspect.cli.analysis_cmds:run_measure",
         example="qinspect measure -O qcow2 -o cluster_size=2M,extended_l2=on --output=json disk.qcow2")
def _measure(p: argparse.ArgumentParser) -> None:
    image_options(p, optional=True)
    output_option(p)
    p.add_argument("-O", dest="target_format", default="qcow2", metavar="OUTPUT_FMT",
                   help="the target format, as in qemu-img measure: only qcow2 is measured")
    p.add_argument("-o", dest="options", default="", metavar="OPTIONS",
                   help="target options: cluster_size=..,extended_l2=on|off,refcount_bits=..,compat=..,"
                        "preallocation=..,backing_file=..")
    p.add_argument("--size", type=size_type, default=None, help="measure a new empty image of this size instead")


@command("cache", "QEMU's L2/refcount cache for this image: what the default covers, what it needs",
         "qinspect.cli.analysis_cmds:run_cache", example="qinspect cache --l2-cache-size=16M disk.qcow2")
def _cache(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("--l2-cache-size", type=size_type, default=None, metavar="SIZE",
                   help="a -drive l2-cache-size to try")
    p.add_argument("--l2-cache-entry-size", type=size_type, default=None, metavar="SIZE",
                   help="a -drive l2-cache-entry-size to try")
    p.add_argument("--refcount-cache-size", type=size_type, default=None, metavar="SIZE")
    p.add_argument("--cache-size", type=size_type, default=None, metavar="SIZE", help="a combined -drive cache-size")
    p.add_argument("--write-size", type=size_type, default=4096, metavar="SIZE",
                   help="guest write size for the copy-on-write figure (default 4k)")
    p.add_argument("--non-linux", action="store_true", help="QEMU's defaults on other hosts (8 MiB L2 cache)")


@command("diagnose", "findings: what makes this image big or slow, with the command that fixes each",
         "qinspect.cli.analysis_cmds:run_diagnose", example="qinspect diagnose --deep --fail-on=warning disk.qcow2")
def _diagnose(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)
    p.add_argument("--deep", action="store_true",
                   help="also read every data cluster (all-zero clusters, copies of backing data)")
    p.add_argument("--fail-on", choices=["info", "warning", "error"], default=None,
                   help="CI mode: one PASS/FAIL line per rule, exit 1 if a finding is this severe or worse")


@command("guest", "the guest's partitions and filesystems: free space, and what the image still holds of it",
         "qinspect.cli.guest_cmd:run_guest", example="qinspect guest --output=json disk.qcow2")
def _guest(p: argparse.ArgumentParser) -> None:
    image_options(p)
    output_option(p)


@command("scan", "every qcow2 image under PATHs: ranked table, JSON Lines or Prometheus metrics",
         "qinspect.cli.scan_cmd:run_scan",
         example="qinspect scan /var/lib/libvirt/images --output=prometheus --output-file=/var/lib/prometheus/"
                 "node-exporter/qinspect.prom")
def _scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories to search")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="worker processes (default: the CPU count; fewer on a host whose CPUs its VMs need)")
    p.add_argument("--deep", action="store_true", help="also read every data cluster (slower)")
    p.add_argument("--output", choices=["human", "json", "prometheus"], default="human",
                   help="human table, JSON Lines (one object per image) or Prometheus text format")
    p.add_argument("--output-file", metavar="FILE", default=None,
                   help="write here instead of stdout, atomically (temporary file + rename)")
    p.add_argument("--fail-on", choices=["info", "warning", "error"], default=None,
                   help="exit 1 if an image has a finding this severe or worse, or cannot be inspected")
    p.add_argument("--follow-symlinks", action="store_true", help="follow symlinks that lead out of the tree")


# -- parsing -----------------------------------------------------------------------------------------
class UsageError(Exception):
    """A command line qinspect cannot run; printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


HELP_WIDTH = 100  # fixed, so that `--help` and the README's synopsis read the same on any terminal


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=32)


def build_parsers(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser, by name. With `only` a command's name, just
    that command's parser (what running it needs: every parser argparse makes costs start-up time);
    with `only=""`, every command's name and help but none of their options (the top-level --help)."""
    parser = _Parser(
        prog="qinspect",
        description="See where a qcow2 image's bytes are and why it is slow. "
        "Run 'qinspect IMAGE' for the interactive view, or a command below. qemu-img's read-only "
        "options are accepted (-f qcow2, -U, --image-opts, --output json); qinspect never writes to an "
        "image and never takes its locks.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"qinspect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, cmd in COMMANDS.items():
        if only and name != only:
            continue
        p = sub.add_parser(name, help=cmd.help_text, description=cmd.help_text,
                           epilog=f"example:\n  {cmd.example}\n\n{EXIT_CODES}", formatter_class=_Formatter)
        if only is None or name == only:
            cmd.configure(p)
        parsers[name] = p
    return parser, parsers


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    return build_parsers(only)[0]


TUI_SYNOPSIS = "qinspect [IMAGE]      the interactive view (a file picker when IMAGE is omitted)"


def synopsis() -> str:
    """The command-line synopsis the README shows: every command's usage line, from the parser."""
    _, parsers = build_parsers()
    lines = [TUI_SYNOPSIS]
    for p in parsers.values():
        usage = p.format_usage().removeprefix("usage: ").rstrip().split("\n")
        lines += [usage[0], *(u.removeprefix(" " * len("usage: ")) for u in usage[1:])]
    return "\n".join(lines) + "\n"


def _resolve(target: str) -> Handler:
    mod, func = target.split(":")
    __import__(mod)  # (importlib itself is an import more at every start)
    handler: Handler = getattr(sys.modules[mod], func)
    return handler


# qemu-img commands with no read-only counterpart here (they write, or compare/convert data).
QEMU_IMG_ONLY = frozenset({"amend", "bench", "bitmap", "commit", "compare", "convert", "create", "dd", "rebase",
                           "resize", "snapshot"})


def suggest(word: str) -> str | None:
    """The command a mistyped `word` most likely meant ('inf' -> 'info', 'diag' -> 'diagnose')."""
    names = list(COMMANDS)
    prefix = [n for n in names if n.startswith(word)] if len(word) >= 2 else []
    if len(prefix) == 1:
        return prefix[0]
    # difflib's first bound (real_quick_ratio: 2 * shorter length / both lengths) rules out a word
    # far longer than every command, such as an image's path, without importing difflib.
    if not any(2 * min(len(word), len(n)) >= 0.6 * (len(word) + len(n)) for n in names):
        return None
    import difflib  # (only for a word that may be a mistyped command: not at every start)

    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return close[0] if close else None


def run() -> NoReturn:
    """The `qinspect` console script: `main()`, then, after a command, a quick exit.

    A command's work is done when `main` returns: its output is flushed here and the process ends
    at once (`os._exit`), without the interpreter's teardown, which frees numpy's arrays and every
    module one by one and joins the planner's idle threads (20-30 ms of a cold check's 0.25 s on
    the 4 KiB-cluster 100 GiB image; nothing in qinspect needs it: no file is written at exit, and
    the image is only read). The TUI exits the ordinary way (Textual's own clean-up).

    It also asks numpy's bundled OpenBLAS for one thread (unless the user chose a number): qinspect
    does no linear algebra, and on import OpenBLAS starts a thread per core that spins for a while,
    taking a core from the walk (the 1 TiB preallocated image's warm check 0.190 -> 0.171 s, 9
    interleaved runs, 2 cores). Only here, in the program: a library user's BLAS is theirs."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = sys.argv[1:]
    rc = main(argv)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(rc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away (as `guarded` answers it), a full disk
            rc = rc or 1
    os._exit(rc)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the command `argv` names (or the TUI) and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Every command is declared above and its module imported only to run it: `info`, `--help`
    # and the error paths import neither numpy nor Rich (tests/test_startup_imports.py).
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        return _run_tui(args_list)
    parser = build_parser(only=args_list[0] if args_list[0] in COMMANDS else "")
    try:
        args = parser.parse_args(args_list)
        if args.command is None:
            parser.print_help()
            return 0
        normalize_image_args(args)
    except UsageError as e:
        where = f"{args_list[0]}: " if args_list and args_list[0] in COMMANDS else ""
        print(f"qinspect: {where}{for_terminal(str(e))}", file=sys.stderr)
        return 1
    handler = _resolve(COMMANDS[args.command].target)
    return guarded(handler, args, getattr(args, "image", None))


def parse_image_opts(text: str) -> str:
    """The file of a qemu-img `--image-opts` string; refuses what qinspect cannot honour.

    QEMU's option syntax: `key=value` pairs separated by commas, `,,` for a literal comma.
    """
    pairs: dict[str, str] = {}
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    for part in parts:
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise UsageError(f"--image-opts: '{part}' is not key=value")
        pairs[key] = value
    for key, value in pairs.items():
        if key == "driver" and value != "qcow2":
            raise UsageError(f"--image-opts: driver '{value}' is not supported: qinspect reads qcow2 images only")
        if key == "file.driver" and value != "file":
            raise UsageError(f"--image-opts: file.driver '{value}' is not supported: qinspect reads local files only")
        if key in ("force-share", "read-only", "file.locking") or key.startswith("encrypt."):
            continue  # read-only, lock-free and metadata-only anyway
        if key not in ("driver", "file.driver", "file.filename"):
            raise UsageError(f"--image-opts: option '{key}' is not supported (qinspect opens plain files: "
                             "driver=qcow2,file.filename=PATH)")
    if "file.filename" not in pairs:
        raise UsageError("--image-opts: file.filename=PATH is required")
    return pairs["file.filename"]


def normalize_image_args(args: argparse.Namespace) -> None:
    """Apply qemu-img's opening options: -f (qcow2 only) and --image-opts."""
    fmt = getattr(args, "format", None)
    if fmt is not None and fmt != "qcow2":
        raise UsageError(f"format '{fmt}' is not supported: qinspect reads qcow2 images only")
    args.image_spec = getattr(args, "image", None)  # as given (qemu-img check reports it so)
    if getattr(args, "image_opts", False) and args.image_spec is not None:
        args.image = parse_image_opts(args.image_spec)


def guarded(handler: Handler, args: argparse.Namespace, image: str | None) -> int:
    """Run a command; turn every failure into one line on stderr and exit code 1."""
    from qinspect.qcow2.errors import Qcow2Error

    try:
        return handler(args)
    except Qcow2Error as e:
        report_error(e.path or image, str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        import contextlib

        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except MemoryError:
        report_error(image, "out of memory")
    except OSError as e:
        report_error(getattr(e, "filename", None) or image, e.strerror or str(e))
    except Exception as e:
        if os.environ.get("QINSPECT_DEBUG"):
            raise
        report_error(image, f"internal error: {type(e).__name__}: {e} (set QINSPECT_DEBUG=1 for details)")
    return 1


def report_error(path: str | None, message: str) -> None:
    """The one line every failure gets: `qinspect: FILE: message (offset N)`, escaped for the terminal."""
    where = f"{for_terminal(str(path))}: " if path else ""
    print(f"qinspect: {where}{for_terminal(message)}", file=sys.stderr)


def _run_tui(args_list: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qinspect", add_help=False)
    parser.add_argument("image", nargs="?")
    ns, rest = parser.parse_known_args(args_list)
    word = ns.image
    if word in QEMU_IMG_ONLY and not os.path.exists(word):
        print(f"qinspect: unknown command '{word}': qinspect only reads images ({', '.join(COMMANDS)}); "
              f"run qemu-img {word} for that", file=sys.stderr)
        return 1
    if word in COMMANDS and not os.path.exists(word):  # `qinspect --output=json info x`
        print(f"qinspect: options go after the command: qinspect {word} {for_terminal(' '.join(rest))}",
              file=sys.stderr)
        return 1
    if word is not None and not os.path.exists(word) and (rest or suggest(word)):
        # `qinspect inf img`: a mistyped command, not an image called "inf".
        hint = suggest(word)
        tail = f" (did you mean {hint}?)" if hint else f" (commands: {', '.join(COMMANDS)})"
        print(f"qinspect: unknown command '{for_terminal(word)}'{tail}", file=sys.stderr)
        return 1
    if rest:
        print(f"qinspect: unknown arguments: {for_terminal(' '.join(rest))} (see 'qinspect --help')",
              file=sys.stderr)
        return 1
    if word is not None and not os.path.exists(word):
        report_error(word, "no such file")
        return 1
    if not (sys.stdin.isatty() and sys.stdout.isatty() and sys.stderr.isatty()):
        # Textual (which draws on stderr and reads stdin) would wait forever for a terminal that is not there.
        print("qinspect: the interactive view needs a terminal (stdin, stdout and stderr must be one); "
              "for text output use a command: qinspect info|map|check|layout|diagnose IMAGE", file=sys.stderr)
        return 2
    from qinspect.tui.app import run_app

    code: int = run_app(word)
    return code
