"""Plain images (PNG, JPEG), such as TMA cores photographed or exported one per file.

An image holds no trustworthy scale (PNG pHYs and JPEG density are screen DPI, set by
whatever wrote the file), so ``mpp`` is always None and extraction needs ``--assume-mpp``.
The image is decoded once, whole, and served from memory as a single level; Pillow's
decompression-bomb limit stays in force, so a huge image is refused with a way out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore.schemas.errors import SlideError
from featurestore.slides.base import WHITE, ReaderError, SlideReader, composite

_FORMATS = {"PNG": "png", "JPEG": "jpeg"}


class ImageReader(SlideReader):
    """A PNG or JPEG read through Pillow; transparency is composited on the fill colour at read time."""

    backend = "pillow"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from PIL import Image

        try:
            with Image.open(self.path) as image:
                if image.format not in _FORMATS:
                    raise ReaderError(self.path, self.backend, f"it is {image.format}, not PNG or JPEG",
                                      "pass --reader auto to pick the reader by content")
                self._vendor = _FORMATS[image.format]
                mode = "RGBA" if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info else "RGB"
                self._pixels: np.ndarray | None = np.asarray(image.convert(mode))
        except Image.DecompressionBombError as err:
            raise ReaderError(self.path, self.backend, str(err).split(" could be")[0],
                              "convert it to a pyramidal TIFF (vips tiffsave --tile --pyramid)") from err
        except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for unreadable and truncated files
            raise ReaderError(self.path, self.backend, f"{type(err).__name__}: {err}",
                              "check the file is a complete PNG or JPEG") from err
        height, width = self._pixels.shape[:2]
        self._dims = ((width, height),)
        self._downsamples = (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        pixels = self._pixels
        if pixels is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")

        def window(x: int, y: int, w: int, h: int) -> np.ndarray:
            region = pixels[y:y + h, x:x + w]
            return composite(region, fill) if region.shape[2] == 4 else region

        return self._read_padded(location, level, size, fill, window)

    def close(self) -> None:
        self._pixels = None
