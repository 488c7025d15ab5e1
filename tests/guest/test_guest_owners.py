"""Block -> file lookups (for the TUI's guest map) agree with debugfs icheck/ncheck and mtools."""

from __future__ import annotations

import re
import subprocess

from qinspect.guest import inspect_guest
from qinspect.guest.disk import DiskReader
from qinspect.guest.owners import build_owner_map
from qinspect.qcow2.image import open_image
from tests.guest.conftest import GuestSamples


def test_ext4_owner_matches_debugfs(guest_samples: GuestSamples) -> None:
    part = guest_samples.part_file("cloud", 2)
    with open_image(guest_samples.image("cloud")) as img:
        view = inspect_guest(img)
        vol = next(v for v in view.volumes if v.index == 2)
        calls: list[tuple[int, int]] = []
        om = build_owner_map(DiskReader(img), vol, progress=lambda d, t: calls.append((d, t)))
    assert len(om.names) == sum(1 for n in om.names if n.startswith("/"))
    assert any(n.startswith("/etc/zoneinfo/") for n in om.names) and calls
    assert not any(n.startswith("/usr/share/perl") for n in om.names)  # deleted, and debugfs left no names
    picks = [int(om.start[k]) for k in range(0, len(om.start), max(1, len(om.start) // 5))][:5]
    for off in picks:
        block = om.block(off)
        icheck = subprocess.run(["debugfs", "-R", f"icheck {block}", str(part)], capture_output=True, text=True).stdout
        inode = icheck.split("\n")[1].split()[1]
        ncheck = subprocess.run(["debugfs", "-R", f"ncheck {inode}", str(part)], capture_output=True, text=True).stdout
        path = re.split(r"\s+", ncheck.strip().split("\n")[1], maxsplit=1)[1]
        assert om.owner(off) == path
    # A block in the freed directory's reclaimable clusters is free: no owner.
    s, _e = view.reclaimable.pairs()[0]
    assert om.owner(s) is None


def test_fat_owner(guest_samples: GuestSamples) -> None:
    with open_image(guest_samples.image("cloud")) as img:
        view = inspect_guest(img)
        om = build_owner_map(DiskReader(img), view.volumes[0])
    assert om.names == ["/EFI/debian/grubx64.efi"]
    assert om.owner(int(om.start[0])) == "/EFI/debian/grubx64.efi"
    assert om.end[-1] - om.start[0] >= 300 * 1024
