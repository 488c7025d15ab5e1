"""Opening an image the way the qemu-img-like commands do: refuse what QEMU refuses to open.

One place for this rule, shared by the commands (`info`, `map`, `check`, ...) and by `scan`, which
inspects many images in one process and must report exactly what each command would.
"""

from __future__ import annotations

from qinspect.qcow2.image import Image, open_image


def open_checked(path: str, need_files: bool = False, check: bool = False) -> Image:
    """Open like qemu-img does: fail on anything QEMU would refuse to open.

    With `need_files` (map, check), also fail when a backing file or the external data file cannot
    be opened, before any output, as qemu-img map and check do (qemu-img info does not need them).
    With `check`, open the image itself as qemu-img check does (BDRV_O_CHECK).
    """
    img = open_image(path)
    try:
        img.require_openable(check=check)
        if need_files:
            require_files(img, check=check)
    except Exception:
        img.close()
        raise
    return img


def require_files(img: Image, check: bool = False) -> None:
    """Raise `Qcow2Error` when a layer of `img`'s backing chain or an external data file cannot be
    opened; with `check`, `img` itself is held to qemu-img check's rules, its backing files to a
    normal open's."""
    for layer in img.chain():
        if isinstance(layer, Image):
            layer.require_openable(check=check and layer is img)
            layer.data_file()


__all__ = ["open_checked", "require_files"]
