"""Images for worker threads (imports no numpy: the session holds a pool before the first frame).

Every image of the pool shares one parse of the file's metadata (`SharedMetadata`: header,
snapshot table, bitmap directory, backing chain, L1 and refcount tables) and has a file descriptor
and caches of its own; an image opened after the file was replaced or changed parses it afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qinspect.qcow2.image import Image
    from qinspect.qcow2.meta import SharedMetadata


class ImagePool:
    """Images for worker threads. `Image` keeps LRU caches and is not thread-safe, so every
    thread borrows an image of its own (opening one more when all are busy), sharing `metadata`."""

    def __init__(self, path: str, metadata: SharedMetadata | None = None) -> None:
        self.path = path
        self.metadata = metadata
        self._free: list[Image] = []
        self._all: list[Image] = []
        self._lock = threading.Lock()
        self._generation = 0

    def open(self) -> Image:
        """One more image of the file (subclasses check that it is still the same file)."""
        from qinspect.qcow2.image import open_image

        return open_image(self.path, metadata=self.metadata)

    @contextmanager
    def borrow(self) -> Iterator[Image]:
        with self._lock:
            img = self._free.pop() if self._free else None
            generation = self._generation
        if img is None:
            img = self.open()
            with self._lock:
                self._all.append(img)
        try:
            yield img
        finally:
            with self._lock:
                if generation == self._generation:
                    self._free.append(img)
                else:
                    img.close()
                    self._all.remove(img)

    def reset(self, metadata: SharedMetadata | None = None) -> None:
        """Drop the idle images (the file changed: their caches are stale); busy ones go when returned.
        Images opened from now on share `metadata` (that of the file as it is now)."""
        with self._lock:
            self.metadata = metadata
            for img in self._free:
                img.close()
                self._all.remove(img)
            self._free.clear()
            self._generation += 1

    def close(self) -> None:
        with self._lock:
            for img in self._all:
                img.close()
            self._all.clear()
            self._free.clear()


__all__ = ["ImagePool"]
