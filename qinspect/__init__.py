"""qinspect: see where a qcow2 image's bytes are and why it is slow.

The package is layered: `qcow2` parses bytes (read-only), `analysis` answers questions about an
image, `cli` prints answers, `tui` shows them. Only `open_image` and the error type are re-exported
here; importing them does not import Textual or Rich.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Image", "Qcow2Error", "__version__", "open_image"]

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing at start-up; mypy knows the name)
if TYPE_CHECKING:
    from qinspect.qcow2.errors import Qcow2Error
    from qinspect.qcow2.image import Image, open_image


def __getattr__(name: str) -> object:
    """Import the core lazily so `import qinspect` stays cheap."""
    if name in ("open_image", "Image"):
        from qinspect.qcow2 import image

        return getattr(image, name)
    if name == "Qcow2Error":
        from qinspect.qcow2.errors import Qcow2Error

        return Qcow2Error
    raise AttributeError(name)
