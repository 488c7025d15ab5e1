"""The qcow2 parser's public face: what the layers above (guest, analysis, cli, tui) may use.

Everything listed in `__all__` is supported API; the submodules' other names (and every `_name`)
are internal. Names are loaded on first use (PEP 562), so `import qinspect.qcow2` costs nothing
and the metadata path (`open_meta`, `ImageMeta`, `fields`, `constants`) never imports numpy.

- Opening: `open_image` / `Image` (tables, guest reads, extents), `open_meta` / `ImageMeta` (what
  `qemu-img info` reads, and the backing chain), `Layer`, `MetaLayer`, `RawLayer`. More images of
  one file (one per thread) share one parse: `img.reopen()`, or `open_image(path, metadata=
  img.shared_metadata())` (`SharedMetadata`; a replaced or changed file is parsed afresh).
- Readers on `Image`: `read_table` (L1, refcount table), `snapshot_l1_table`, `read_l2_table`,
  `read_l2_batch` (the L2 tables of a range of L1 entries), `read_l2_nonzero` (the non-zero
  entries of many L2 tables, read in one host-order sweep), `read_l2_tables` (L2 tables at given
  offsets), `refcount_block`, `stored_refcounts`, `extents`, `lookup`, `read`.
- Records: `Header`, `HeaderExtension`, `Snapshot`, `Bitmap`, `LuksHeader`, ...; their byte
  layouts in `fields`, the format's constants (QEMU's names) in `constants`.
- Entries: `ClusterType`, `SubclusterType`, `L2Format` and the scalar and vectorised classifiers.
- Errors: `Qcow2Error`, `EncryptedDataError`, `Problem`, `Severity`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    from qinspect.qcow2 import constants, fields
    from qinspect.qcow2.bitmaps import Bitmap, read_bitmap_table
    from qinspect.qcow2.errors import EncryptedDataError, Problem, Qcow2Error, Severity
    from qinspect.qcow2.extents import ERROR_MESSAGES, ExtentError, Extents
    from qinspect.qcow2.header import BitmapsExtension, CryptoHeaderExtension, FeatureName, Header, HeaderExtension
    from qinspect.qcow2.hostfile import FileIdentity, HostFile, InUse
    from qinspect.qcow2.image import Image, L2Lookup, open_image
    from qinspect.qcow2.l2 import (
        ClusterType,
        CompressedDescriptor,
        L2Format,
        SubclusterType,
        classify_cluster,
        classify_clusters,
        classify_subcluster,
        classify_subclusters_at,
        invalid_bitmaps,
        parse_compressed,
        uniform_bitmaps,
    )
    from qinspect.qcow2.luks import LuksHeader, LuksKeySlot
    from qinspect.qcow2.meta import (
        ImageMeta,
        Layer,
        MetaLayer,
        RawLayer,
        SharedMetadata,
        open_meta,
        resolve_backing_path,
    )
    from qinspect.qcow2.refcount import decode_refcount_block, refcount_entry_location
    from qinspect.qcow2.snapshots import Snapshot, SnapshotTable

_WHERE: dict[str, str] = {
    "constants": "", "fields": "",
    "Bitmap": "bitmaps", "read_bitmap_table": "bitmaps",
    "EncryptedDataError": "errors", "Problem": "errors", "Qcow2Error": "errors", "Severity": "errors",
    "ERROR_MESSAGES": "extents", "ExtentError": "extents", "Extents": "extents",
    "BitmapsExtension": "header", "CryptoHeaderExtension": "header", "FeatureName": "header", "Header": "header",
    "HeaderExtension": "header",
    "FileIdentity": "hostfile", "HostFile": "hostfile", "InUse": "hostfile",
    "Image": "image", "L2Lookup": "image", "open_image": "image",
    "ClusterType": "l2", "CompressedDescriptor": "l2", "L2Format": "l2", "SubclusterType": "l2",
    "classify_cluster": "l2", "classify_clusters": "l2", "classify_subcluster": "l2",
    "classify_subclusters_at": "l2", "invalid_bitmaps": "l2", "parse_compressed": "l2", "uniform_bitmaps": "l2",
    "LuksHeader": "luks", "LuksKeySlot": "luks",
    "ImageMeta": "meta", "Layer": "meta", "MetaLayer": "meta", "RawLayer": "meta", "SharedMetadata": "meta",
    "open_meta": "meta",
    "resolve_backing_path": "meta",
    "decode_refcount_block": "refcount", "refcount_entry_location": "refcount",
    "Snapshot": "snapshots", "SnapshotTable": "snapshots",
}

__all__ = [
    "ERROR_MESSAGES",
    "Bitmap",
    "BitmapsExtension",
    "ClusterType",
    "CompressedDescriptor",
    "CryptoHeaderExtension",
    "EncryptedDataError",
    "ExtentError",
    "Extents",
    "FeatureName",
    "FileIdentity",
    "Header",
    "HeaderExtension",
    "HostFile",
    "Image",
    "ImageMeta",
    "InUse",
    "L2Format",
    "L2Lookup",
    "Layer",
    "LuksHeader",
    "LuksKeySlot",
    "MetaLayer",
    "Problem",
    "Qcow2Error",
    "RawLayer",
    "Severity",
    "SharedMetadata",
    "Snapshot",
    "SnapshotTable",
    "SubclusterType",
    "classify_cluster",
    "classify_clusters",
    "classify_subcluster",
    "classify_subclusters_at",
    "constants",
    "decode_refcount_block",
    "fields",
    "invalid_bitmaps",
    "open_image",
    "open_meta",
    "parse_compressed",
    "read_bitmap_table",
    "refcount_entry_location",
    "resolve_backing_path",
    "uniform_bitmaps",
]


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'qinspect.qcow2' has no attribute {name!r}")
    import importlib  # (here, not at the top: `info` imports this package and never needs it)

    if where == "":
        return importlib.import_module(f"qinspect.qcow2.{name}")
    value = getattr(importlib.import_module(f"qinspect.qcow2.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
