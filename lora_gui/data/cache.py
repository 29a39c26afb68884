"""On-disk caches of VAE latents and text embeddings, reused by later runs.

Latents are keyed by the image file's content (sha256 of its bytes) plus everything that
changes the result: how the image is fitted into its bucket and the caller's model identity.
Text embeddings are keyed by the exact caption string plus the model identity. Each entry is
one .safetensors file written to a temporary name and renamed, so a crash never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_gui.data.buckets import Bucket, Placement

CACHE_VERSION = 1  # bump when preprocessing changes (resampling filter, pixel range, layout)

Progress = Callable[[int, int], None]
LatentEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CacheResult:
    """Outcome of filling a cache; false when caching is not possible (``reason`` says why)."""

    ok: bool
    encoded: int = 0
    reused: int = 0
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class LatentJob:
    key: str
    bucket: Bucket
    record: int  # index of the record whose pixels are encoded


class TensorCache:
    """A folder of ``<key>.safetensors`` files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True for a complete, readable entry; an unreadable one is deleted so it gets rebuilt."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as entry:
                return bool(list(entry.keys()))
        except Exception:
            path.unlink(missing_ok=True)
            return False

    def load(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RuntimeError(
                f"Cache entry {path} is missing or unreadable ({exc}). Delete the folder {self.folder} "
                "and start again; it is rebuilt automatically."
            ) from None

    def save(
        self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        owned = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
        try:
            save_file(owned, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latent_key(content_hash: str, placement: Placement, model_key: str) -> str:
    return _digest(
        {
            "kind": "latent",
            "version": CACHE_VERSION,
            "file": content_hash,
            "original": placement.original,
            "bucket": placement.bucket,
            "resized": placement.resized,
            "crop": (placement.crop_top, placement.crop_left),
            "model": model_key,
        }
    )


def text_key(caption: str, model_key: str) -> str:
    return _digest({"kind": "text", "version": CACHE_VERSION, "caption": caption, "model": model_key})


def fill_latents(
    cache: TensorCache,
    jobs: Sequence[LatentJob],
    load_pixels: Callable[[int], torch.Tensor],
    encode_fn: LatentEncoder,
    batch_size: int,
    progress: Progress | None = None,
) -> CacheResult:
    """Encode the images whose latents are not cached yet, ``batch_size`` at a time, one bucket per batch."""
    unique = {job.key: job for job in jobs}  # identical files in the same bucket share an entry
    todo = [job for key, job in unique.items() if not cache.has(key)]
    total, done = len(unique), len(unique) - len(todo)
    _report(progress, done, total)
    for group in _group_by_bucket(todo, batch_size):
        pixels = torch.stack([load_pixels(job.record) for job in group])
        with torch.no_grad():
            latents = encode_fn(pixels)
        _check_batch_first("latents", latents, len(group))
        for job, latent in zip(group, latents, strict=True):
            cache.save(job.key, {"latents": latent}, {"kind": "latent"})
        done += len(group)
        _report(progress, done, total)
    return CacheResult(True, encoded=len(todo), reused=total - len(todo))


def fill_text(
    cache: TensorCache,
    captions: Sequence[str],
    model_key: str,
    encode_fn: TextEncoder,
    batch_size: int,
    progress: Progress | None = None,
    max_bytes: int | None = None,
) -> CacheResult:
    """Encode the captions whose embeddings are not cached yet; with ``max_bytes``, give up (a false result) once
    the first batch shows that all of them would take more room than that."""
    keys = {caption: text_key(caption, model_key) for caption in captions}
    todo = [caption for caption, key in keys.items() if not cache.has(key)]
    total, done = len(keys), len(keys) - len(todo)
    _report(progress, done, total)
    for chunk in _chunks(todo, batch_size):
        with torch.no_grad():
            embeds = encode_fn(list(chunk))
        for name, tensor in embeds.items():
            _check_batch_first(name, tensor, len(chunk))
        if max_bytes is not None and done == total - len(todo):
            needed = len(todo) * sum(t[0].numel() * t.element_size() for t in embeds.values())
            if needed > max_bytes:
                return CacheResult(False, reason=f"the embeddings of {len(todo)} caption variants would take "
                                                 f"{needed / 1024**3:.1f} GiB, more than {max_bytes / 1024**3:.0f} GiB")
        for i, caption in enumerate(chunk):
            cache.save(keys[caption], {name: tensor[i] for name, tensor in embeds.items()}, {"kind": "text"})
        done += len(chunk)
        _report(progress, done, total)
    return CacheResult(True, encoded=len(todo), reused=total - len(todo))


def collate_embeds(entries: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}


def _check_batch_first(name: str, tensor: object, batch: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != batch:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"encode_fn returned {name} as {shape} for {batch} inputs; expected a tensor with the batch first"
        )


def _group_by_bucket(jobs: Sequence[LatentJob], batch_size: int) -> Iterator[list[LatentJob]]:
    by_bucket: dict[Bucket, list[LatentJob]] = {}
    for job in jobs:
        by_bucket.setdefault(job.bucket, []).append(job)
    for group in by_bucket.values():
        yield from _chunks(group, batch_size)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
