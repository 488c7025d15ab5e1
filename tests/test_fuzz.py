"""Mutation fuzzing of the sample images (issue #6): never crash, never hang, never blow up memory.

Every case takes one sample image, changes one to three things in its metadata (an integer field
set to 0, 1, max, huge, negative-as-unsigned, unaligned, past the end of the file or at another
structure; a flag bit toggled; an extended-L2 bitmap with both bits set; a compressed descriptor
running past the end; a structure zeroed or filled with random bytes; the file truncated; the
backing file name pointed at the image itself, a directory, a device...), then runs open, info,
map, check, layout (when present), lookups and reads over it, plus every CLI command (info, check,
map, layout, measure, cache, diagnose --deep) on every eighth case. Each operation must end in a
result or a `Qcow2Error`; each case must finish within a time bound (a hang detector, not a timing
assertion) and grow memory by less than a bound. The CLI runs with QINSPECT_DEBUG=1, so an
"internal error" that `guarded()` would hide from users is a crash here.

    pytest tests/test_fuzz.py                               # the CI run (QINSPECT_FUZZ_CASES=3000)
    QINSPECT_FUZZ_CASES=100000 pytest tests/test_fuzz.py    # a long run
    QINSPECT_FUZZ_SEED=7 QINSPECT_FUZZ_START=5000 ...       # other cases
    QINSPECT_FUZZ_ONLY=1234 pytest tests/test_fuzz.py -k replay   # one case, in-process, with traceback

Where qemu-img is installed, every case also compares the exit codes of info, map and check with
live qemu-img's (the three qemu-img runs of a case in parallel, inside the worker; an encrypted
image gets its key; qemu-img runs with 256 file descriptors so that a backing chain that loops
ends, see runner.QEMU_NOFILE); QINSPECT_FUZZ_QEMU_EVERY=8 compares every eighth case (index % 8
== 3), QINSPECT_FUZZ_QEMU=0 none. The summary line says how many were compared, how many
disagreed (each a failure), and how many could not be compared, by reason.

Other knobs: QINSPECT_FUZZ_JOBS (workers, default: CPUs up to 4), QINSPECT_FUZZ_TIMEOUT (seconds
per case, default 60), QINSPECT_FUZZ_MEMORY_MB (default 512), QINSPECT_FUZZ_TRACEMALLOC=1.
Cases are deterministic in (seed, index); a failure prints the replay command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fuzz import runner
from fuzz.runner import Outcome, _apply, case_for, describe_hang, exercise, load_bases, run_cases

CASES = int(os.environ.get("QINSPECT_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("QINSPECT_FUZZ_SEED", "6"))
START = int(os.environ.get("QINSPECT_FUZZ_START", "0"))
JOBS = int(os.environ.get("QINSPECT_FUZZ_JOBS", str(min(4, os.cpu_count() or 2))))
ONLY = os.environ.get("QINSPECT_FUZZ_ONLY")


class _Summary:
    """A pytest plugin registered by the fuzz test: one line in the terminal summary."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


def _summary(config: pytest.Config) -> _Summary:
    plugin = config.pluginmanager.get_plugin("qinspect-fuzz-summary")
    if plugin is None:
        plugin = _Summary()
        config.pluginmanager.register(plugin, "qinspect-fuzz-summary")
    assert isinstance(plugin, _Summary)
    return plugin


@pytest.fixture(scope="module")
def bases(samples: Any) -> list[runner.Base]:
    if not samples.catalog:
        pytest.skip("no sample images")
    return load_bases(samples.dir, samples.catalog)


def _report(failures: list[Outcome], bases: list[runner.Base]) -> str:
    lines = [f"{len(failures)} fuzz case(s) failed (seed {SEED}):"]
    for o in failures[:15]:
        lines.append(f"--- {o.status}: {describe_hang(o, SEED, bases)}")
        lines.append(f"    replay: QINSPECT_FUZZ_SEED={SEED} QINSPECT_FUZZ_ONLY={o.index} "
                     "pytest tests/test_fuzz.py -k replay")
        lines.extend("    " + ln for ln in o.detail.strip().splitlines()[-12:])
    if len(failures) > 15:
        lines.append(f"... and {len(failures) - 15} more")
    return "\n".join(lines)


