"""What the qemu-img-like commands require of a backing chain before they print anything.

One place for this rule, shared by `qinspect map/check` (qinspect.cli.core_cmds.open_checked) and
by `scan`, which inspects many images in one process and must fail an image exactly where the
per-image command would. Metadata only: importing this module imports no numpy.
"""

from __future__ import annotations

from qinspect.qcow2.meta import ImageMeta


def require_files(img: ImageMeta, check: bool = False) -> None:
    """Raise `Qcow2Error` when a layer of `img`'s backing chain or an external data file cannot be
    opened, as qemu-img map and check fail; with `check`, every layer is held to qemu-img check's
    open rules (BDRV_O_CHECK, which the backing files inherit: qemu-img check opens an image whose
    backing file has no refcount table or a bad snapshot table pointer, map does not)."""
    for layer in img.chain():
        if isinstance(layer, ImageMeta):
            layer.require_openable(check=check)
            layer.data_file()


__all__ = ["require_files"]
