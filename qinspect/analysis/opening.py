"""Opening an image the way the qemu-img-like commands do: refuse what QEMU refuses to open.

One place for this rule, shared by the commands (`info`, `map`, `check`, ...) and by `scan`, which
inspects many images in one process and must report exactly what each command would.
"""

from __future__ import annotations

from qinspect.qcow2.image import Image, open_image


def open_checked(path: str, need_files: bool = False) -> Image:
    """Open like qemu-img does: fail on anything QEMU would refuse to open.

    With `need_files` (map, check), also fail when a backing file or the external data file cannot
    be opened, before any output, as qemu-img map and check do (qemu-img info does not need them).
    """
    img = open_image(path)
    try:
        img.require_openable()
        if need_files:
            require_files(img)
    except Exception:
        img.close()
        raise
    return img


def require_files(img: Image) -> None:
    """Raise `Qcow2Error` when a backing file or an external data file of `img` cannot be opened."""
    for layer in img.chain():
        if isinstance(layer, Image):
            layer.require_openable()
            layer.data_file()


__all__ = ["open_checked", "require_files"]
