"""Exact and near-duplicate images.

Exact: the same file bytes (SHA-256). Near: a difference hash (dHash) over rows and columns
of a 9x9 grayscale thumbnail, 128 bits, compared by Hamming distance, plus an 8x8 color
thumbnail so two flat images of different colors (whose gradients are all zero) are not
called duplicates. A resized or re-compressed copy stays within a few bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_BITS = 128
NEAR_DISTANCE = 10  # of 128 bits
NEAR_COLOR = 12.0  # mean absolute difference of the 8x8 color thumbnails, 0-255
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class Fingerprint:
    bits: np.ndarray  # (16,) uint8: the packed 128-bit dHash
    colors: np.ndarray  # (8, 8, 3) float32 thumbnail


@dataclass(frozen=True)
class Match:
    code: str  # "duplicate" or "near_duplicate"
    index: int  # the earlier file it matches
    distance: int  # Hamming distance of the hashes (0 for exact copies)


def fingerprint(rgb: Image.Image) -> Fingerprint:
    gray = np.asarray(rgb.convert("L").resize((9, 9), Image.Resampling.LANCZOS), dtype=np.int16)
    rows = gray[:8, 1:] > gray[:8, :-1]
    columns = gray[1:, :8] > gray[:-1, :8]
    bits = np.packbits(np.concatenate([rows.ravel(), columns.ravel()]))
    colors = np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return Fingerprint(bits, colors)


def find_duplicates(
    digests: Sequence[str | None],
    prints: Sequence[Fingerprint | None],
    max_distance: int = NEAR_DISTANCE,
    max_color: float = NEAR_COLOR,
) -> dict[int, Match]:
    """For each later file that repeats an earlier one: which one, and how closely.

    ``digests`` and ``prints`` are per file (None: skip the file). The first file of a group
    in the given order is the original and gets no match.
    """
    matches: dict[int, Match] = {}
    first_with_digest: dict[str, int] = {}
    for index, digest in enumerate(digests):
        if digest is None:
            continue
        if digest in first_with_digest:
            matches[index] = Match("duplicate", first_with_digest[digest], 0)
        else:
            first_with_digest[digest] = index
    candidates = [i for i, p in enumerate(prints) if p is not None and i not in matches]
    for index, (other, distance) in _near_pairs(candidates, prints, max_distance, max_color).items():
        matches[index] = Match("near_duplicate", other, distance)
    return matches


def _near_pairs(
    indices: list[int], prints: Sequence[Fingerprint | None], max_distance: int, max_color: float
) -> dict[int, tuple[int, int]]:
    """Each file close to an earlier one: (the group's first file, distance to the closest)."""
    if len(indices) < 2:
        return {}
    bits = np.stack([prints[i].bits for i in indices])  # type: ignore[union-attr]
    colors = np.stack([prints[i].colors for i in indices])  # type: ignore[union-attr]
    group = list(range(len(indices)))  # union-find parents, by position in ``indices``
    closest: dict[int, int] = {}
    for position in range(1, len(indices)):
        distances = _POPCOUNT[bits[:position] ^ bits[position]].sum(axis=1, dtype=np.int32)
        near = np.flatnonzero(distances <= max_distance)
        color_gaps = np.abs(colors[near] - colors[position]).mean(axis=(1, 2, 3))
        near = near[color_gaps <= max_color]
        if near.size == 0:
            continue
        closest[position] = int(distances[near].min())
        for earlier in near:
            _union(group, int(earlier), position)
    return {indices[p]: (indices[_find(group, p)], d) for p, d in closest.items()}


def _find(parents: list[int], item: int) -> int:
    while parents[item] != item:
        parents[item] = parents[parents[item]]
        item = parents[item]
    return item


def _union(parents: list[int], a: int, b: int) -> None:
    root_a, root_b = _find(parents, a), _find(parents, b)
    if root_a != root_b:
        parents[max(root_a, root_b)] = min(root_a, root_b)  # the earliest file stays the root
