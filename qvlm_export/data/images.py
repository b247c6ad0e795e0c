"""Opening user images (generate --image, JSONL data manifests) with one-line errors.

Only the header is read before the size check, so a decompression bomb (a small file that
decodes to gigabytes, e.g. a 16000x16000 PNG) is refused before any pixel is allocated.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import QvlmError

# Pillow's own bomb threshold (~89 Mpx, 0.27 GB as RGB); vision towers resize to <= 1 Mpx anyway.
MAX_PIXELS = 89_478_485


def open_image(path: str | Path, where: str = "image") -> Image.Image:
    """The first frame of ``path`` as an 8-bit RGB image, or a one-line :class:`QvlmError`."""
    shown = repr(str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, in one line
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise QvlmError(f"{where} {shown} is {width}x{height} pixels, over the {MAX_PIXELS // 10**6} Mpx "
                                    "limit (decompression-bomb guard); downscale it first")
                return _to_rgb(im)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise QvlmError(f"{where} {shown} does not exist") from None
    except Image.DecompressionBombError:
        raise QvlmError(f"{where} {shown} is over the {MAX_PIXELS // 10**6} Mpx limit (decompression-bomb guard); "
                        "downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow raises these for truncated or corrupt files (ValueError also for a NUL in the path)
        raise QvlmError(f"{where} {shown} is unreadable ({type(exc).__name__}); pass a PNG or JPEG file") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any mode. Pillow clips 16-bit greyscale at 255 (nearly all white); scale it instead."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return im.convert("RGB")
    import numpy as np

    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F":  # float images: 0..1 or 0..255 by convention
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    else:  # 16-bit full scale 0..65535 -> 0..255
        a = np.clip(a, 0, 65535) / 257.0
    return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), mode="L").convert("RGB")
