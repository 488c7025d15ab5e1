"""Finding `guest-freed`: named with per-volume numbers, its fix predicted and checked by doing it
(on a copy, the guest's fstrim simulated by qemu-io discards of the free ranges)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from qinspect.analysis.diagnose import diagnose
from qinspect.guest import inspect_guest
from qinspect.qcow2.image import open_image
from tests.guest.conftest import GuestSamples
from tests.guest.test_guest import discard_free_ranges


def test_guest_freed_finding_and_its_fix(guest_samples: GuestSamples, tmp_path: Path) -> None:
    copy = tmp_path / "cloud.qcow2"
    subprocess.run(["cp", "--sparse=never", str(guest_samples.image("cloud")), str(copy)], check=True)
    out = subprocess.run(["qinspect", "diagnose", "--output=json", str(copy)], check=True, capture_output=True,
                         text=True).stdout
    doc = json.loads(out)
    (f,) = [f for f in doc["findings"] if f["id"] == "guest-freed"]
    with open_image(copy) as img:
        view = inspect_guest(img)
    ev = f["evidence"]
    assert ev["reclaimable-bytes"] == view.reclaimable_bytes > 0
    assert ev["part2-filesystem"] == "ext4"
    assert ev["part2-reclaimable-bytes"] == view.reclaimable_bytes
    assert ev["part1-reclaimable-bytes"] == 0
    # The deleted directory, to within one cluster per deleted file (see test_guest).
    assert abs(ev["part2-reclaimable-bytes"] - guest_samples.entry("cloud")["deleted-bytes"]) < 0.05 * ev[
        "part2-reclaimable-bytes"]
    online = f["fix"]
    assert online["command"] == "fstrim -av" and online["in-guest"] is True
    assert "discard='unmap'" in online["note"] and "discard=unmap" in online["note"]
    assert f"virt-sparsify --in-place {copy}" in online["note"]
    usage = doc["space"]["allocated-size"]
    assert online["predicts"]["disk-usage"] == usage - view.reclaimable_disk_usage
    # The space breakdown splits guest data into in use / freed, still adding up to the file size.
    parts = doc["space"]["parts"]
    assert parts["guest-freed"] == view.reclaimable_bytes
    assert sum(parts.values()) == doc["space"]["file-size"]
    assert sum(doc["space"]["allocated-parts"].values()) == doc["space"]["allocated-size"]
    # Do the fix: the guest's fstrim through discard=unmap.
    discard_free_ranges(copy, view)
    with open_image(copy) as img:
        after = diagnose(img).space.allocated_size
    # st_blocks also counts the host filesystem's extent-tree blocks, which punching holes can add:
    # allow one block per 64 discarded ranges, no more.
    slack = 4096 * (1 + sum(len(v.free_disk) for v in view.volumes if v.free_disk is not None) // 64)
    assert 0 <= after - online["predicts"]["disk-usage"] <= slack
    with open_image(copy) as img:
        assert all(x.id != "guest-freed" for x in diagnose(img).findings)


def test_guest_freed_fix_survives_the_metacharacter_test(guest_samples: GuestSamples, tmp_path: Path) -> None:
    """The guest-freed finding under a file name full of shell syntax: its command (`fstrim -av`,
    run in the guest) and the offline alternative in its note (`virt-sparsify --in-place IMAGE`)
    parse under `bash -n`, give back their argv word for word, and run nothing; a name that cannot
    be pasted (a newline) gets no offline command at all."""
    from pasteable import NASTY_NAME, assert_pasteable

    nasty = tmp_path / ("cloud " + NASTY_NAME)
    subprocess.run(["cp", "--sparse=always", str(guest_samples.image("cloud")), str(nasty)], check=True)
    with open_image(nasty) as img:
        (f,) = [f for f in diagnose(img).findings if f.id == "guest-freed"]
    assert f.fix is not None and f.fix.command == "fstrim -av"
    assert_pasteable(f.fix.command, tmp_path)
    assert f.fix.note is not None
    offline = f.fix.note.split("offline alternative, VM stopped: ", 1)[1]
    assert_pasteable(offline, tmp_path)
    assert shlex.split(offline) == ["virt-sparsify", "--in-place", str(nasty)]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()

    newline = tmp_path / "cloud\nrm -rf ~.qcow2"
    nasty.rename(newline)
    with open_image(newline) as img:
        (f,) = [f for f in diagnose(img).findings if f.id == "guest-freed"]
    assert f.fix is not None and f.fix.note is not None
    assert "rename the image first" in f.fix.note and "rm -rf" not in f.fix.note
