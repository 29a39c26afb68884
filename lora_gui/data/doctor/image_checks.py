"""Open one image the way training will and say what had to be converted.

Reuses ``lora_gui.data.images`` for opening, decoding and RGB conversion, so the doctor
judges a file by exactly the code that later loads it for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_gui.data.buckets import MAX_ASPECT_RATIO, Placement
from lora_gui.data.doctor.dedupe import Fingerprint, fingerprint
from lora_gui.data.doctor.report import ERROR, Problem, problem
from lora_gui.data.images import (
    HIGH_BIT_MODES,
    decode_first_frame,
    exif_orientation,
    has_alpha,
    open_image,
    to_rgb,
)

UPSCALE_WARNING = 1.25  # an image upscaled more than this to fill its bucket looks soft
UPSCALE_ERROR = 4.0  # beyond this there is too little detail to learn from: skipped
_HASH_SIDE = 256  # images are reduced to about this size before hashing
_GRAY_MODES = {"1", "L", "LA", "La"} | HIGH_BIT_MODES
_SWAPS_SIDES = {5, 6, 7, 8}
_ORIENTATIONS = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "mirrored and rotated 90°",
    6: "rotated 90° clockwise",
    7: "mirrored and rotated 90°",
    8: "rotated 90° counter-clockwise",
}
_TRANSPOSES = {  # as ImageOps.exif_transpose does it
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXTENSIONS = {
    "PNG": {".png"},
    "JPEG": {".jpg", ".jpeg"},
    "WEBP": {".webp"},
    "BMP": {".bmp"},
    "GIF": {".gif"},
    "TIFF": {".tif", ".tiff"},
}


@dataclass
class ImageFacts:
    width: int  # after EXIF orientation
    height: int
    problems: list[Problem] = field(default_factory=list)
    fingerprint: Fingerprint | None = None


def inspect_image(path: Path, max_pixels: int) -> ImageFacts:
    """Decode the first frame and describe it; raises ``ImageLoadError`` for unusable files."""
    with open_image(path, max_pixels) as image:
        width, height = image.size
        mode, image_format = image.mode, image.format
        deep = mode in HIGH_BIT_MODES or _decodes_16_bit(image)
        frames = getattr(image, "n_frames", 1)
        orientation = exif_orientation(image)
        if image_format == "JPEG":
            factor = max(1, min(8, min(width, height) // _HASH_SIDE))
            image.draft(image.mode, (width // factor, height // factor))  # fast reduced decode
        decode_first_frame(image, path)
        small = _upright(_reduce(image), orientation)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    facts = ImageFacts(width, height)
    facts.problems += _format_problems(path, image_format, frames, orientation)
    facts.problems += _mode_problems(mode, deep, _transparent_share(small))
    facts.fingerprint = fingerprint(to_rgb(small))
    return facts


def size_problems(facts: ImageFacts, placement: Placement, resolution: int) -> list[Problem]:
    """Too small for its bucket (it will be upscaled) or too far from any bucket's shape."""
    found = []
    width, height = facts.width, facts.height
    bucket_w, bucket_h = placement.bucket
    scale = placement.resized[0] / width
    if scale > UPSCALE_ERROR:
        found.append(problem(
            "too_small",
            f"{width}x{height} would be upscaled {scale:.1f}x to fill its {bucket_w}x{bucket_h} bucket at "
            f"resolution {resolution}, too little detail to learn from, so it is skipped. Use a larger "
            "original or lower the resolution.",
            ERROR,
        ))
    elif scale > UPSCALE_WARNING:
        found.append(problem(
            "too_small",
            f"{width}x{height} is upscaled {scale:.1f}x to fill its {bucket_w}x{bucket_h} bucket at "
            f"resolution {resolution} and will look soft. Use a larger original or lower the resolution.",
        ))
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        kept = 100 * bucket_w * bucket_h / (placement.resized[0] * placement.resized[1])
        found.append(problem(
            "extreme_aspect",
            f"Aspect ratio 1:{ratio:.1f} is beyond the most extreme bucket (1:{MAX_ASPECT_RATIO:g}); the "
            f"center crop keeps only {kept:.0f}% of the image. Crop it yourself to the part that matters.",
        ))
    return found


def _format_problems(path: Path, image_format: str | None, frames: int, orientation: int) -> list[Problem]:
    found = []
    if frames > 1:
        found.append(problem(
            "animated_first_frame",
            f"Animated ({frames} frames); only the first frame is used. Export the frame you want as a "
            "still image if it is another one.",
        ))
    if orientation in _ORIENTATIONS:
        found.append(problem(
            "exif_rotated",
            f"EXIF orientation {orientation} ({_ORIENTATIONS[orientation]}): it is trained upright, as "
            "photo viewers show it. Nothing to do.",
        ))
    expected = _EXTENSIONS.get(image_format or "")
    if expected and path.suffix.lower() not in expected:
        right = sorted(expected)[-1] if image_format == "JPEG" else sorted(expected)[0]
        found.append(problem(
            "wrong_extension",
            f"This is a {image_format} file named {path.suffix}; it is read correctly, but other tools may "
            f"not be. Rename it to {right}.",
        ))
    return found


def _mode_problems(mode: str, deep: bool, transparent: float) -> list[Problem]:
    found = []
    if mode == "CMYK":
        found.append(problem(
            "cmyk_converted",
            "CMYK (print) colors; converted to RGB for training. Colors may shift a little; save it as RGB "
            "to see exactly what trains.",
        ))
    if deep:
        found.append(problem(
            "16bit_converted",
            f"High bit depth ({mode}); scaled to 8 bits per channel for training. Nothing to do.",
        ))
    if mode in _GRAY_MODES:
        found.append(problem(
            "grayscale_converted",
            "Grayscale; trained as RGB with three equal channels. If most images are gray, the LoRA may "
            "learn to make gray images.",
        ))
    if transparent > 0:
        found.append(problem(
            "transparency_composited",
            f"{_percent(transparent)} of the image is transparent; it is filled with white for training. "
            "Flatten it onto the background you want if white is wrong.",
        ))
    return found


def _decodes_16_bit(image: Image.Image) -> bool:
    """16-bit RGB files that Pillow hands over as 8-bit RGB (their raw mode says 16)."""
    try:
        return any(";16" in str(tile.args[0] if isinstance(tile.args, tuple) else tile.args)
                   for tile in image.tile)
    except Exception:
        return False


def _reduce(image: Image.Image) -> Image.Image:
    """A smaller copy for hashing and the alpha check (a full copy when reducing is unsupported)."""
    factor = min(image.size) // _HASH_SIDE
    if factor >= 2:
        try:
            return image.reduce(factor)
        except (ValueError, NotImplementedError):
            pass
    return image.copy()


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """EXIF orientation applied to a reduced copy (which no longer carries the EXIF data)."""
    method = _TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


def _transparent_share(image: Image.Image) -> float:
    if image.mode in HIGH_BIT_MODES or not has_alpha(image):
        return 0.0
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return float(np.mean(alpha < 255))


def _percent(share: float) -> str:
    return "less than 1%" if share < 0.01 else f"{math.floor(share * 100)}%"