@pytest.mark.skipif(ONLY is not None, reason="replaying one case")
def test_fuzz_cases(samples: Any, bases: list[runner.Base], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    t0 = time.monotonic()
    outcomes = run_cases(range(START, START + CASES), seed=SEED, bases=bases, sample_dir=samples.dir,
                         workdir=tmp_path, jobs=JOBS)
    elapsed = time.monotonic() - t0
    status = Counter(o.status for o in outcomes)
    opened = sum(1 for o in outcomes if o.ops.get("open") == "ok")
    peak = max((o.peak for o in outcomes), default=0)
    slowest = max((o.seconds for o in outcomes), default=0.0)
    failures = sorted((o for o in outcomes if o.status != "ok"), key=lambda o: o.index)
    compared = sum(1 for o in outcomes if o.compared)
    disagree = sum(1 for o in outcomes if o.status == "disagree")
    meant = sum(1 for o in outcomes if runner.compares_with_qemu(o.index))
    why = Counter(o.not_compared for o in outcomes if o.not_compared is not None)
    # every bucket is printed, zeros too: 0 in each is the goal
    buckets = "; ".join(f"{why.get(r, 0)} {r.value}" for r in runner.NotCompared)
    others = meant - compared - sum(why.values())  # cases that crashed, hung or died before comparing
    versus = (f"exit codes of info/map/check compared with {runner.QEMU_IMG} on {compared} of {meant} cases, "
              f"{disagree} disagreed; not compared: {buckets}; {others} failed before comparing"
              if runner.QEMU_IMG is not None else "qemu-img not installed: no exit codes compared")
    _summary(request.config).lines.append(
        f"qinspect fuzz: {len(outcomes)} cases (seed {SEED}, cases {START}..{START + CASES - 1}) in {elapsed:.0f} s "
        f"on {JOBS} workers: {opened} opened, {len(outcomes) - opened} refused at open; "
        f"{len(failures)} failed {dict(status)}; slowest case {slowest:.1f} s, largest memory growth "
        f"{peak >> 20} MiB; {versus}")
    assert len(outcomes) == CASES
    assert not failures, _report(failures, bases)


@pytest.mark.skipif(ONLY is None, reason="set QINSPECT_FUZZ_ONLY=N to replay case N")
def test_fuzz_replay(samples: Any, bases: list[runner.Base], tmp_path: Path) -> None:
    """Run one case in this process so a failure shows its full traceback."""
    assert ONLY is not None
    base, case = case_for(int(ONLY), SEED, bases)
    print(case.describe())
    for f in samples.dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    path = tmp_path / base.file
    path.unlink()
    shutil.copyfile(samples.dir / base.file, path)
    _apply(path, case)
    target = path
    if case.steps[-1].startswith("then inspect "):
        target = tmp_path / case.steps[-1].split()[2].rstrip(",")
    for name, result in exercise(str(target)).items():
        print(f"  {name}: {result}")


def test_cases_are_deterministic(bases: list[runner.Base]) -> None:
    for i in (0, 1, 17, 999):
        a, b = case_for(i, SEED, bases)[1], case_for(i, SEED, bases)[1]
        assert (a.image, a.steps, a.patches, a.truncate) == (b.image, b.steps, b.patches, b.truncate)
        assert a.steps and (a.patches or a.truncate is not None or all(s.startswith("(") for s in a.steps))


def test_mutations_reach_every_region(bases: list[runner.Base]) -> None:
    """The first few hundred cases touch every kind of structure the samples have."""
    regions = {r for b in bases for r in b.targets.regions}
    hit: set[str] = set()
    for i in range(600):
        for step in case_for(i, SEED, bases)[1].steps:
            hit.add(step.split(":", 1)[0])
    assert regions <= hit, regions - hit
    assert {"header", "extensions", "L1", "L2", "L2 bitmap", "refcount table", "refcount block",
            "snapshot table", "bitmap directory", "compressed data"} <= regions


# -- the harness itself catches what it is meant to catch --------------------------------------------
def _harness(monkeypatch: pytest.MonkeyPatch, samples: Any, bases: list[runner.Base], tmp_path: Path,
             fake: Any, timeout: float = 20.0) -> Outcome:
    monkeypatch.setattr(runner, "exercise", fake)  # inherited by the forked worker
    [o] = run_cases([0], seed=SEED, bases=bases, sample_dir=samples.dir, workdir=tmp_path, jobs=1,
                    timeout=timeout)
    return o


def test_harness_reports_a_crash(monkeypatch: pytest.MonkeyPatch, samples: Any, bases: list[runner.Base],
                                 tmp_path: Path) -> None:
    def crash(path: str, with_cli: bool = True) -> dict[str, str]:
        raise IndexError("index -1 is out of bounds")

    o = _harness(monkeypatch, samples, bases, tmp_path, crash)
    assert o.status == "crash" and "IndexError" in o.detail


def test_harness_reports_a_hang(monkeypatch: pytest.MonkeyPatch, samples: Any, bases: list[runner.Base],
                                tmp_path: Path) -> None:
    def hang(path: str, with_cli: bool = True) -> dict[str, str]:
        time.sleep(3600)
        return {}

    o = _harness(monkeypatch, samples, bases, tmp_path, hang, timeout=1.0)
    assert o.status == "hang"


def test_harness_reports_memory_growth(monkeypatch: pytest.MonkeyPatch, samples: Any,
                                       bases: list[runner.Base], tmp_path: Path) -> None:
    def hog(path: str, with_cli: bool = True) -> dict[str, str]:
        block = bytearray(runner.MEMORY_BOUND + (64 << 20))  # touched: counts in RSS and tracemalloc
        block[:: 4096] = b"\1" * len(block[:: 4096])
        return {"open": "ok"}

    o = _harness(monkeypatch, samples, bases, tmp_path, hog)
    assert o.status == "memory"


def test_harness_keeps_no_copy_of_the_output() -> None:
    """Seed 31 case 656 (snapshot 0's l1_size 0x1 -> 0x10001 on diag_snapshots): `check` prints
    647 K lines, 78 MB, and stays at 67 MiB in its own process; the harness kept its stderr in a
    StringIO and counted 237 MiB of growth for the case. The in-process CLI's output now goes to a
    sink that keeps a tail and still sees a crash marker anywhere, even cut between two writes."""
    sink = runner._Sink(keep=100)
    for _ in range(10_000):
        sink.write("ERROR: counting reference for region exceeding the end of the file\n")
    assert not sink.crashed and len(sink.getvalue()) == 100
    sink.write("qinspect: internal err")
    sink.write("or: boom\n")
    assert sink.crashed
    tb = runner._Sink()
    tb.write("Trace")
    tb.write("back (most recent call last):\n")
    assert tb.crashed


# -- regressions found by the exit-code comparison (issue 9) ------------------------------------------
def test_patches_past_the_end_stay_small(bases: list[runner.Base]) -> None:
    """fid_snap_past_eof points its snapshot table at 1 GiB: a mutation there used to grow the
    case's buffer (and its patch, and the image copy) to a gigabyte; cases 1375 and 1429 then took
    more than the time bound on a loaded machine and counted as hangs. Far writes stay sparse now."""
    for i in (131, 1375, 1429):  # (cases of seed 6, the default, whatever QINSPECT_FUZZ_SEED says)
        base, case = case_for(i, 6, bases)
        assert base.name == "fid_snap_past_eof"
        assert sum(len(b) for _, b in case.patches) < 4096, case.describe()
        assert any(off >= 1 << 30 for off, _ in case.patches), case.describe()


# Damage to the LUKS header, each refused by qcrypto_block_luks_check_header / _parse_header (or
# qcow2's read function) in QEMU's own words; (field offset in the LUKS header, bytes) patches.
def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


_SLOT = 208  # key slot 0; 48 bytes each: active, iterations, salt[32], key_offset_sector, stripes
LUKS_DAMAGE: list[tuple[str, list[tuple[int, bytes]], str | None]] = [
    ("magic", [(0, b"LUKZ")], "Volume is not in LUKS format"),
    ("version 2", [(6, b"\0\2")], "LUKS version 2 is not supported"),
    ("cipher name without NUL", [(8, b"a" * 32)], "LUKS header cipher name is not NUL terminated"),
    ("cipher mode without NUL", [(40, b"b" * 32)], "LUKS header cipher mode is not NUL terminated"),
    ("hash spec without NUL", [(72, b"c" * 32)], "LUKS header hash spec is not NUL terminated"),
    ("payload in the header", [(104, _u32(7))], "LUKS payload is overlapping with the header"),
    ("master key iterations 0", [(164, _u32(0))], "LUKS key iteration count is zero"),
    ("slot 0 stripes", [(_SLOT + 44, _u32(0xFFFFFFFF))], "Keyslot 0 is corrupted (stripes -1 != 4000)"),
    ("slot 1 state", [(_SLOT + 48, _u32(5))], "Keyslot 1 state (active/disable) is corrupted"),
    ("slot 0 iterations 0", [(_SLOT + 4, _u32(0))], "Keyslot 0 iteration count is zero"),
    ("slot 2 on slot 0", [(_SLOT + 96 + 40, _u32(9))], "Keyslots 0 and 2 are overlapping in the header"),
    ("slot 0 in the header", [(_SLOT + 40, _u32(1))], "Keyslot 0 is overlapping with the LUKS header"),
    ("slot into the payload", [(_SLOT + 7 * 48 + 40, _u32(0x10000))],
     "Keyslot 7 is overlapping with the encrypted payload"),
    ("slot end wraps at 2^32 sectors", [(_SLOT + 7 * 48 + 40, _u32(0xFFFFFF00))], None),  # QEMU's unsigned sum
    ("key bytes 2^30", [(108, _u32(1 << 30))], "Algorithm 'aes' with key size 536870912 bytes not supported"),
    ("key bytes 48 (xts: aes-192)", [(108, _u32(48))], None),
    ("mode without IV generator", [(40, b"xts".ljust(32, b"\0"))], "Unexpected cipher mode string format 'xts'"),
    ("mode in capitals", [(40, b"XTS-plain64".ljust(32, b"\0"))], "Cipher mode 'XTS' not supported"),
    ("unknown IV generator", [(40, b"xts-foo".ljust(32, b"\0"))], "IV generator 'foo' not supported"),
    ("unknown IV hash", [(40, b"xts-plain:bar".ljust(32, b"\0"))], "Hash algorithm 'bar' not supported"),
    ("IV hash ignored by plain", [(40, b"xts-plain:sha1".ljust(32, b"\0"))], None),
    ("cbc with xts's key size", [(40, b"cbc-plain64".ljust(32, b"\0"))],
     "Algorithm 'aes' with key size 64 bytes not supported"),
    ("essiv without hash", [(40, b"cbc-essiv".ljust(32, b"\0")), (108, _u32(32))],
     "Missing IV generator hash specification"),
    ("essiv:md5 (aes-128)", [(40, b"xts-essiv:md5".ljust(32, b"\0"))], None),
    ("essiv:sha512", [(40, b"xts-essiv:sha512".ljust(32, b"\0"))], "No AES cipher with key size 64 available"),
    ("hash in capitals", [(72, b"SHA256".ljust(32, b"\0"))], "Hash algorithm 'SHA256' not supported"),
    ("cast5 with essiv", [(8, b"cast5".ljust(32, b"\0")), (40, b"cbc-essiv:sha256".ljust(32, b"\0")), (108, _u32(16))],
     "Cipher cast5-128 not supported with essiv"),
]


def _luks_copy(samples: Any, tmp_path: Path, patches: list[tuple[int, bytes]]) -> Path:
    from qinspect.qcow2.image import open_image

    src = samples.path("luks")
    with open_image(str(src)) as img:
        assert img.header.crypto_ext is not None
        lo = img.header.crypto_ext.offset
    data = bytearray(src.read_bytes())
    for off, b in patches:
        data[lo + off : lo + off + len(b)] = b
    out = tmp_path / "damaged.qcow2"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(("what", "patches", "reason"), LUKS_DAMAGE, ids=[d[0] for d in LUKS_DAMAGE])
def test_luks_header_refused_like_qemu(samples: Any, tmp_path: Path, what: str,
                                       patches: list[tuple[int, bytes]], reason: str | None) -> None:
    """qinspect refuses a damaged LUKS header at open (every command) for QEMU's reason, and
    qemu-img info, which needs no key, says the same where it is installed."""
    from qinspect.qcow2.errors import Qcow2Error
    from qinspect.qcow2.image import open_image

    path = _luks_copy(samples, tmp_path, patches)
    with open_image(str(path)) as img:
        if reason is None:
            img.require_openable()
        else:
            with pytest.raises(Qcow2Error, match=re.escape(reason)):
                img.require_openable()
    if runner.QEMU_IMG is not None:
        r = subprocess.run([runner.QEMU_IMG, "info", "-U", "-f", "qcow2", path.name], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
        assert (r.returncode, r.stderr.strip().split("': ", 1)[-1] if r.returncode else None) == \
            (0 if reason is None else 1, reason)
        ours, (theirs, why) = runner.qinspect_exit_codes(str(path)), runner.qemu_exit_codes(str(path))
        if why is runner.NotCompared.KEY_DOES_NOT_UNLOCK:
            # a valid header whose cipher parameters changed: the passphrase derives another key,
            # which qemu-img's map and check need and qinspect does not; info needs none either way
            assert reason is None and ours["info"] == 0
        else:
            assert why is None and ours == theirs


def test_luks_keyslot_corrupt_golden(samples: Any) -> None:
    """The sample for the rule: qinspect's refusal is qemu-img info's golden line."""
    from qinspect.qcow2.errors import Qcow2Error
    from qinspect.qcow2.image import open_image

    golden = samples.golden("luks_keyslot_corrupt", "info.stderr").read_text().strip()
    reason = golden.split("': ", 1)[1]
    with open_image(str(samples.path("luks_keyslot_corrupt"))) as img, \
            pytest.raises(Qcow2Error, match=re.escape(reason)):
        img.require_openable()


@pytest.mark.skipif(runner.QEMU_IMG is None, reason="qemu-img not installed")
def test_qemu_img_answers_on_a_backing_loop(samples: Any, tmp_path: Path) -> None:
    """An image that is its own backing file: qemu-img recurses until a resource runs out; with
    runner.QEMU_NOFILE descriptors it answers at once ("Too many open files", exit 1), and
    qinspect (which detects the loop) agrees. info does not open the backing chain: exit 0."""
    src = samples.path("dup_base")
    path = tmp_path / src.name
    data = bytearray(src.read_bytes())
    name = path.name.encode()
    off = 0x800  # past the header extensions of the sample
    assert not any(data[off : off + len(name)])
    data[off : off + len(name)] = name
    data[8:16] = off.to_bytes(8, "big")
    data[16:20] = len(name).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    theirs, why = runner.qemu_exit_codes(str(path))
    assert why is None and theirs == {"info": 0, "map": 1, "check": 1}
    assert time.monotonic() - t0 < 10
    assert runner.qinspect_exit_codes(str(path)) == theirs


# -- memory regressions (issue 10) ---------------------------------------------------------------------
def _peak_rss_mib(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Peak RSS of a child process (MiB) and its stderr: the child's own maximum, via wait4."""
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read() if p.stderr is not None else ""
    _pid, _status, usage = os.wait4(p.pid, 0)
    p.returncode = 0
    return usage.ru_maxrss >> 10, err


@pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                    reason="qemu-img/qemu-io not installed")
def test_check_memory_follows_distinct_messages(tmp_path: Path) -> None:
    """Seed 23 case 38: l1_size 0x1 -> 0x100001 on an image with 1 MiB clusters makes the L1 table
    run over data clusters written with one byte pattern; QEMU opens it (l1_size <= 4 Mi entries)
    and its check prints several lines per garbage L1 entry, most of them equal. qinspect's check
    kept one message object (and one text) per line: 688 MiB of growth for an 8 MiB file. Equal
    messages are one shared object now; the lines printed are unchanged (qemu-img's, where the
    comparison is made)."""
    import struct
    import sys

    path = tmp_path / "l1_over_data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path), "16M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xc3 1M 1M", str(path)], check=True,
                   capture_output=True)
    clean = tmp_path / "clean.qcow2"
    shutil.copyfile(path, clean)
    with open(path, "r+b") as f:
        f.seek(36)
        assert struct.unpack(">I", f.read(4)) == (1,)
        f.seek(36)
        f.write(struct.pack(">I", 0x100001))
    cmd = [sys.executable, "-c", "import sys; from qinspect.cli import main; sys.exit(main())", "check"]
    base, _ = _peak_rss_mib([*cmd, clean.name], tmp_path)
    peak, err = _peak_rss_mib([*cmd, path.name], tmp_path)
    lines = err.splitlines()
    assert len(lines) > 500_000  # ~4 lines per garbage L1 entry (128 Ki of them)
    budget = 2 * (path.stat().st_size >> 20) + 150  # issue 10: 2 x metadata + 150 MiB
    assert peak - base < budget, f"check grew by {peak - base} MiB (budget {budget} MiB)"
    theirs = subprocess.run(["qemu-img", "check", path.name], cwd=tmp_path, capture_output=True, text=True,
                            check=False)
    assert [ln.replace("qinspect: ", "qemu-img: ", 1) for ln in lines] == theirs.stderr.splitlines()
