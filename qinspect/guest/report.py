"""The JSON form of a `GuestView` (what `qinspect guest --output=json` prints).

The keys the issue fixes come first (`partition-table`, `volumes` with `index`, `start`,
`length`, `filesystem`, `block-size`, `free-bytes`, `reclaimable-bytes`, and the total
`reclaimable-bytes`); the others describe volumes and layers further.
"""

from __future__ import annotations

from qinspect.guest.model import GuestView, Volume


def volume_json(v: Volume) -> dict[str, object]:
    fs = v.fs
    out: dict[str, object] = {
        "index": v.index,
        "start": v.start,
        "length": v.length,
        "filesystem": v.filesystem.value if v.filesystem else None,
        "block-size": fs.block_size if fs else None,
        "free-bytes": v.free_bytes,
        "reclaimable-bytes": v.reclaimable_bytes,
        "kind": v.kind.value,
    }
    if v.type_name is not None:
        out["type"] = v.type_name
    if v.name is not None:
        out["name"] = v.name
    if fs is not None:
        if fs.label is not None:
            out["label"] = fs.label
        if fs.uuid is not None:
            out["uuid"] = fs.uuid
        if fs.size_bytes is not None:
            out["filesystem-size"] = fs.size_bytes
        if v.used_bytes is not None:
            out["used-bytes"] = v.used_bytes
        if fs.note:
            out["note"] = fs.note
        if fs.detail:
            out["detail"] = dict(fs.detail)
    if len(v.reclaimable_by_layer) > 1:
        out["reclaimable-bytes-by-layer"] = list(v.reclaimable_by_layer)
    if len(v.segments) > 1:
        out["segments"] = [{"volume-offset": s.volume_offset, "disk-offset": s.disk_offset, "length": s.length}
                           for s in v.segments]
    if v.parent is not None:
        out["parent-index"] = v.parent
    out["problems"] = list(v.problems)
    return out


def guest_json(view: GuestView) -> dict[str, object]:
    return {
        "partition-table": view.partition_table.value if view.partition_table else None,
        "volumes": [volume_json(v) for v in view.volumes],
        "reclaimable-bytes": view.reclaimable_bytes,
        "reclaimable-disk-usage": view.reclaimable_disk_usage,
        "virtual-size": view.virtual_size,
        "cluster-size": view.cluster_size,
        "free-bytes": view.free_bytes,
        "layers": [{"filename": layer.path, "depth": layer.depth, "reclaimable-bytes": layer.reclaimable_bytes,
                    "reclaimable-disk-usage": layer.disk_usage_bytes}
                   for layer in view.layers],
        "problems": list(view.problems),
    }
