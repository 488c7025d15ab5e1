"""qinspect never writes (issue #6), works on read-only files, and notices a running QEMU.

- Every CLI command over every sample image, then a TUI session, leave every file of the sample
  directory byte-for-byte (sha256) and mtime unchanged; during the CLI commands, no file of that
  directory is even opened with a write flag.
- A file with mode 0444 (enforced even for root, by dropping CAP_DAC_OVERRIDE) can be inspected.
- A file on which a QEMU holds its image locks (OFD locks on bytes 100.. and 200..) is reported as
  "in use": a warning in `Image.problems` and on stderr of `qinspect info`, never a failure. The
  check only asks (F_OFD_GETLK); it takes no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_NAMES, Samples

from qinspect.cli import COMMANDS, main
from qinspect.qcow2.image import open_image

QINSPECT = shutil.which("qinspect") or str(Path(sys.executable).with_name("qinspect"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def fingerprint(d: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for f in sorted(d.iterdir()):
        if f.is_file():
            st = f.stat()
            out[f.name] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def ro_dir(samples: Samples, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private copy of the samples, every file chmod 0444 and the directory 0555."""
    d = tmp_path_factory.mktemp("readonly")
    for f in samples.dir.iterdir():
        if f.is_file():
            shutil.copy2(f, d / f.name)
            (d / f.name).chmod(0o444)
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


