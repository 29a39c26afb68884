"""The training data: which images, in which batches and order, with which captions.

Construction scans the folder and assigns buckets; it loads no model and no pixels. Every
random choice derives from (seed, epoch) or (seed, epoch, sample index), so a resumed run
sees exactly the batches and captions it would have seen.

Batching: each image appears ``repeats`` times per epoch (each appearance is a *sample*).
Samples are shuffled, grouped by bucket and cut into batches of ``batch_size``; the last
batch of a bucket may be smaller. Partial batches are kept, not dropped, because LoRA
datasets are small and every image counts. The order of the batches is then shuffled.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui.config import DatasetSection
from lora_gui.data import cache as caches
from lora_gui.data.buckets import (
    Bucket,
    Placement,
    fit_to_bucket,
    nearest_bucket,
    place,
    to_tensor,
    training_buckets,
)
from lora_gui.data.captions import caption_rng, caption_variant
from lora_gui.data.images import load_rgb
from lora_gui.data.scan import ImageRecord, Log, ScanReport, scan_folder
from lora_gui.engine.families.base import Conditioning

# With tag shuffling, the embeddings of a run's planned captions are cached up to this size (they are stored in
# float32: Flux's T5 takes 8 MiB a caption), so the text encoders need not run at every step.
SHUFFLED_CACHE_BYTES = 8 * 1024**3

@dataclass
class Batch:
    indices: list[int]  # sample indices, as given to ``load_batch``
    captions: list[str]  # after dropout and shuffling
    conditioning: list[Conditioning]
    paths: list[str]
    pixels: torch.Tensor | None = None  # (B, 3, H, W) float32 in [-1, 1]; None when latents are cached
    latents: torch.Tensor | None = None  # (B, C, h, w) from the latent cache, on the CPU
    embeds: dict[str, torch.Tensor] | None = None  # from the text cache, batch first, on the CPU

    def __len__(self) -> int:
        return len(self.indices)


class TrainingData:
    def __init__(
        self,
        section: DatasetSection,
        size_multiple: int = 8,
        batch_size: int = 1,
        seed: int = 0,
        log: Log | None = None,
        records: list[ImageRecord] | None = None,
    ):
        """Scan ``section.dir`` (or use ``records`` from an earlier scan) and assign buckets."""
        self.section = section
        self.batch_size = max(1, batch_size)
        self.seed = seed
        if records is None:
            report = scan_folder(section.dir, section.caption_extension, section.repeats, log)
            records = report.records
            if not records:
                raise ValueError(no_images_message(report))
        if not records:
            raise ValueError("The dataset has no usable images; add images to dataset.dir and scan again.")
        self.records = list(records)
        self.buckets = self._make_buckets(size_multiple)
        self.placements: list[Placement] = [
            place(r.width, r.height, nearest_bucket(r.width, r.height, self.buckets)) for r in self.records
        ]
        # sample index -> record index; a record appears ``repeats`` times per epoch
        self.sample_records = [i for i, record in enumerate(self.records) for _ in range(record.repeats)]
        self._latent_cache: tuple[caches.TensorCache, list[str]] | None = None
        self._text_cache: tuple[caches.TensorCache, str] | None = None

    def _make_buckets(self, size_multiple: int) -> list[Bucket]:
        section = self.section
        return training_buckets(section.resolution, section.bucket_step, size_multiple, section.bucketing)

    # ------------------------------------------------------------------ order

    def __len__(self) -> int:
        return len(self.sample_records)

    @property
    def num_samples(self) -> int:
        return len(self.sample_records)

    def bucket_of(self, sample: int) -> Bucket:
        return self.placements[self.sample_records[sample]].bucket

    def bucket_counts(self) -> dict[Bucket, int]:
        """Images (not samples) per bucket used."""
        return dict(Counter(placement.bucket for placement in self.placements))

    @property
    def batches_per_epoch(self) -> int:
        per_bucket = Counter(self.bucket_of(sample) for sample in range(self.num_samples))
        return sum(math.ceil(count / self.batch_size) for count in per_bucket.values())

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.bucket_counts().items()))
        return (
            f"{len(self.records)} images, {self.num_samples} samples and {self.batches_per_epoch} batches "
            f"per epoch; buckets {sizes}"
        )

    def batches_for_epoch(self, epoch: int, batch_size: int | None = None) -> list[list[int]]:
        """Sample indices per batch, one bucket per batch; the same for the same (seed, epoch, batch size).
        ``batch_size`` other than this data's: the batches a run with that size took (for a resume)."""
        size = batch_size or self.batch_size
        rng = random.Random(f"order:{self.seed}:{epoch}")
        order = list(range(self.num_samples))
        rng.shuffle(order)
        by_bucket: dict[Bucket, list[int]] = {}
        for sample in order:
            by_bucket.setdefault(self.bucket_of(sample), []).append(sample)
        batches = [
            group[start : start + size]
            for group in by_bucket.values()
            for start in range(0, len(group), size)
        ]
        rng.shuffle(batches)
        return batches

    def caption_for(self, sample: int, epoch: int) -> str:
        """The caption a sample is trained with in ``epoch`` (after dropout and tag shuffling)."""
        section = self.section
        caption = self.records[self.sample_records[sample]].caption
        rng = caption_rng(self.seed, epoch, sample)
        return caption_variant(
            caption, rng, section.caption_dropout, section.shuffle_tags, section.keep_tokens
        )

    # ------------------------------------------------------------------ loading

    def load_pixels(self, record: int) -> torch.Tensor:
        """One record's image fitted to its bucket: (3, H, W) float32 in [-1, 1]."""
        return to_tensor(fit_to_bucket(load_rgb(self.records[record].path), self.placements[record]))

    def load_batch(self, indices: list[int], epoch: int) -> Batch:
        """The batch for these sample indices; cached latents and embeddings are used once filled."""
        records = [self.sample_records[sample] for sample in indices]
        if len({self.placements[r].bucket for r in records}) > 1:
            raise ValueError(
                "load_batch: the samples are in different buckets; use batches_for_epoch() to group them"
            )
        batch = Batch(
            indices=list(indices),
            captions=[self.caption_for(sample, epoch) for sample in indices],
            conditioning=[self.placements[r].conditioning for r in records],
            paths=[str(self.records[r].path) for r in records],
        )
        if self._latent_cache is not None:
            cache, keys = self._latent_cache
            batch.latents = torch.stack([cache.load(keys[r])["latents"] for r in records])
        else:
            batch.pixels = torch.stack([self.load_pixels(r) for r in records])
        if self._text_cache is not None:
            cache, model_key = self._text_cache
            entries = [cache.load(caches.text_key(caption, model_key)) for caption in batch.captions]
            batch.embeds = caches.collate_embeds(entries)
        return batch

    # ------------------------------------------------------------------ caches

    @property
    def latents_cached(self) -> bool:
        return self._latent_cache is not None

    @property
    def text_cached(self) -> bool:
        return self._text_cache is not None

    def fill_latent_cache(
        self,
        encode_fn: caches.LatentEncoder,
        cache_dir: str | Path,
        model_key: str,
        progress: caches.Progress | None = None,
        batch_size: int | None = None,
    ) -> caches.CacheResult:
        """Encode images not cached yet with ``encode_fn(pixels (B,3,H,W)) -> latents``; later batches use the cache.

        ``model_key`` must change whenever the latents would (VAE weights, dtype, scaling).
        """
        hashes: dict[Path, str] = {}
        keys = []
        for record, placement in zip(self.records, self.placements, strict=True):
            if record.path not in hashes:
                hashes[record.path] = caches.file_sha256(record.path)
            keys.append(caches.latent_key(hashes[record.path], placement, model_key))
        jobs = [caches.LatentJob(key, self.placements[i].bucket, i) for i, key in enumerate(keys)]
        cache = caches.TensorCache(Path(cache_dir) / "latents")
        result = caches.fill_latents(
            cache, jobs, self.load_pixels, encode_fn, batch_size or self.batch_size, progress
        )
        self._latent_cache = (cache, keys)
        return result

    def caption_variants(self) -> list[str] | None:
        """Every caption training can produce, or None when tag shuffling makes them unbounded."""
        if self.section.shuffle_tags:
            return None
        variants = {record.caption for record in self.records}
        if self.section.caption_dropout > 0:
            variants.add("")
        return sorted(variants)

    def fill_text_cache(
        self,
        encode_fn: caches.TextEncoder,
        cache_dir: str | Path,
        model_key: str,
        progress: caches.Progress | None = None,
        batch_size: int | None = None,
        planned: list[str] | None = None,
        max_bytes: int = SHUFFLED_CACHE_BYTES,
    ) -> caches.CacheResult:
        """Encode every caption variant with ``encode_fn(list[str]) -> dict[str, Tensor]``.

        With tag shuffling the variants are unbounded: ``planned``, the captions the run's remaining steps will
        use, are encoded instead, unless their embeddings would take more than ``max_bytes``; then (or
        without ``planned``) the result is false with a reason and the trainer encodes on the fly. Do not call
        it while training a text-encoder LoRA.
        """
        variants = self.caption_variants()
        if variants is None and planned is None:
            self._text_cache = None
            return caches.CacheResult(
                False,
                reason="Tag shuffling gives every step a new caption, so text embeddings cannot be cached; "
                "they are encoded each step instead (turn off dataset.shuffle_tags to cache them).",
            )
        cache = caches.TensorCache(Path(cache_dir) / "text")
        result = caches.fill_text(
            cache, variants if variants is not None else planned, model_key, encode_fn,
            batch_size or self.batch_size, progress, max_bytes=None if variants is not None else max_bytes,
        )
        if not result:
            self._text_cache = None
            return caches.CacheResult(False, reason=f"Tag shuffling: {result.reason}, so they are encoded at each "
                                                    "step instead (fewer steps or no dataset.shuffle_tags caches them).")
        self._text_cache = (cache, model_key)
        return result


def no_images_message(report: ScanReport) -> str:
    unreadable = f" {len(report.skipped)} file(s) could not be read (see the log)." if report.skipped else ""
    return (
        f"No usable images in {report.root}.{unreadable} Put .png, .jpg or .webp images there (each with a "
        "same-name .txt caption), or set dataset.dir to the folder that holds them."
    )
