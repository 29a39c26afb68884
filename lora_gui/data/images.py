"""Open any image a person is likely to drop into a dataset and turn it into plain RGB.

Every failure becomes an ``ImageLoadError`` that names the file and says what is wrong,
so a scan can skip the file with one log line instead of crashing a run later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own decompression-bomb limit (about 9459 x 9459); larger images are refused.
MAX_PIXELS = 89_478_485
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class ImageLoadError(ValueError):
    """An image file that cannot be used; ``reason`` is written for the person who owns it.

    ``code`` names the kind of failure for reports: ``empty_file``, ``not_an_image``,
    ``decompression_bomb``, ``truncated`` or ``unreadable``.
    """

    def __init__(self, path: str | Path, reason: str, code: str = "unreadable"):
        self.path = Path(path)
        self.reason = reason
        self.code = code
        super().__init__(f"{self.path}: {reason}")


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) after checking the file is non-empty, readable and not a bomb."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "the file is empty (0 bytes); delete it or copy it again", "empty_file")
        image = Image.open(path)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            path, f"{str(exc).rstrip('.')}; downscale it or remove it", "decompression_bomb"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            path,
            "not an image Pillow can read (corrupt, or another kind of file); replace or delete it",
            "not_an_image",
        ) from None
    except Exception as exc:
        raise ImageLoadError(path, f"cannot be opened ({exc}); check its permissions or copy it again") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            path,
            f"{width} x {height} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
            "(a guard against decompression bombs); downscale it or remove it",
            "decompression_bomb",
        )
    return image


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation; decodes the first frame so broken files fail now."""
    with open_image(path, max_pixels) as image:
        width, height = image.size
        swapped = exif_orientation(image) in _SWAPS_SIDES
        if image.format == "JPEG":
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # fast reduced decode
        decode_first_frame(image, path)
    return (height, width) if swapped else (width, height)


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The first frame, upright (EXIF orientation applied), as 8-bit RGB with alpha over white."""
    with open_image(path, max_pixels) as image:
        decode_first_frame(image, path)
        try:
            return to_rgb(upright(image))
        except Exception as exc:
            raise ImageLoadError(path, f"cannot be converted to RGB ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit and float scaled to 8-bit, transparency composited on white."""
    if image.mode in HIGH_BIT_MODES:
        image = _high_bit_to_gray(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_first_frame(image: Image.Image, path: str | Path) -> None:
    """Decode the first frame now, so a truncated or corrupt file fails here with a clear reason."""
    try:
        image.seek(0)  # animated files: the first frame
        image.load()
    except Exception as exc:
        raise ImageLoadError(
            path, f"the file is truncated or corrupt ({exc}); copy it again from the source", "truncated"
        ) from None


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, 2-8 = mirrored and/or rotated)."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # unreadable EXIF: treat the image as upright
        return 1


def upright(image: Image.Image) -> Image.Image:
    """A copy with the EXIF orientation applied (a plain copy when there is none)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image.copy()  # the caller closes the original


def has_alpha(image: Image.Image) -> bool:
    bands = image.getbands()
    return "A" in bands or "a" in bands or "transparency" in image.info


def _high_bit_to_gray(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    elif image.mode == "I" and values.max(initial=0.0) <= 255:
        scale = 1.0  # 32-bit container holding 8-bit values
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray)
