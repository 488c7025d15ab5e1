"""`qemu-img info` as data: the ImageInfo JSON of QEMU 7.2 for a qcow2 image or a raw layer.

It needs only metadata (`ImageMeta`: no tables, no numpy), so `qinspect info` starts fast; an
`Image` works as well.
"""

from __future__ import annotations

from qinspect.qcow2.meta import ImageMeta, MetaLayer, RawLayer


def snapshot_info(img: ImageMeta) -> list[dict[str, object]]:
    """The `snapshots` array of qemu-img info."""
    out: list[dict[str, object]] = []
    for sn in img.snapshots:
        d: dict[str, object] = {}
        if sn.icount is not None:
            d["icount"] = sn.icount
        d.update({
            "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
            "name": sn.name,
            "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
            "id": sn.id_str,
            "vm-state-size": sn.vm_state_size,
        })
        out.append(d)
    return out


def format_specific(img: ImageMeta) -> dict[str, object]:
    """`format-specific.data` (ImageInfoSpecificQCow2)."""
    h = img.header
    data: dict[str, object]
    if h.version == 2:
        data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": h.refcount_bits}
    else:
        data = {"compat": "1.1", "compression-type": h.compression_name, "lazy-refcounts": h.lazy_refcounts}
        bitmaps = img.active_bitmaps
        if bitmaps:
            data["bitmaps"] = [{"flags": b.flag_names, "name": b.name, "granularity": b.granularity} for b in bitmaps]
        data["refcount-bits"] = h.refcount_bits
        if h.data_file:
            data["data-file"] = h.data_file
        if h.has_data_file:
            data["data-file-raw"] = h.data_file_raw
        data["corrupt"] = h.corrupt
        data["extended-l2"] = h.extended_l2
    if img.luks is not None:
        data["encrypt"] = img.luks.info_json()
    elif h.crypt_method == 1:
        data["encrypt"] = {"format": "aes"}
    return data


def image_info(layer: MetaLayer, filename: str | None = None) -> dict[str, object]:
    """The ImageInfo object qemu-img info --output=json prints for one layer."""
    name = filename if filename is not None else layer.path
    if isinstance(layer, RawLayer):
        return {"virtual-size": layer.virtual_size, "filename": name, "format": "raw",
                "actual-size": layer.file.allocated_size, "dirty-flag": False}
    assert isinstance(layer, ImageMeta)
    h = layer.header
    d: dict[str, object] = {}
    if layer.snapshots:
        d["snapshots"] = snapshot_info(layer)
    if h.backing_format:
        d["backing-filename-format"] = h.backing_format
    d["virtual-size"] = h.size
    d["filename"] = name
    d["cluster-size"] = h.cluster_size
    d["format"] = "qcow2"
    d["actual-size"] = layer.file.allocated_size
    if layer.encrypted:
        d["encrypted"] = True
    d["format-specific"] = {"type": "qcow2", "data": format_specific(layer)}
    if h.backing_file is not None:
        d["full-backing-filename"] = layer.backing_path
        d["backing-filename"] = h.backing_file
    d["dirty-flag"] = h.dirty
    return d


def chain_info(img: ImageMeta, filename: str | None = None) -> list[dict[str, object]]:
    """qemu-img info --backing-chain: one ImageInfo per layer, top first."""
    layers = img.chain()
    out = [image_info(img, filename)]
    for layer in layers[1:]:
        out.append(image_info(layer))
    return out
