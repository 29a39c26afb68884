"""A built-in sample dataset: bold flat-colour shapes in one consistent "sticker" style.

Every image has a thick dark outline, a hard offset shadow and a diagonally striped
background, so there is a style to learn; subjects, colours and compositions vary, so the
captions have something to describe. Squares, 4:3 landscapes and 3:4 portraits exercise
the buckets. Generation is seeded (the same call writes the same bytes), needs only
Pillow, and never overwrites anything: a folder that already holds files is refused.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20240601
MAX_COUNT = 64  # beyond this some images come out near duplicates of others
MIN_SIZE, MAX_SIZE = 64, 2048
ASPECTS = ((1, 1), (4, 3), (3, 4))  # width:height, cycled
PALETTE = {
    "red": (214, 48, 49),
    "orange": (240, 130, 30),
    "yellow": (246, 200, 40),
    "green": (60, 160, 70),
    "teal": (30, 150, 150),
    "blue": (40, 90, 200),
    "purple": (130, 60, 170),
    "pink": (240, 120, 170),
    "cream": (246, 238, 214),
    "navy": (28, 36, 84),
}
BACKGROUNDS = ("teal", "cream", "navy", "yellow", "pink", "green", "purple", "blue")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "ring", "cross")
LAYOUTS = ("single", "pair", "corner", "row")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
INK = (24, 24, 32)
_SUPERSAMPLE = 2  # draw at twice the size, then downscale: smooth edges


@dataclass(frozen=True)
class SampleImage:
    shape: str
    color: str
    background: str
    layout: str
    corner: str
    width: int
    height: int
    jitter: tuple[float, float, float] = (1.0, 0.0, 0.0)  # subject scale, x and y shift (share of the side)

    def caption(self, trigger: str) -> str:
        plural = self.shape + ("es" if self.shape.endswith("s") else "s")
        article = "an" if self.color[0] in "aeiou" else "a"
        subject = {
            "single": f"{article} {self.color} {self.shape} on",
            "pair": f"two {self.color} {plural} side by side on",
            "corner": f"a small {self.color} {self.shape} in the {self.corner} corner of",
            "row": f"three {self.color} {plural} in a row on",
        }[self.layout]
        return f"{trigger}, {subject} a {self.background} background"


def create_sample_dataset(folder: str | Path, trigger: str = "sks", count: int = 12, size: int = 256) -> Path:
    """Write ``count`` images (``shape-01.png`` ...) with same-name ``.txt`` captions into ``folder``.

    ``size``: the side of the square images; the 4:3 and 3:4 ones keep about the same area.
    Images of size 256 check clean at resolutions up to 256; use 512 for resolution 512.
    Raises ``FileExistsError`` when ``folder`` already holds anything (nothing is overwritten)
    and ``ValueError`` for a bad trigger, count or size.
    """
    trigger = check_trigger(trigger)
    if not 1 <= int(count) <= MAX_COUNT:
        raise ValueError(f"count must be between 1 and {MAX_COUNT}, not {count}.")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}.")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not empty; choose a new folder for the sample.")
    folder.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(plan_images(int(count), int(size)), start=1):
        name = f"shape-{index:02d}"
        draw_image(item).save(folder / f"{name}.png", "PNG")
        (folder / f"{name}.txt").write_text(item.caption(trigger) + "\n", encoding="utf-8")
    return folder


def check_trigger(trigger: str) -> str:
    text = str(trigger or "").strip()
    if not text or len(text) > 50 or any(not ch.isprintable() for ch in text) or "," in text:
        raise ValueError("The trigger word must be 1 to 50 printable characters without commas, e.g. 'sks'.")
    return text


def plan_images(count: int, size: int) -> list[SampleImage]:
    """What each image shows; the first N images are the same whatever the count."""
    rng = random.Random(SEED)
    seen: set[tuple[str, ...]] = set()
    plan = []
    for index in range(count):
        turn = index // len(SHAPES)  # later rounds shift backgrounds and layouts: new combinations
        shape, background = SHAPES[index % len(SHAPES)], BACKGROUNDS[(index + 3 * turn) % len(BACKGROUNDS)]
        layout = LAYOUTS[(index + turn) % len(LAYOUTS)]
        allowed = [c for c in PALETTE if c != background]
        # a colour, background and layout seen before with another shape looks too alike
        fresh = [c for c in allowed if not {(shape, c, background), (c, background, layout)} & seen]
        color = rng.choice(fresh or allowed)
        seen |= {(shape, color, background), (color, background, layout)}
        width, height = image_size(size, *ASPECTS[index % len(ASPECTS)])
        jitter = (rng.uniform(0.85, 1.1), rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06))
        plan.append(SampleImage(shape, color, background, layout, rng.choice(CORNERS), width, height, jitter))
    return plan


def image_size(size: int, aspect_w: int, aspect_h: int) -> tuple[int, int]:
    """About ``size * size`` pixels at the given aspect ratio, both sides multiples of 8."""
    ratio = math.sqrt(aspect_w / aspect_h)
    return _multiple_of_8(size * ratio), _multiple_of_8(size / ratio)


def _multiple_of_8(value: float) -> int:
    return max(8, round(value / 8) * 8)


def draw_image(item: SampleImage) -> Image.Image:
    scale = _SUPERSAMPLE
    width, height = item.width * scale, item.height * scale
    image = Image.new("RGB", (width, height), PALETTE[item.background])
    draw = ImageDraw.Draw(image)
    _stripes(draw, width, height, PALETTE[item.background])
    scale_by, shift_x, shift_y = item.jitter
    for cx, cy, radius in _placements(item.layout, item.corner, width, height):
        cx, cy, radius = cx + shift_x * width, cy + shift_y * height, radius * scale_by
        _sticker(draw, item.shape, cx, cy, radius, PALETTE[item.color], PALETTE[item.background])
    return image.resize((item.width, item.height), Image.Resampling.LANCZOS)


def _placements(layout: str, corner: str, width: int, height: int) -> list[tuple[float, float, float]]:
    """(centre x, centre y, radius) of each subject."""
    short = min(width, height)
    if layout == "single":
        return [(width / 2, height / 2, short * 0.32)]
    if layout == "pair":
        radius = min(width / 4, height / 2) * 0.62
        return [(width * 0.27, height / 2, radius), (width * 0.73, height / 2, radius)]
    if layout == "row":
        radius = min(width / 6, height / 2) * 0.62
        return [(width * x, height / 2, radius) for x in (1 / 6, 1 / 2, 5 / 6)]
    radius = short * 0.18
    cx = width * (0.25 if "left" in corner else 0.75)
    cy = height * (0.25 if "top" in corner else 0.75)
    return [(cx, cy, radius)]


def _stripes(draw: ImageDraw.ImageDraw, width: int, height: int, color: tuple[int, int, int]) -> None:
    shade = _shade(color, 0.88)
    step = max(8, min(width, height) // 10)
    for x in range(-height, width, step * 2):
        draw.polygon([(x, height), (x + step, height), (x + step + height, 0), (x + height, 0)], fill=shade)


def _sticker(draw, shape: str, cx: float, cy: float, radius: float, color, background) -> None:
    """The subject with its hard shadow and thick outline."""
    offset, outline = radius * 0.09, max(2, round(radius * 0.08))
    _shape(draw, shape, cx + offset, cy + offset, radius, _shade(background, 0.55), None, 0, background)
    _shape(draw, shape, cx, cy, radius, color, INK, outline, background)


def _shape(draw, shape, cx, cy, radius, fill, outline, width, background) -> None:
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        inset = radius * 0.85
        draw.rectangle([cx - inset, cy - inset, cx + inset, cy + inset], fill=fill, outline=outline, width=width)
    elif shape == "ring":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
        hole = radius * 0.5
        inner = [cx - hole, cy - hole, cx + hole, cy + hole]
        draw.ellipse(inner, fill=background if outline else fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill, outline=outline, width=width)


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "cross":
        a, b = radius * 0.32, radius * 0.9
        corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                   (-b, -a), (-a, -a)]
        return [(cx + x, cy + y) for x, y in corners]
    sides, radii, turn = {
        "triangle": (3, (1.0,), 0.0),
        "diamond": (4, (1.0,), 0.0),
        "hexagon": (6, (1.0,), 0.5),
        "star": (10, (1.0, 0.45), 0.0),
    }[shape]
    points = []
    for k in range(sides):
        angle = 2 * math.pi * (k + turn) / sides - math.pi / 2
        r = radius * radii[k % len(radii)]
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * factor))) for c in color)  # type: ignore[return-value]
