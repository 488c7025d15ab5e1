"""LVM2 physical volumes: recognised by their label (`LABELONE` / `LVM2 001` in the first four sectors).

Mapping the logical volumes through the text metadata's segments is not implemented yet: the PV is
reported as `LVM2_member` with a problem saying so, and its space is not counted as free.
"""

from __future__ import annotations

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Volume


def logical_volumes(pv: VolumeReader, pv_volume: Volume) -> list[Volume]:
    """The logical volumes in the PV (none yet: see the module docstring)."""
    del pv
    pv_volume.problems.append("LVM2 physical volume: its logical volumes are not mapped by this version of "
                              "qinspect (free space inside them is not counted)")
    return []
