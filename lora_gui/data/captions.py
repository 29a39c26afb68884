"""Caption augmentation: dropout and tag shuffling, driven by a ``random.Random`` passed in."""

from __future__ import annotations

import random


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep_tokens`` in place; joined with ', '."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def drop_caption(caption: str, probability: float, rng: random.Random) -> str:
    """The empty caption with ``probability``, else ``caption``."""
    return "" if rng.random() < probability else caption


def caption_variant(
    caption: str, rng: random.Random, dropout: float = 0.0, shuffle: bool = False, keep_tokens: int = 0
) -> str:
    """The caption one training step sees (dropout first, then shuffling); deterministic in ``rng``."""
    caption = drop_caption(caption, dropout, rng)
    if shuffle and caption:
        caption = shuffle_tags(caption, keep_tokens, rng)
    return caption


def caption_rng(seed: int, epoch: int, sample_index: int) -> random.Random:
    """A generator private to one sample in one epoch (string seeds are stable across processes)."""
    return random.Random(f"caption:{seed}:{epoch}:{sample_index}")
