"""Guest rules: space the guest's filesystems have freed that the image still holds (`guest-freed`).

The numbers come from `qinspect.analysis.guest_freed` (each filesystem's own allocation map, read
through the image). The fix runs in the guest while the VM runs — enable discard
(libvirt `<driver discard='unmap'/>`, QEMU `-drive ...,discard=unmap`) and run `fstrim -av` — with
the offline alternative `virt-sparsify --in-place IMAGE` (VM stopped) in its note; both predict
disk usage = now − reclaimable. Thresholds are the space rules' (`space_rules.worth/severity`).
"""

from __future__ import annotations

from qinspect.analysis import guest_freed as g
from qinspect.analysis.findings.common import path_arg
from qinspect.analysis.findings.model import Category, Context, Finding, Fix
from qinspect.analysis.findings.registry import rule
from qinspect.analysis.findings.space_rules import severity, worth
from qinspect.shellquote import UnsafeArgument, command_line


@rule("guest-freed")
def guest_freed(c: Context) -> Finding | None:
    found = g.guest_freed(c.img, c.space)
    if found is None:
        return None
    g.split_space(c.space, found)
    if not worth(found.reclaimable_disk_usage, c.disk_usage):
        return None
    try:
        offline = command_line(["virt-sparsify", "--in-place", path_arg(c.path)])
    except UnsafeArgument:
        offline = "virt-sparsify --in-place IMAGE (rename the image first: its name holds control characters)"
    predicts: dict[str, int | float | str] = {"file-size": c.file_size, "disk-usage": found.disk_usage_after}
    fix = Fix(["fstrim", "-av"], True, predicts,
              note=("in the guest, after enabling discard: libvirt <driver ... discard='unmap'/> or QEMU "
                    f"-drive ...,discard=unmap; offline alternative, VM stopped: {offline}"),
              in_guest=True)
    return Finding(g.PART, severity(found.reclaimable_disk_usage, c.disk_usage), g.title(found), g.evidence(found),
                   g.impact(found), fix, Category.SPACE)
