"""Image decode through Pillow, normalised to what the tokenizers take: uint8 (H, W), (H, W, 3) or
(H, W, 4), upright.

Pillow opens PNG, JPEG, WebP, GIF (the first frame), BMP and TIFF. Normalisation:
  - EXIF orientation is applied (a phone photo stored sideways comes out the way it is shown);
  - palette (P) images become RGB, or RGBA when the palette has transparency;
  - CMYK and YCbCr become RGB; LA becomes RGBA (grey repeated);
  - 16-bit and 32-bit integer images (I;16, I) are scaled to 8 bits by their type's range, float
    (F) images by their own min..max; 1-bit images become 0/255.
`needs_reencode` says whether the stored bytes can stay as given (a plain 8-bit JPEG or PNG whose
pixels are already what the reader decodes) or must be stored as the normalised PNG.
"""
from __future__ import annotations

import io

import numpy as np

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
STORED_AS_GIVEN = {"PNG": "png", "JPEG": "jpg"}


class ImageError(ValueError):
    """Bytes that do not decode as an image; the message says why."""


def _to_8bit(im) -> np.ndarray:
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("L", "RGB", "RGBA"):
        return np.array(im)
    if mode == "1":
        return np.array(im.convert("L"))
    if mode == "P" or mode == "PA":
        return np.array(im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB"))
    if mode == "LA":
        return np.array(im.convert("RGBA"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(im.convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        arr = np.array(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        return np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
    if mode == "F":
        arr = np.array(im).astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        return np.round((arr - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
    try:
        return np.array(im.convert("RGB"))
    except Exception as e:
        raise ImageError(f"image mode {mode!r} has no conversion to RGB ({e})") from e


def decode_image(data: bytes) -> tuple[np.ndarray, dict]:
    """(uint8 array, info): info has `format`, `mode` (as stored), `exif_transposed` and `needs_reencode`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # an animated GIF or WebP: the first frame
            im.load()   # forces the full decode: a truncated file fails here, not later
            fmt, mode = im.format, im.mode
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            arr = _to_8bit(im)
    except ImageError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), SyntaxError (bad PNG chunk)
        raise ImageError(f"{type(e).__name__}: {e}") from e
    transposed = orientation not in (1, None)
    plain = fmt in STORED_AS_GIVEN and mode in ("L", "RGB", "RGBA") and not transposed
    return arr, {"format": fmt, "mode": mode, "exif_transposed": transposed, "needs_reencode": not plain}
