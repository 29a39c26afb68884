"""Aspect-ratio buckets and fitting an image into one.

A bucket is a ``(width, height)`` whose area is at most ``resolution ** 2`` (and close to
it), with both sides multiples of the step. An image goes to the bucket with the nearest
aspect ratio, is resized to cover it (aspect ratio kept, never squashed) and center-cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lora_gui.engine.families.base import Conditioning

if TYPE_CHECKING:
    import torch

MAX_ASPECT_RATIO = 4.0
Bucket = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Placement:
    """How one image fits its bucket: resized to ``resized`` (covering it), then cropped at (left, top)."""

    original: tuple[int, int]  # (width, height) after EXIF orientation
    bucket: Bucket
    resized: tuple[int, int]
    crop_left: int
    crop_top: int

    @property
    def conditioning(self) -> Conditioning:
        (width, height), (bucket_w, bucket_h) = self.original, self.bucket
        return Conditioning(
            original_size=(height, width),
            crop_top_left=(self.crop_top, self.crop_left),
            target_size=(bucket_h, bucket_w),
        )


def bucket_step(step: int, size_multiple: int) -> int:
    """The smallest step that is a multiple of both the configured step and the family's size multiple."""
    return math.lcm(max(1, step), max(1, size_multiple))


def make_buckets(resolution: int, step: int, max_ratio: float = MAX_ASPECT_RATIO) -> list[Bucket]:
    """All buckets with area <= resolution ** 2 and aspect ratio within 1:max_ratio .. max_ratio:1."""
    max_area = resolution * resolution
    buckets = {square_bucket(resolution, step)}
    for width in range(step, int(resolution * max_ratio) + 1, step):
        height = (max_area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def training_buckets(resolution: int, step: int, size_multiple: int, bucketing: bool = True) -> list[Bucket]:
    """The buckets training uses: aspect-ratio buckets, or one square crop when bucketing is off."""
    if not bucketing:
        return [square_bucket(resolution, max(1, size_multiple))]
    return make_buckets(resolution, bucket_step(step, size_multiple))


def square_bucket(resolution: int, step: int) -> Bucket:
    side = max(step, resolution // step * step)
    return side, side


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log space); ties go to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def place(width: int, height: int, bucket: Bucket) -> Placement:
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w = max(bucket_w, round(width * scale))
    resized_h = max(bucket_h, round(height * scale))
    return Placement(
        original=(width, height),
        bucket=bucket,
        resized=(resized_w, resized_h),
        crop_left=(resized_w - bucket_w) // 2,
        crop_top=(resized_h - bucket_h) // 2,
    )


def fit_to_bucket(image: Image.Image, placement: Placement) -> Image.Image:
    """Resize to cover the bucket, then crop; ``image`` must be the upright RGB image."""
    if image.size != placement.original:
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} but was scanned as "
            f"{placement.original[0]}x{placement.original[1]}; the file changed since the scan, rescan the dataset"
        )
    resized = image.resize(placement.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = placement.crop_left, placement.crop_top
    width, height = placement.bucket
    return resized.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image to a float32 (3, H, W) tensor in [-1, 1]."""
    import torch

    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def prepare_image(image: Image.Image, bucket: Bucket) -> tuple[torch.Tensor, Conditioning]:
    """Fit an upright RGB image to ``bucket``: the (3, H, W) tensor in [-1, 1] and its conditioning."""
    placement = place(*image.size, bucket)
    return to_tensor(fit_to_bucket(image, placement)), placement.conditioning