@contextlib.contextmanager
def no_write_opens(d: Path) -> Iterator[list[str]]:
    """Fail any open of a file in `d` with a write flag (os.open and builtins.open)."""
    real_os_open = os.open
    real_io_open = io.open
    seen: list[str] = []
    root = str(d.resolve())

    def inside(path: Any) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def guarded_os_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if inside(path):
            seen.append(os.fsdecode(path))
            assert not flags & WRITE_FLAGS, f"os.open({path!r}, {flags:#o}) asks for writing"
        return real_os_open(path, flags, *args, **kw)

    def guarded_io_open(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if not isinstance(file, int) and inside(file):
            seen.append(os.fsdecode(file))
            assert not set(mode) & set("wax+"), f"open({file!r}, {mode!r}) asks for writing"
        return real_io_open(file, mode, *args, **kw)

    os.open = guarded_os_open  # type: ignore[assignment]
    io.open = guarded_io_open  # type: ignore[assignment]
    import builtins

    real_builtin_open = builtins.open
    builtins.open = guarded_io_open  # type: ignore[assignment]
    try:
        yield seen
    finally:
        os.open = real_os_open
        io.open = real_io_open
        builtins.open = real_builtin_open


def _commands() -> list[list[str]]:
    """Every CLI command with the options that make it read the most."""
    extra = {"diagnose": [["--deep"]], "info": [["--backing-chain"], ["--output=json"]], "map": [["--output=json"]],
             "check": [["--output=json"]]}
    out = []
    for name in COMMANDS:
        out.append([name])
        out.extend([name, *opts] for opts in extra.get(name, []))
    return out


def test_cli_commands_never_write(ro_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = fingerprint(ro_dir)
    commands = _commands()
    assert {"info", "map", "check"} <= {c[0] for c in commands}
    ran = 0
    with no_write_opens(ro_dir) as seen:
        for name in SAMPLE_NAMES:
            path = str(ro_dir / next(f for f in before if f.startswith(name + ".")))
            for cmd in commands:
                code = main([cmd[0], path, *cmd[1:]])
                assert code in (0, 1, 2, 3), (cmd, name, code)
                ran += 1
                err = capsys.readouterr().err
                assert "Traceback" not in err and "internal error" not in err, (cmd, name, err)
    assert seen, "the guard saw no opens: it is not in effect"
    assert fingerprint(ro_dir) == before
    assert ran == len(SAMPLE_NAMES) * len(commands)


def test_subprocess_commands_on_a_0444_file_without_root_powers(ro_dir: Path) -> None:
    """The real command, with CAP_DAC_OVERRIDE dropped when root, so 0444 is really read-only."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
        # sanity: without the capability, opening for writing really is refused
        r = subprocess.run([*prefix, sys.executable, "-c", f"open({str(ro_dir / 'basic64k.qcow2')!r}, 'r+b')"],
                           capture_output=True, text=True, check=False)
        assert r.returncode != 0 and "PermissionError" in r.stderr
    before = fingerprint(ro_dir)
    for cmd in (["info"], ["map", "--output=json"], ["check"]):
        r = subprocess.run([*prefix, QINSPECT, cmd[0], str(ro_dir / "chain_top.qcow2"), *cmd[1:]],
                           capture_output=True, text=True, check=False, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
    assert fingerprint(ro_dir) == before


async def test_tui_session_never_writes(ro_dir: Path) -> None:
    from qinspect.tui.app import QInspectApp

    before = fingerprint(ro_dir)
    for name in ("chain_top", "snapshots", "extdata"):
        app = QInspectApp(str(ro_dir / f"{name}.qcow2"))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            for key in ("2", "right", "right", "enter", "3", "4", "down", "enter", "5", "6", "7", "1"):
                await pilot.press(key)
                await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.press("q")
    assert fingerprint(ro_dir) == before


# -- in use by a running QEMU ------------------------------------------------------------------------
_FLOCK = "hhqqi4x"


def _ofd_read_lock(fd: int, start: int, length: int = 1) -> None:
    """Take the kind of lock QEMU takes (a shared OFD lock); a read lock needs only O_RDONLY."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, start, length, 0))


needs_ofd = pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="no OFD locks on this platform")


@needs_ofd
@pytest.mark.parametrize(("perm_bytes", "shared_bytes", "writer"), [
    ((100, 101, 103), (201, 203), True),   # what a read-write qemu-io holds
    ((100,), (201, 203), False),           # what a read-only qemu-io holds
])
def test_in_use_detected_from_locks(samples: Samples, tmp_path: Path, perm_bytes: tuple[int, ...],
                                    shared_bytes: tuple[int, ...], writer: bool) -> None:
    img_path = tmp_path / "busy.qcow2"
    shutil.copyfile(samples.path("basic64k"), img_path)
    with open_image(img_path) as img:
        assert not [p for p in img.problems if "in use" in p.message]
    fd = os.open(img_path, os.O_RDONLY)
    try:
        for b in (*perm_bytes, *shared_bytes):
            _ofd_read_lock(fd, b)
        with open_image(img_path) as img:
            [p] = [p for p in img.problems if "in use" in p.message]
            assert p.severity.value == "warning"
            assert ("contents may be changing" in p.message) == writer
        r = subprocess.run([QINSPECT, "info", str(img_path)], capture_output=True, text=True, check=False)
        assert r.returncode == 0
        assert "in use" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run([QINSPECT, "check", str(img_path)], capture_output=True, text=True, check=False)
        # Written by another process: no verdict, qemu-img's "check not completed" (issue 10).
        assert r.returncode == (1 if writer else 0), r.stderr
        assert "in use" in r.stderr
    finally:
        os.close(fd)
    with open_image(img_path) as img:  # the locks went with the descriptor; qinspect took none
        assert not [p for p in img.problems if "in use" in p.message]


@needs_ofd
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
@pytest.mark.parametrize("readonly", [False, True])
def test_in_use_by_qemu_io(samples: Samples, tmp_path: Path, readonly: bool) -> None:
    img_path = tmp_path / "busy.qcow2"
    shutil.copyfile(samples.path("basic64k"), img_path)
    args = ["qemu-io", "-f", "qcow2", *(["-r"] if readonly else []), str(img_path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        found: list[str] = []
        while time.monotonic() < deadline and not found:
            with open_image(img_path) as img:
                found = [p.message for p in img.problems if "in use" in p.message]
            if not found:
                time.sleep(0.05)
        assert found, "qemu-io's locks were not seen"
        assert ("contents may be changing" in found[0]) == (not readonly)
        r = subprocess.run([QINSPECT, "info", str(img_path)], capture_output=True, text=True, check=False)
        assert r.returncode == 0 and "in use" in r.stderr
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
